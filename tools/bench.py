#!/usr/bin/env python
"""Train-step time: gftvm's compiled step vs PyTorch eager, side by side in one run.

Both run the same model, trainable set, optimizer, batch and thread count (BN in eval mode,
SGD with momentum). Prints one row per configuration with the ratio torch / gftvm
(above 1 means gftvm is faster).

    python tools/bench.py --models mcunet resnet18 --train all last:4 --batch 8 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv2-0.35", "resnet18", "mcunet"])
    parser.add_argument("--train", nargs="+", default=["all", "last:4"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up)")
    return parser.parse_args()


def median_ms(step, steps: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    args = parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    import torch

    import gftvm
    from gftvm import models
    from gftvm.data import synthetic

    torch.set_num_threads(args.threads)
    images, labels = synthetic(args.batch, image_size=args.image_size)
    x_t, y_t = torch.from_numpy(images), torch.from_numpy(labels)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores; "
          f"threads={args.threads}, batch={args.batch}, {args.image_size}x{args.image_size}, "
          f"median of {args.steps} steps")
    print(f"{'model':18} {'train':8} {'gftvm ms':>10} {'torch ms':>10} {'torch/gftvm':>12}")
    for name in args.models:
        for spec in args.train:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.onnx")
                model = models.export_zoo_model(name, path, args.image_size,
                                                calibration=x_t)
                artifact = gftvm.compile(path, trainable=spec, batch_size=args.batch,
                                         optimizer="sgd", lr=1e-3, momentum=0.9)
                artifact.save(tmp)
                session = gftvm.runtime.load(tmp)
            gftvm_ms = median_ms(lambda: session.step(images, labels), args.steps)

            trained = set(artifact.manifest["trainable"])
            params = [p for n, p in model.named_parameters() if n in trained]
            for n, p in model.named_parameters():
                p.requires_grad_(n in trained)
            opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

            def torch_step() -> None:
                loss = torch.nn.functional.cross_entropy(model(x_t), y_t)
                opt.zero_grad()
                loss.backward()
                opt.step()

            torch_ms = median_ms(torch_step, args.steps)
            print(f"{name:18} {spec:8} {gftvm_ms:10.1f} {torch_ms:10.1f} "
                  f"{torch_ms / gftvm_ms:12.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
