#!/usr/bin/env python
"""Compile a forward ONNX model's train step into an artifact directory.

    python tools/compile.py [MODEL.onnx] --target host --train last:4 --batch 8 \
        --optimizer sgd --lr 0.05 [--filter-patch 2 --filter-layers last:4] -o OUT_DIR
    python tools/compile.py MODEL.onnx --train last:8 --filter auto --budget-ms 40 -o OUT_DIR
    python tools/compile.py --from-ort ORT_ARTIFACT_DIR [--lr 0.001] [--filter-...] -o OUT_DIR

``--filter auto`` chooses the gradient-filter plan (last K trained convs, R2 or R4) whose
modelled train step fits ``--budget-ms`` (gftvm/flash/filter_search.py; the ms-per-MAC
coefficient is fitted to docs/flash/TARGET_latency.json).

Without MODEL.onnx it exports and compiles the bundled default model (gftvm.models). With
--from-ort it compiles an onnxruntime-training artifact: its training graph, trained and frozen
parameters, optimizer and checkpoint (--train, --optimizer, --momentum, --weight-decay do not
apply; --lr defaults to ORT's 0.001, --batch to the artifact's).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import gftvm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="forward ONNX model (default: bundled model)")
    parser.add_argument("--from-ort", metavar="DIR", help="an onnxruntime-training artifact "
                        "directory (training_model.onnx, eval_model.onnx, optimizer_model.onnx, "
                        "checkpoint) instead of a forward model")
    parser.add_argument("--target", default="host",
                        help="host (this machine) or cortex-a72 (Raspberry Pi 4, aarch64)")
    parser.add_argument("--train", help="'all', 'last:K' or comma-separated "
                        "initializer names (default: all)")
    parser.add_argument("--batch", type=int, help="batch size (default: 8)")
    parser.add_argument("--optimizer", choices=["sgd", "adam"])
    parser.add_argument("--lr", type=float, help="learning rate (default: 0.05)")
    parser.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    parser.add_argument("--weight-decay", type=float, help="(default: 0)")
    parser.add_argument("--filter-patch", type=int, metavar="R",
                        help="gradient filtering with patch size R (default: exact backprop)")
    parser.add_argument("--filter-layers", default="last:4", metavar="LAYERS",
                        help="'last:K' or comma-separated ONNX Conv node names (default last:4)")
    parser.add_argument("--filter", choices=["auto"],
                        help="auto: choose the filter plan under --budget-ms (FLASH's SHGO)")
    parser.add_argument("--budget-ms", type=float, help="modelled train-step budget for "
                        "--filter auto")
    parser.add_argument("--latency", help="latency measurements for --filter auto (default "
                        "docs/flash/TARGET_latency.json)")
    parser.add_argument("--image-size", type=int, default=32,
                        help="input size of the bundled model (default: 32)")
    parser.add_argument("-o", "--output", default="out/artifact", help="artifact directory")
    return parser.parse_args(argv)


FORWARD_DEFAULTS = {"train": "all", "batch": 8, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
                    "weight_decay": 0.0}


def auto_filter(model: str, trainable, args: argparse.Namespace, log
                ) -> gftvm.GradientFilter | None:
    """The plan of --filter auto (None: the exact step fits the budget)."""
    import json

    from gftvm.flash import filter_search

    if args.budget_ms is None or args.filter_patch is not None:
        raise gftvm.ConfigError("--filter auto needs --budget-ms and no --filter-patch")
    path = args.latency or os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                        "docs", "flash", f"{args.target}_latency.json")
    try:
        with open(path) as f:
            ms_per_mac = filter_search.step_ms_per_mac(json.load(f))
    except OSError as err:
        raise gftvm.ConfigError(f"--filter auto needs train-step measurements for target "
                                f"{args.target}: {err} (tools/search.py measure)") from err
    costs = filter_search.layer_costs(model, trainable, args.batch)
    choice = filter_search.choose_filter(costs, ms_per_mac, args.budget_ms)
    exact = filter_search.modelled_ms(costs, ms_per_mac)
    if choice is None:
        log(f"filter auto: the exact step (modelled {exact:.1f} ms) fits {args.budget_ms} ms")
        return None
    log(f"filter auto: last {choice.layers} trained convs at R{choice.patch}, modelled "
        f"{choice.modelled_ms:.1f} ms per step (exact {exact:.1f} ms, budget {args.budget_ms})")
    return filter_search.gradient_filter(costs, choice)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    log = lambda message: print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)
    grad_filter = None
    if args.filter_patch is not None:
        layers = args.filter_layers if args.filter_layers.startswith("last:") \
            else args.filter_layers.split(",")
        grad_filter = gftvm.GradientFilter(args.filter_patch, layers)
    if args.from_ort:
        return compile_ort(args, grad_filter, log)
    for name, value in FORWARD_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    model = args.model
    if model is None:
        from gftvm import models

        os.makedirs(args.output, exist_ok=True)
        model = os.path.join(args.output, "model.onnx")
        import torch
        from gftvm.data import synthetic

        log(f"exporting the bundled model {models.DEFAULT_MODEL} "
            f"({args.image_size}x{args.image_size}, BN calibrated on generated data) to {model}")
        images, _ = synthetic(64, image_size=args.image_size, seed=0)
        models.export_zoo_model(models.DEFAULT_MODEL, model, args.image_size,
                                calibration=torch.from_numpy(images))
    trainable = args.train if args.train == "all" or args.train.startswith("last:") \
        else args.train.split(",")
    try:
        if args.filter == "auto":
            grad_filter = auto_filter(model, trainable, args, log)
        artifact = gftvm.compile(model, target=args.target, trainable=trainable,
                                 batch_size=args.batch, optimizer=args.optimizer, lr=args.lr,
                                 momentum=args.momentum, weight_decay=args.weight_decay,
                                 filter=grad_filter, progress=log)
        artifact.save(args.output)
    except gftvm.GftvmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return finish(artifact, args.output, log)


def compile_ort(args: argparse.Namespace, grad_filter, log) -> int:
    """--from-ort: compile an onnxruntime-training artifact directory."""
    given = [f"--{name.replace('_', '-')}" for name in ("train", "optimizer", "momentum",
                                                       "weight_decay", "filter")
             if getattr(args, name) is not None]
    if given or args.model:
        print(f"error: {given or [args.model]} do not apply with --from-ort (the artifact holds "
              f"the model, trained parameters and optimizer)", file=sys.stderr)
        return 2
    from gftvm.compiler import ORT_DEFAULT_LR, compile_ort as compile_artifact

    try:
        artifact = compile_artifact(args.from_ort, target=args.target, batch_size=args.batch,
                                    lr=ORT_DEFAULT_LR if args.lr is None else args.lr,
                                    filter=grad_filter, progress=log)
        artifact.save(args.output)
    except gftvm.GftvmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return finish(artifact, args.output, log)


def finish(artifact, output: str, log) -> int:
    log(f"saved the artifact to {output}")
    print(artifact.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
