#!/usr/bin/env python
"""Benchmarks, measured side by side in one run with the same thread count.

    python tools/bench.py steps  [--models ...] [--train all last:4] [--batch 8] [--filter-patch 2]
        train-step time: gftvm's compiled step, untuned and with schedules/host/ records, vs
        PyTorch eager (BN in eval mode, SGD+momentum; gradient filtering: gftvm.reference)
    python tools/bench.py ort    [--models ...] [--filter-layers last:4] [--batch 8]
        train-step time of one onnxruntime-training artifact (32x32, SGD): in ORT's training
        API vs compiled by gftvm, exact (BP) and with gradient filtering R2 (GF)
    python tools/bench.py layers [--patch 2 4] [--batch 8] [--csv F] [--plot F]
        per-layer conv backward on the paper's shapes: gftvm's compiled gradient-filter
        backward vs PyTorch's oneDNN exact backward (grad_x + grad_w) vs PyTorch-eager
        gradient filtering, and the memory-traffic floor (gy read + grad_x written)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import platform
import sys
import tempfile
import time

from gftvm.timing import median_ms

# (channels, height, width) of the paper's per-layer timing; 3x3 convs, stride 1.
PAPER_SHAPES = [(128, 120, 160), (256, 60, 80), (512, 30, 40), (512, 14, 14), (256, 14, 14),
                (128, 28, 28), (64, 56, 56)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=10, help="timed runs (after warm-up)")
    sub = parser.add_subparsers(dest="command", required=True)
    steps = sub.add_parser("steps", help="whole train steps vs PyTorch eager")
    steps.add_argument("--models", nargs="+", default=["mobilenetv2-0.35", "resnet18", "mcunet"])
    steps.add_argument("--train", nargs="+", default=["all", "last:4"])
    steps.add_argument("--image-size", type=int, default=32)
    steps.add_argument("--filter-patch", type=int, nargs="*", default=[],
                       help="also gradient-filtered steps (same layers as --train) with these R")
    steps.add_argument("--csv", default="bench/results/steps.csv",
                       help="rows, with the machine description and load in comments")
    ort = sub.add_parser("ort", help="an ORT artifact in ORT vs compiled by gftvm (BP, GF)")
    ort.add_argument("--models", nargs="+", default=["mobilenetv2-0.35", "resnet18", "mcunet"])
    ort.add_argument("--filter-layers", default="last:4")
    layers = sub.add_parser("layers", help="per-layer backward on the paper's shapes")
    layers.add_argument("--patch", nargs="+", type=int, default=[2, 4])
    layers.add_argument("--csv", default="out/bench_layers.csv")
    layers.add_argument("--plot", default="out/bench_layers.png")
    return parser.parse_args()


def bench_steps(args: argparse.Namespace) -> None:
    import copy

    import torch

    import gftvm
    from gftvm import models
    from gftvm.data import synthetic
    from gftvm.reference import filter_convs

    images, labels = synthetic(args.batch, image_size=args.image_size)
    x_t, y_t = torch.from_numpy(images), torch.from_numpy(labels)
    print("gftvm: compiled step without tuned schedules; tuned: with schedules/host/ (count of "
          "kernels with a record); torch: PyTorch eager, same math (GF: gftvm.reference)")
    print(f"{'model':18} {'train':8} {'method':6} {'gftvm ms':>10} {'tuned ms':>10} "
          f"{'kernels':>8} {'torch ms':>10} {'torch/gftvm':>12} {'torch/tuned':>12}")
    rows = []
    for name, spec, patch in itertools.product(args.models, args.train, [None, *args.filter_patch]):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            model = models.export_zoo_model(name, path, args.image_size, calibration=x_t)
            options = dict(trainable=spec, batch_size=args.batch, optimizer="sgd", lr=1e-3,
                           momentum=0.9,
                           filter=None if patch is None else gftvm.GradientFilter(patch, spec))
            timings = {}
            for schedules in (False, True):
                artifact = gftvm.compile(path, schedules=schedules, **options)
                tuned = artifact.manifest["tuned_kernels"]
                if schedules and not tuned:
                    break
                artifact.save(os.path.join(tmp, str(schedules)))
                session = gftvm.runtime.load(os.path.join(tmp, str(schedules)))
                timings[schedules] = median_ms(lambda: session.step(images, labels),
                                               args.repeat)

        if patch is not None:
            model = copy.deepcopy(model)
            filter_convs(model, {layer["weight"].removesuffix(".weight"): layer["patch"]
                                 for layer in artifact.manifest["gradient_filter"]["plan"]})
        trained = set(artifact.manifest["trainable"])
        for n, p in model.named_parameters():
            p.requires_grad_(n in trained)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                              momentum=0.9)

        def torch_step() -> None:
            loss = torch.nn.functional.cross_entropy(model(x_t), y_t)
            opt.zero_grad()
            loss.backward()
            opt.step()

        torch_ms = median_ms(torch_step, args.repeat)
        method = "BP" if patch is None else f"GF R{patch}"
        tuned_ms = timings.get(True)
        tuned_cols = (f"{tuned_ms:10.1f} {tuned:8d}" if tuned_ms else f"{'-':>10} {0:8d}")
        ratio = f"{torch_ms / tuned_ms:12.2f}" if tuned_ms else f"{'-':>12}"
        print(f"{name:18} {spec:8} {method:6} {timings[False]:10.1f} {tuned_cols} "
              f"{torch_ms:10.1f} {torch_ms / timings[False]:12.2f} {ratio}", flush=True)
        rows.append([name, spec, method, round(timings[False], 3),
                     round(tuned_ms, 3) if tuned_ms else "", tuned, round(torch_ms, 3)])
    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        f.write(f"# {machine_description(args)}\n")
        csv.writer(f).writerows([["model", "train", "method", "gftvm_ms", "tuned_ms",
                                  "tuned_kernels", "torch_ms"], *rows])
    plot = os.path.splitext(args.csv)[0] + ".png"
    plot_steps(rows, f"train step, {machine_description(args)}", plot)
    print(f"wrote {args.csv} and {plot}")


def bench_ort(args: argparse.Namespace) -> None:
    import onnxruntime
    import torch
    from onnxruntime.training import api as ort_api

    import gftvm
    from gftvm import models
    from gftvm.data import synthetic
    from gftvm.frontend import ort

    images, labels = synthetic(args.batch, image_size=32)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = args.threads
    lr = 1e-3
    print(f"{'model':18} {'ORT ms':>9} {'gftvm BP ms':>12} {'gftvm GF ms':>12} "
          f"{'ORT/BP':>7} {'ORT/GF':>7}  (GF: R2, {args.filter_layers})")
    for name in args.models:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            ort.generate_artifacts(models.build(name), tmp, (args.batch, 3, 32, 32))
            state = ort_api.CheckpointState.load_checkpoint(os.path.join(tmp, ort.CHECKPOINT))
            module = ort_api.Module(os.path.join(tmp, ort.TRAINING), state,
                                    os.path.join(tmp, ort.EVAL), session_options=options)
            optimizer = ort_api.Optimizer(os.path.join(tmp, ort.OPTIMIZER), module)
            optimizer.set_learning_rate(lr)
            module.train()

            def ort_step() -> None:
                module(images, labels)
                optimizer.step()
                module.lazy_reset_grad()

            ort_ms = median_ms(ort_step, args.repeat)
            gftvm_ms = []
            for grad_filter in (None, gftvm.GradientFilter(2, args.filter_layers)):
                artifact = os.path.join(tmp, "gf" if grad_filter else "bp")
                gftvm.compile(tmp, lr=lr, filter=grad_filter).save(artifact)
                session = gftvm.runtime.load(artifact)
                gftvm_ms.append(median_ms(lambda: session.step(images, labels), args.repeat))
        bp, gf = gftvm_ms
        print(f"{name:18} {ort_ms:9.1f} {bp:12.1f} {gf:12.1f} {ort_ms / bp:7.2f} "
              f"{ort_ms / gf:7.2f}", flush=True)


def compiled_filtered_backward(layer):
    """backward(gy, x_sum, w) -> (grad_x, grad_w): the pass's filtered ops, compiled alone."""
    import tvm
    from tvm import relax

    from gftvm import targets
    from gftvm.passes.gradient_filter import (filtered_grad_input, filtered_grad_weight,
                                              pooled_gradient)

    n, c = layer.x_shape[:2]
    tensor = lambda name, shape: relax.Var(name, relax.TensorType(shape, "float32"))
    gy, x_sum = tensor("gy", layer.y_shape), tensor("x_sum", (n, c, *layer.blocks))
    w = tensor("w", layer.w_shape)
    bb = relax.BlockBuilder()
    with bb.function("backward", [gy, x_sum, w]):
        with bb.dataflow():
            g_pool = pooled_gradient(bb, gy, layer)
            grad_x = bb.emit(filtered_grad_input(bb, g_pool, w, layer))
            grad_w = bb.emit(filtered_grad_weight(bb, g_pool, x_sum, layer))
            out = bb.emit_output(relax.Tuple([grad_x, grad_w]))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), targets.get("host").tvm_target()), tvm.cpu())
    return vm["backward"]


