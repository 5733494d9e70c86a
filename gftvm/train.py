"""Train with an artifact on the device: ``python -m gftvm.train ARTIFACT DATA.npz``.

Needs only numpy and the TVM runtime. DATA.npz holds ``x`` (float32, N×C×H×W) and ``y``
(integer labels, N). Each epoch shuffles the data, steps over every full batch of the
artifact's batch size, prints the mean loss, and writes a checkpoint atomically; ``--resume``
continues from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from . import runtime
from .errors import GftvmError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gftvm.train", description=__doc__)
    parser.add_argument("artifact", help="artifact directory (from tools/compile.py)")
    parser.add_argument("data", help=".npz with x (float32 NCHW) and y (int labels)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--checkpoint", default="checkpoint.npz")
    parser.add_argument("--resume", action="store_true", help="start from --checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_data(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["x"], data["y"]
    except (OSError, ValueError, KeyError) as err:
        raise GftvmError(f"{path}: expected an .npz with arrays 'x' and 'y' ({err})") from err


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        session = runtime.load(args.artifact)
        if args.resume and os.path.exists(args.checkpoint):
            session.load_checkpoint(args.checkpoint)
        x, y = load_data(args.data)
        batch = session.manifest["input"]["shape"][0]
        if len(x) < batch:
            raise GftvmError(f"{args.data}: {len(x)} samples, fewer than the batch size {batch}")
        rng = np.random.default_rng(args.seed + session.steps)
        for epoch in range(args.epochs):
            order = rng.permutation(len(x))
            start, losses = time.perf_counter(), []
            for first in range(0, len(x) - batch + 1, batch):
                index = order[first:first + batch]
                losses.append(session.step(x[index], y[index]))
            session.save_checkpoint(args.checkpoint)
            seconds = (time.perf_counter() - start) / len(losses)
            print(f"epoch {epoch + 1}: mean loss {np.mean(losses):.4f}, {len(losses)} steps, "
                  f"{seconds * 1e3:.1f} ms/step, checkpoint {args.checkpoint}", flush=True)
    except GftvmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
