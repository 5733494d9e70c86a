#!/usr/bin/env python
"""FLASH: hardware-aware architecture search with NN-Degree (docs/flash.md).

    python tools/search.py --target host --latency-ms 5 --memory-kb 512 [--emit-onnx F]
        search: print the chosen architecture, its NN-Degree, predicted accuracy and
        modelled (and with --measure, measured) latency
    python tools/search.py measure --count 30 -o docs/flash/host_latency.json
        compile sampled networks with gftvm and time them (host; a board with --rpc or
        --rpc-tracker/--rpc-key and --target cortex-a72)
    python tools/search.py train --count 30 -o docs/flash/accuracy.json [--cifar DIR]
        train sampled networks (digits by default) for the accuracy predictor
    python tools/search.py report --docs docs
        fit both models, measure search times, write the plots and docs/flash/report.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

from gftvm.flash import space

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, os.pardir, "docs", "flash")


def machine() -> dict:
    import tvm

    return {"machine": platform.machine(), "cpu": tvm.target.codegen.llvm_get_system_cpu(),
            "cores": os.cpu_count(), "python": platform.python_version(),
            "tvm": tvm.__version__, "note": "shared development machine; timings are noisy"}


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(path + ".tmp", path)


def cmd_measure(args: argparse.Namespace) -> int:
    from gftvm.flash.measure import compile_config, time_host

    remote = None
    if args.rpc or args.rpc_tracker:
        sys.path.insert(0, HERE)
        import measure as rpc_measure  # tools/measure.py

        remote = rpc_measure.connect(args)
    rows = []
    payload = {"target": args.target, "batch": args.batch, "repeat": args.repeat,
               "host": machine(), "board": args.rpc or args.rpc_key if remote else None,
               "rows": rows}
    for i, config in enumerate(space.sample(space.FULL, args.count, args.seed)):
        with tempfile.TemporaryDirectory() as tmp:
            artifact = compile_config(config, tmp, args.target, args.batch)
            if remote is None:
                times = time_host(artifact, args.repeat)
            else:
                times = {"step_ms": rpc_measure.measure(artifact, remote, args.repeat)}
        rows.append({"widths": config.widths, "depths": config.depths,
                     "skips": config.skips, **times})
        write_json(args.output, payload)
        print(f"[{i + 1}/{args.count}] {config}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in times.items()), flush=True)
    return 0


def load_split(args: argparse.Namespace) -> tuple[tuple, tuple]:
    """(train, test) images and labels: CIFAR-10 from --cifar, else digits (fixed split)."""
    from gftvm import data

    if args.cifar:
        train, test = data.load_cifar(args.cifar, True), data.load_cifar(args.cifar, False)
        return ((train[0][:args.train_count], train[1][:args.train_count]),
                (test[0][:args.train_count // 4], test[1][:args.train_count // 4]))
    images, labels = data.load_digits(args.image_size)
    order = np.random.default_rng(0).permutation(len(images))
    cut = len(images) * 2 // 3
    return (images[order[:cut]], labels[order[:cut]]), (images[order[cut:]], labels[order[cut:]])


def cmd_train(args: argparse.Namespace) -> int:
    from gftvm.flash.degree import nn_degree
    from gftvm.flash.predictor import train_and_evaluate

    train, test = load_split(args)
    rows = []
    payload = {"data": args.cifar or "digits", "image_size": args.image_size,
               "epochs": args.epochs, "train_images": len(train[0]),
               "test_images": len(test[0]), "host": machine(), "rows": rows}
    for i, config in enumerate(space.sample(space.FULL, args.count, args.seed)):
        start = time.perf_counter()
        accuracy = train_and_evaluate(config, train, test, args.epochs, seed=args.seed)
        degree = float(nn_degree(config.widths, config.depths, config.skips))
        rows.append({"widths": config.widths, "depths": config.depths, "skips": config.skips,
                     "nn_degree": degree, "accuracy": accuracy,
                     "train_s": time.perf_counter() - start})
        write_json(args.output, payload)
        print(f"[{i + 1}/{args.count}] {config}: NN-Degree {degree:.1f}, accuracy "
              f"{accuracy:.3f} ({rows[-1]['train_s']:.0f}s)", flush=True)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", nargs="?", default="search",
                        choices=["search", "measure", "train", "report"])
    parser.add_argument("--target", default="host", help="host or cortex-a72")
    parser.add_argument("--count", type=int, default=30, help="networks to sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1, help="batch of the timed modules")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per function")
    parser.add_argument("-o", "--output", help="result file")
    parser.add_argument("--rpc", metavar="HOST:PORT", help="a board's rpc_server")
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT", help="an RPC tracker")
    parser.add_argument("--rpc-key", default="rasp4", help="device key at the tracker")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per network")
    parser.add_argument("--image-size", type=int, default=32,
                        help="digits resolution for training (the hardware uses 32)")
    parser.add_argument("--cifar", metavar="DIR", help="train on CIFAR-10 batches in DIR")
    parser.add_argument("--train-count", type=int, default=10000,
                        help="CIFAR training images used (test: a quarter of it)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return {"measure": cmd_measure, "train": cmd_train}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