def eager_filtered_backward(gy, x_sum, w, patch):
    """Gradient filtering in PyTorch eager, same semantics (stride 1, 'same' padding)."""
    import torch
    import torch.nn.functional as F

    g_pool = F.avg_pool2d(gy, patch, patch, ceil_mode=True, count_include_pad=False)
    low = F.conv_transpose2d(g_pool, w.sum((2, 3), keepdim=True))
    grad_x = low.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    grad_x = grad_x[:, :, :gy.shape[2], :gy.shape[3]]
    grad_w = torch.einsum("nopq,nipq->oi", g_pool, x_sum)[:, :, None, None].expand_as(w)
    return grad_x, grad_w


def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write)."""
    import torch

    src, dst = torch.ones(64 << 20), torch.empty(64 << 20)
    return 2 * src.numel() * 4 / (median_ms(lambda: dst.copy_(src), 5) / 1e3)


def bench_layers(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import tvm

    from gftvm.passes.gradient_filter import ConvGeometry

    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = ["C", "H", "W", "R", "gftvm_gf_ms", "torch_bp_ms", "eager_gf_ms", "floor_ms",
              "bp/gf", "eager/gf", "gf/floor"]
    print(" ".join(f"{h:>11}" for h in header))
    rows = []
    n = args.batch
    for c, h, w in PAPER_SHAPES:
        rng = np.random.default_rng(0)
        x = torch.from_numpy(rng.normal(size=(n, c, h, w)).astype(np.float32))
        gy = torch.from_numpy(rng.normal(size=(n, c, h, w)).astype(np.float32))
        weight = torch.from_numpy(rng.normal(size=(c, c, 3, 3)).astype(np.float32))
        torch_bp = median_ms(lambda: torch.ops.aten.convolution_backward(
            gy, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [True, True, False]), args.repeat)
        for patch in args.patch:
            layer = ConvGeometry(patch, (n, c, h, w), (c, c, 3, 3), (n, c, h, w), (1, 1),
                                 (1, 1), 1)
            x_sum = torch.nn.functional.avg_pool2d(x, patch, patch, ceil_mode=True) * patch ** 2
            backward = compiled_filtered_backward(layer)
            inputs = [tvm.runtime.tensor(t.numpy()) for t in (gy, x_sum, weight)]
            gf = median_ms(lambda: backward(*inputs), args.repeat)
            eager = median_ms(lambda: eager_filtered_backward(gy, x_sum, weight, patch),
                              args.repeat)
            floor = 2 * gy.numel() * 4 / bandwidth * 1e3
            row = [c, h, w, patch, gf, torch_bp, eager, floor, torch_bp / gf, eager / gf,
                   gf / floor]
            rows.append(row)
            print(" ".join(f"{v:>11.2f}" if isinstance(v, float) else f"{v:>11}" for v in row),
                  flush=True)
    os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    plot_layers(rows, args.plot)
    print(f"wrote {args.csv} and {args.plot}")


def pyplot():
    """matplotlib.pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_steps(rows: list[list], title: str, path: str) -> None:
    """Grouped bars: ms per step of each method (gftvm untuned, tuned, PyTorch) per config."""
    import numpy as np

    plt = pyplot()
    labels = [f"{model}\n{train} {method}" for model, train, method, *_ in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 4))
    for offset, (column, name) in zip((-0.27, 0, 0.27), [(3, "gftvm untuned"),
                                                          (4, "gftvm tuned"),
                                                          (6, "PyTorch eager")]):
        ms = [r[column] or 0 for r in rows]
        bars = ax.bar(x + offset, ms, 0.27, label=name)
        ax.bar_label(bars, [f"{v:.1f}" if v else "-" for v in ms], fontsize=7)
    values = [v for r in rows for v in (r[3], r[4], r[6]) if v]
    ax.set_yscale("log" if max(values) > 30 * min(values) else "linear")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("ms per train step")
    ax.set_title(title, fontsize=7, pad=24)
    ax.legend(fontsize=8, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_layers(rows: list[list], path: str) -> None:
    plt = pyplot()
    labels = [f"{r[0]}ch {r[1]}x{r[2]} R{r[3]}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for column, name in [(4, "gftvm GF (compiled)"), (5, "PyTorch BP (oneDNN)"),
                         (6, "PyTorch eager GF"), (7, "memory floor")]:
        ax.plot(labels, [r[column] for r in rows], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_ylabel("backward time (ms)")
    ax.tick_params(axis="x", rotation=60)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def machine_description(args: argparse.Namespace) -> str:
    import tvm

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"machine: {platform.machine()} ({tvm.target.codegen.llvm_get_system_cpu()}), "
            f"{os.cpu_count()} cores, load average {load}; threads={args.threads}, "
            f"batch={args.batch}, median of {args.repeat} runs")


def main() -> int:
    args = parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    import torch

    torch.set_num_threads(args.threads)
    print(machine_description(args))
    {"steps": bench_steps, "ort": bench_ort, "layers": bench_layers}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
