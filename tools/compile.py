#!/usr/bin/env python
"""Compile a forward ONNX model's train step into an artifact directory.

    python tools/compile.py [MODEL.onnx] --target host --train last:4 --batch 8 \
        --optimizer sgd --lr 0.05 [--filter-patch 2 --filter-layers last:4] -o OUT_DIR

Without MODEL.onnx it exports and compiles the bundled default model (gftvm.models).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gftvm


def add_model_arguments(parser: argparse.ArgumentParser, several_patches: bool = False) -> None:
    """The options that define a train step (shared with tools/tune.py, where
    ``--filter-patch`` takes several patch sizes: one filtered step each, plus exact backprop)."""
    parser.add_argument("model", nargs="?", help="forward ONNX model (default: bundled model)")
    parser.add_argument("--target", default="host",
                        help="host (this machine) or cortex-a72 (Raspberry Pi 4, aarch64)")
    parser.add_argument("--train", default="all", help="'all', 'last:K' or comma-separated "
                        "initializer names (default: all)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    if several_patches:
        parser.add_argument("--filter-patch", type=int, nargs="+", default=[], metavar="R",
                            help="also the gradient-filtered steps with these patch sizes")
    else:
        parser.add_argument("--filter-patch", type=int, metavar="R",
                            help="gradient filtering with patch size R (default: exact backprop)")
    parser.add_argument("--filter-layers", default="last:4", metavar="LAYERS",
                        help="'last:K' or comma-separated ONNX Conv node names (default last:4)")
    parser.add_argument("--image-size", type=int, default=32,
                        help="input size of the bundled model (default: 32)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", default="out/artifact", help="artifact directory")
    return parser.parse_args(argv)


def model_path(args: argparse.Namespace, directory: str, log) -> str:
    """The ONNX model of the arguments: given, or the bundled one exported into ``directory``."""
    if args.model is not None:
        return args.model
    import torch

    from gftvm import models
    from gftvm.data import synthetic

    os.makedirs(directory, exist_ok=True)
    model = os.path.join(directory, "model.onnx")
    log(f"exporting the bundled model {models.DEFAULT_MODEL} "
        f"({args.image_size}x{args.image_size}, BN calibrated on generated data) to {model}")
    images, _ = synthetic(64, image_size=args.image_size, seed=0)
    models.export_zoo_model(models.DEFAULT_MODEL, model, args.image_size,
                            calibration=torch.from_numpy(images))
    return model


def step_options(args: argparse.Namespace, filter_patch: int | None) -> dict:
    """Keyword arguments of gftvm.compile for the arguments, with gradient filtering of patch
    ``filter_patch`` (None: exact backprop)."""
    trainable = args.train if args.train == "all" or args.train.startswith("last:") \
        else args.train.split(",")
    grad_filter = None
    if filter_patch is not None:
        layers = args.filter_layers if args.filter_layers.startswith("last:") \
            else args.filter_layers.split(",")
        grad_filter = gftvm.GradientFilter(filter_patch, layers)
    return dict(trainable=trainable, batch_size=args.batch, optimizer=args.optimizer,
                lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                filter=grad_filter)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    log = lambda message: print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)
    model = model_path(args, args.output, log)
    try:
        artifact = gftvm.compile(model, target=args.target, progress=log,
                                 **step_options(args, args.filter_patch))
        artifact.save(args.output)
    except gftvm.GftvmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log(f"saved the artifact to {args.output}")
    print(artifact.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
