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

DEFAULT_BATCH, DEFAULT_LR = 8, 0.05
#: Options of a forward model that an ORT artifact fixes itself.
FORWARD_ONLY = ("train", "optimizer", "momentum", "weight_decay", "filter")


def add_model_arguments(parser: argparse.ArgumentParser, several_patches: bool = False) -> None:
    """The options that define a train step (shared with tools/tune.py, where
    ``--filter-patch`` takes several patch sizes: one filtered step each, plus exact backprop)."""
    parser.add_argument("model", nargs="?", help="forward ONNX model (default: bundled model)")
    parser.add_argument("--target", default="host",
                        help="host (this machine) or cortex-a72 (Raspberry Pi 4, aarch64)")
    parser.add_argument("--train", default="all", help="'all', 'last:K' or comma-separated "
                        "initializer names (default: all)")
    parser.add_argument("--batch", type=int, help=f"batch size (default: {DEFAULT_BATCH})")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--lr", type=float, help=f"learning rate (default: {DEFAULT_LR})")
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
    parser.add_argument("--from-ort", metavar="DIR", help="an onnxruntime-training artifact "
                        "directory (training_model.onnx, eval_model.onnx, optimizer_model.onnx, "
                        "checkpoint) instead of a forward model")
    parser.add_argument("--filter", choices=["auto"],
                        help="auto: choose the filter plan under --budget-ms (FLASH's SHGO)")
    parser.add_argument("--budget-ms", type=float, help="modelled train-step budget for "
                        "--filter auto")
    parser.add_argument("--latency", help="latency measurements for --filter auto (default "
                        "docs/flash/TARGET_latency.json)")
    parser.add_argument("--no-winograd", dest="winograd", action="store_false",
                        help="keep 3x3 stride-1 convs direct (default: Winograd F(4x4, 3x3) "
                        "products on CPU targets; see passes/winograd.py)")
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


def gradient_filter(args: argparse.Namespace, patch: int | None) -> gftvm.GradientFilter | None:
    """The filter of patch ``patch`` on --filter-layers (None: exact backprop)."""
    if patch is None:
        return None
    layers = args.filter_layers if args.filter_layers.startswith("last:") \
        else args.filter_layers.split(",")
    return gftvm.GradientFilter(patch, layers)


def step_options(args: argparse.Namespace, filter_patch: int | None) -> dict:
    """Keyword arguments of gftvm.compile for the arguments, with gradient filtering of patch
    ``filter_patch`` (None: exact backprop)."""
    trainable = args.train if args.train == "all" or args.train.startswith("last:") \
        else args.train.split(",")
    return dict(trainable=trainable, batch_size=args.batch or DEFAULT_BATCH,
                optimizer=args.optimizer, lr=DEFAULT_LR if args.lr is None else args.lr,
                momentum=args.momentum, weight_decay=args.weight_decay,
                filter=gradient_filter(args, filter_patch))


def auto_filter(model: str, options: dict, args: argparse.Namespace, log
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
    costs = filter_search.layer_costs(model, options["trainable"], options["batch_size"])
    choice = filter_search.choose_filter(costs, ms_per_mac, args.budget_ms)
    exact = filter_search.modelled_ms(costs, ms_per_mac)
    if choice is None:
        log(f"filter auto: the exact step (modelled {exact:.1f} ms) fits {args.budget_ms} ms")
        return None
    log(f"filter auto: last {choice.layers} trained convs at R{choice.patch}, modelled "
        f"{choice.modelled_ms:.1f} ms per step (exact {exact:.1f} ms, budget {args.budget_ms})")
    return filter_search.gradient_filter(costs, choice)


def compile_artifact(args: argparse.Namespace, log) -> gftvm.compiler.Artifact:
    """The artifact of the arguments: a forward model's, or (--from-ort) an ORT artifact's."""
    if args.from_ort:
        defaults = vars(parse_args([]))
        given = [f"--{name.replace('_', '-')}" for name in FORWARD_ONLY
                 if getattr(args, name) != defaults[name]]
        if given or args.model:
            raise gftvm.ConfigError(f"{given or [args.model]} do not apply with --from-ort (the "
                                    f"artifact holds the model, trained parameters and "
                                    f"optimizer)")
        from gftvm.compiler import ORT_DEFAULT_LR

        return gftvm.compile(args.from_ort, target=args.target, batch_size=args.batch,
                             lr=ORT_DEFAULT_LR if args.lr is None else args.lr,
                             filter=gradient_filter(args, args.filter_patch),
                             winograd=args.winograd, progress=log)
    model = model_path(args, args.output, log)
    options = step_options(args, args.filter_patch)
    if args.filter == "auto":
        options["filter"] = auto_filter(model, options, args, log)
    return gftvm.compile(model, target=args.target, winograd=args.winograd, progress=log,
                         **options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    log = lambda message: print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)
    try:
        artifact = compile_artifact(args, log)
        artifact.save(args.output)
    except gftvm.GftvmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log(f"saved the artifact to {args.output}")
    print(artifact.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
