#!/usr/bin/env python
"""The main job on the bundled model: export, compile for the host, load with the runtime,
and train a few steps on generated data, printing the loss and the time per step."""

from __future__ import annotations

import sys
import time

import numpy as np

import gftvm
from gftvm.data import synthetic

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import compile as compile_tool  # noqa: E402  (tools/compile.py)

OUT = "out/demo"
BATCH = 8
STEPS = 30


def main() -> int:
    status = compile_tool.main(["--train", "last:4", "--batch", str(BATCH), "--optimizer", "sgd",
                                "--lr", "0.001", "--momentum", "0.9", "-o", OUT])
    if status:
        return status
    session = gftvm.runtime.load(OUT)
    images, labels = synthetic(BATCH * 10, seed=0)
    times, losses = [], []
    print(f"\ntraining {STEPS} steps, batch {BATCH}, on generated data")
    for step in range(STEPS):
        batch = slice(step % 10 * BATCH, (step % 10 + 1) * BATCH)
        start = time.perf_counter()
        loss = session.step(images[batch], labels[batch])
        times.append(time.perf_counter() - start)
        losses.append(loss)
        print(f"step {step + 1:3d}  loss {loss:.4f}  {times[-1] * 1e3:7.1f} ms")
    accuracy = np.mean(np.concatenate([
        session.predict(images[i:i + BATCH]).argmax(1) == labels[i:i + BATCH]
        for i in range(0, len(images), BATCH)]))
    means = [f"{np.mean(losses[i:i + 10]):.3f}" for i in range(0, STEPS, 10)]
    print(f"mean loss per 10 steps: {' -> '.join(means)}")
    print(f"median step time {np.median(times) * 1e3:.1f} ms; "
          f"training-set accuracy {accuracy:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
