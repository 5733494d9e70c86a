#!/usr/bin/env python
"""Benchmarks, measured side by side in one run with the same thread count.

    python tools/bench.py steps  [--models ...] [--train all last:4] [--image-size 32 128]
                                 [--filter-patch 2 4] [--no-naive]      (--batch 8 or 32)
        train step of each model, trainable set and method (BP; GF per --filter-patch):
        gftvm's compiled step with TVM's naive loops (naive), with gftvm's default schedules
        (gftvm) and with schedules/host/ records too (tuned), gftvm.compile's
        seconds with schedules (compile s), PyTorch eager BP and GF of the same layers (BN in
        inference mode, as gftvm; GF: gftvm.reference), PyTorch forward + update (fwd+upd: the
        BP step without its backward: forward under no_grad, the same SGD-momentum step on
        gradients set once; the lower bound of any method that only cuts backward work, with
        PyTorch's kernels: a step cutting backward work alone is at most tBP/fwd+upd times
        faster than PyTorch BP, so a 2x goal is reachable that way only where
        2 x fwd+upd < torch BP), onnxruntime-training BP of the same
        model and trainable set (its artifacts train BN on batch statistics; "-" where the
        trainable set cannot be matched). SGD, momentum 0.9 (ORT: SGD). Every step is timed
        alone in a fresh process; a model's steps are all compiled first, then timed in turn
        in --rounds rounds (default 3; naive: one), and the median round counts, so ratios
        compare steps timed minutes apart at most. The first round also measures peak memory
        (MiB): the peak
        resident memory that the first --memory-steps steps add over the loaded model,
        parameters and optimizer state (exactly: tools/bench_steps.py); gftvm's (tuned if it
        has records) is printed next to PyTorch's (same method), ORT's and gftvm's static
        plan, the manifest's saved_context_bytes. Writes the CSV (with the machine
        description) and one plot per image size next to it.
    python tools/bench.py profile [--model mobilenetv2-0.35] [--train last:4] [--filter-patch 2]
        per-kernel time of the compiled train step (with schedules/host/), BP and GF side by
        side: kernel families and each method's top kernels (calls, us, % of the step);
        written to bench/results/profile_*.txt (tools/bench_profile.py says how it is timed)
    python tools/bench.py ort    [--models ...] [--filter-layers last:4] [--batch 8]
        train-step time of one onnxruntime-training artifact (32x32, SGD): in ORT's training
        API vs compiled by gftvm, exact (BP) and with gradient filtering R2 (GF)
    python tools/bench.py --rounds 8 records [--models ...] [--train last:4] [--image-size 32]
                                             [--filter-patch 2 4]
        what the tuning records (schedules/host/, this CPU's) buy: each train step compiled
        with default schedules only and with the records too, both loaded in this process
        and timed in turn in --rounds rounds (a fresh process per run, as in steps, varies by
        over 20 % here, more than most records gain); steps no record applies to are left
        out. Columns: the median round of each, default/tuned, and in how many rounds tuned
        was the faster.
    python tools/bench.py layers [--patch 2 4] [--shapes CxHxW ...] [--batch 8] [--csv F]
                                 [--plot F] [--profile F]
        per-layer conv backward on the paper's shapes: gftvm's compiled gradient-filter
        backward vs PyTorch's oneDNN exact backward (grad_x + grad_w) vs PyTorch-eager
        gradient filtering, and the roofline floor of the filtered backward: the larger of
        its memory-traffic floor (its inputs gy, x_sum and W read, grad_x and grad_w written,
        at the speed of a copy of as many bytes, timed like the backward on buffers reused
        between runs, so from cache where they fit: copy_GBps) and its compute floor (its
        FLOPs, filtered_backward_flops, at the fp32 peak measured in the run: fma_peak_rate,
        multiply-adds in registers only). A shape's BP, GF and eager GF backwards are timed
        in turn in --rounds rounds; the median round counts.
        bp/floor is the speedup over oneDNN's backward that the floor
        allows: where it is below a goal (20x at R2, 60x at R4), no filtered backward on this
        machine can reach that goal. --profile F: each kernel of every filtered backward
        timed alone, its FLOP/s against the FMA peak and argument bytes/s against the copy
        speed, and its cost inside the backward (the backward minus the backward with it
        skipped: what the kernel reads from memory rather than cache counts there).
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from gftvm.timing import median_ms

if TYPE_CHECKING:
    import tvm
    from tvm import relax

    from gftvm.passes.gradient_filter import ConvGeometry

MIB = 1 << 20
# (channels, height, width) of the paper's per-layer timing; 3x3 convs, stride 1.
PAPER_SHAPES = [(128, 120, 160), (256, 60, 80), (512, 30, 40), (512, 14, 14), (256, 14, 14),
                (128, 28, 28), (64, 56, 56)]


def layer_shape(text: str) -> tuple[int, int, int]:
    """``CxHxW`` -> (C, H, W)."""
    parts = text.split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected CxHxW, e.g. 512x14x14")
    return tuple(int(p) for p in parts)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=10, help="timed runs (after warm-up)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="steps, layers: interleaved rounds in which every variant is "
                             "timed; the median round counts")
    parser.add_argument("--memory-steps", type=int, default=3,
                        help="steps, ort: first steps of each measured train step, counted "
                             "for peak memory and the timing's warm-up")
    sub = parser.add_subparsers(dest="command", required=True)
    steps = sub.add_parser("steps", help="whole train steps vs PyTorch eager and ORT")
    steps.add_argument("--models", nargs="+", default=["mobilenetv2-0.35", "resnet18", "mcunet"])
    steps.add_argument("--train", nargs="+", default=["all", "last:4"])
    steps.add_argument("--image-size", type=int, nargs="+", default=[32])
    steps.add_argument("--filter-patch", type=int, nargs="*", default=[],
                       help="also gradient-filtered steps (same layers as --train) with these R")
    steps.add_argument("--no-naive", action="store_true",
                       help="leave out TVM's naive loops, a reference only (a ResNet-18 step "
                            "at 128x128 takes seconds at batch 8)")
    steps.add_argument("--csv", default="bench/results/steps.csv",
                       help="rows, with the machine description and load in comments; plots "
                            "go next to it as <csv stem>_<image size>px.png")
    profile = sub.add_parser("profile", help="per-kernel time of the compiled train step")
    profile.add_argument("--model", default="mobilenetv2-0.35")
    profile.add_argument("--train", default="last:4")
    profile.add_argument("--image-size", type=int, default=32)
    profile.add_argument("--filter-patch", type=int, nargs="*", default=[2],
                         help="GF steps profiled next to BP, one per R")
    profile.add_argument("--top", type=int, default=15, help="kernels listed per method")
    profile.add_argument("--out", help="default: bench/results/profile_<config>.txt")
    ort = sub.add_parser("ort", help="an ORT artifact in ORT vs compiled by gftvm (BP, GF)")
    ort.add_argument("--models", nargs="+", default=["mobilenetv2-0.35", "resnet18", "mcunet"])
    ort.add_argument("--filter-layers", default="last:4")
    records = sub.add_parser("records", help="train steps with and without tuning records, "
                                             "in one process")
    records.add_argument("--models", nargs="+", default=["mobilenetv2-0.35", "resnet18"])
    records.add_argument("--train", nargs="+", default=["last:4"])
    records.add_argument("--image-size", type=int, nargs="+", default=[32])
    records.add_argument("--filter-patch", type=int, nargs="*", default=[2, 4])
    records.add_argument("--csv", default="out/bench_records.csv")
    layers = sub.add_parser("layers", help="per-layer backward on the paper's shapes")
    layers.add_argument("--patch", nargs="+", type=int, default=[2, 4])
    layers.add_argument("--shapes", nargs="+", type=layer_shape, default=PAPER_SHAPES,
                        metavar="CxHxW", help="conv shapes (default: the paper's)")
    layers.add_argument("--csv", default="out/bench_layers.csv")
    layers.add_argument("--plot", default="out/bench_layers.png")
    layers.add_argument("--profile", metavar="FILE",
                        help="also time each kernel of every filtered backward alone, with its "
                             "share of the FMA peak and of the copy speed, and its cost inside "
                             "the backward (the backward minus the backward with it skipped), "
                             "into FILE")
    return parser.parse_args()


STEP_COLUMNS = ["model", "train", "method", "image_size", "batch", "naive_ms", "direct_ms",
                "gftvm_ms", "tuned_ms", "tuned_kernels", "compile_s", "torch_bp_ms", "torch_gf_ms",
                "torch_fwd_upd_ms", "ort_bp_ms",
                "gftvm_peak_mib", "torch_peak_mib", "ort_peak_mib", "saved_context_mib"]


def bench_steps(args: argparse.Namespace) -> None:
    print("naive: compiled step with TVM's naive loops; gftvm: with gftvm's default schedules; "
          "tuned: with schedules/host/ records too (kernels: how many "
          "got a record), compile s: gftvm.compile with schedules; torch BP / GF: PyTorch eager, "
          "same layers trained, exact / filtered (gftvm.reference), BN inference mode; fwd+upd: "
          "PyTorch's forward (no_grad) and SGD-momentum update without backward, the bound of "
          "any method that only cuts backward work (tBP/f+u: the largest speedup over torch BP "
          "it allows); ORT BP: "
          "onnxruntime-training, same trainable set, BN on batch statistics ('-': not "
          "expressible); ratios: over tuned gftvm (untuned if no record). Peak MiB: memory the "
          "first steps add at their peak over the loaded model (gftvm: tuned if it has records; "
          "torch: same method); plan: gftvm's saved context. Each step is timed and measured "
          "alone in a fresh process (tools/bench_steps.py), all of a row group's in turn, "
          f"in {args.rounds} rounds: the median round counts (naive: one round)")
    print(STEP_HEADER)
    rows = []
    for size, name, spec in itertools.product(args.image_size, args.models, args.train):
        rows += bench_config(args, name, spec, size)
    write_csv(args.csv, machine_description(args), STEP_COLUMNS, rows)
    for size in args.image_size:
        plot = f"{os.path.splitext(args.csv)[0]}_{size}px.png"
        plot_steps([r for r in rows if r["image_size"] == size],
                   f"train step {size}x{size}, {machine_description(args)}", plot)
        print(f"wrote {plot}")


def bench_config(args: argparse.Namespace, name: str, spec: str, size: int) -> list[dict]:
    """The rows of one model and trainable set: BP, then GF for each --filter-patch. Every
    variant is compiled first, then all are timed in ``--rounds`` interleaved rounds (each a
    fresh process; the median round counts), so that the ratios compare steps measured under
    the same machine conditions. TVM's naive loops, a reference only, are timed once."""
    import onnx
    import torch

    from gftvm import trainable
    from bench_steps import MODEL_STATE

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, model = export_model(args, name, size, tmp)
        torch.save(model.state_dict(), os.path.join(tmp, MODEL_STATE))
        base = {"batch": args.batch, "image_size": size}
        trained = trainable.resolve(onnx.load(onnx_path), spec)
        torch_bp = {"kind": "torch", "dir": tmp, "model": name, "trainable": trained,
                    "patches": {}, **base}
        variants = {"torch_bp": torch_bp,
                    "torch_fwd_upd": {**torch_bp, "kind": "torch_forward_update"}}
        ort_bp = ort_variant(model, trained, tmp, base)
        if ort_bp:
            variants["ort_bp"] = ort_bp
        compiled = {}
        for patch in [None, *args.filter_patch]:
            columns, manifest, gftvm_variants = compile_gftvm(args, onnx_path, spec, patch,
                                                              size, tmp)
            compiled[patch] = columns, manifest
            variants.update({(patch, column): v for column, v in gftvm_variants.items()})
            if patch:
                variants[(patch, "torch_gf")] = {**torch_bp, "patches": {
                    layer["weight"].removesuffix(".weight"): layer["patch"]
                    for layer in manifest["gradient_filter"]["plan"]}}
        results = measure_rounds(args, variants, once={(patch, "naive_ms") for patch in compiled})
    none = {"ms": None, "peak_mib": None}
    rows = []
    for patch, (columns, manifest) in compiled.items():
        gftvm_columns = {column: results[(patch, column)]["ms"] for column in
                         ("naive_ms", "direct_ms", "gftvm_ms", "tuned_ms")
                         if (patch, column) in results}
        torch_result = results.get((patch, "torch_gf"), results["torch_bp"])
        ort_result = results.get("ort_bp", none)
        row = {"model": name, "train": spec, "method": "BP" if patch is None else f"GF R{patch}",
               **base, "naive_ms": None, "tuned_ms": None, **columns, **gftvm_columns,
               "gftvm_peak_mib": results.get((patch, "tuned_ms"),
                                             results[(patch, "gftvm_ms")])["peak_mib"],
               "torch_bp_ms": results["torch_bp"]["ms"],
               "torch_gf_ms": patch and results[(patch, "torch_gf")]["ms"],
               "torch_fwd_upd_ms": results["torch_fwd_upd"]["ms"],
               "ort_bp_ms": ort_result["ms"], "torch_peak_mib": torch_result["peak_mib"],
               "ort_peak_mib": ort_result["peak_mib"],
               "saved_context_mib": manifest["saved_context_bytes"] / MIB}
        print(format_step_row(row), flush=True)
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def interleaved_rounds(rounds: int, variants: dict, measure, once: Collection = ()
                       ) -> dict[object, list]:
    """``measure(variant)`` of every variant in each of ``rounds`` rounds, the variants in turn
    (those in ``once``: the first round only), so that a slow stretch of a shared machine
    falls on all of them alike: each key's results, one per round."""
    results = {key: [] for key in variants}
    for round_ in range(rounds):
        for key, variant in variants.items():
            if round_ == 0 or key not in once:
                results[key].append(measure(variant))
    return results


def measure_rounds(args: argparse.Namespace, variants: dict, once: set) -> dict:
    """``ms`` (median over ``args.rounds`` rounds, one fresh process per variant and round,
    the variants in turn) and ``peak_mib`` (of the first round) of each variant; those in
    ``once`` are measured in the first round only."""
    rounds = interleaved_rounds(args.rounds, variants, lambda v: measure(args, v), once)
    return {key: {"ms": statistics.median(r["ms"] for r in results),
                  "peak_mib": results[0]["peak_mib"]} for key, results in rounds.items()}


def compile_gftvm(args: argparse.Namespace, onnx_path: str, spec: str, patch: int | None,
                  size: int, directory: str) -> tuple[dict, dict, dict]:
    """Compile with naive loops, default schedules without and with Winograd convs, and tuned
    records (if any kernel has one). Returns the row's compile columns, the manifest, and the
    step variants to time by column."""
    import gftvm

    options = step_options(args, spec, patch)
    columns, variants = {}, {}
    for column, schedules, default, winograd in [
            ("naive_ms", False, False, False), ("direct_ms", False, True, False),
            ("gftvm_ms", False, True, True), ("tuned_ms", True, True, True)]:
        if column == "naive_ms" and args.no_naive:
            continue
        start = time.perf_counter()
        artifact = gftvm.compile(onnx_path, schedules=schedules, default_schedule=default,
                                 winograd=winograd, **options)
        seconds = time.perf_counter() - start
        tuned = artifact.manifest["tuned_kernels"]
        if schedules:
            columns.update(compile_s=seconds, tuned_kernels=tuned)
        if schedules and not tuned:
            break
        variants[column] = {"kind": "gftvm", "batch": args.batch, "image_size": size,
                            "dir": os.path.join(directory, f"gftvm_{patch}_{column}")}
        artifact.save(variants[column]["dir"])
        manifest = artifact.manifest
    return columns, manifest, variants


def step_options(args: argparse.Namespace, spec: str, patch: int | None) -> dict:
    """``gftvm.compile`` options of a benchmarked train step: SGD with momentum, ``spec``
    trained, gradient filtering with R = ``patch`` on the same layers (None: exact BP)."""
    import gftvm

    return dict(trainable=spec, batch_size=args.batch, optimizer="sgd", lr=1e-3, momentum=0.9,
                filter=None if patch is None else gftvm.GradientFilter(patch, spec))


def ort_variant(model, trained: list[str], directory: str, base: dict) -> dict | None:
    """An onnxruntime-training artifact training exactly the ``trained`` parameters
    (everything else frozen), or None when ORT's artifact cannot match that set."""
    from gftvm.errors import ConfigError
    from gftvm.frontend import ort

    state = model.state_dict()
    frozen = [n for n, v in state.items() if v.is_floating_point() and n not in trained]
    variant = {"kind": "ort", "dir": os.path.join(directory, "ort"), **base}
    try:
        ort.generate_artifacts(model, variant["dir"],
                               (base["batch"], 3, base["image_size"], base["image_size"]),
                               frozen=frozen)
    except ConfigError as err:
        print(f"ORT: {err}")
        return None
    ort_trained = ort.signature(ort.load_artifact(variant["dir"])).trainable
    return variant if set(ort_trained) == set(trained) else None


def measure(args: argparse.Namespace, variant: dict) -> dict:
    """``ms`` and ``peak_mib`` of the variant's step, in a fresh process."""
    from bench_steps import measure_in_fresh_process

    return measure_in_fresh_process(variant, args.threads, args.repeat, args.memory_steps)


STEP_HEADER = (f"{'model':17} {'train':7} {'method':6} {'naive ms':>9} {'direct ms':>9} "
               f"{'gftvm ms':>9} {'tuned ms':>9} "
               f"{'kernels':>7} {'compile s':>9} {'torch BP':>9} {'torch GF':>9} {'fwd+upd':>9} "
               f"{'ORT BP':>9} {'tBP/gftvm':>9} {'tBP/f+u':>9} {'ORT/gftvm':>9} | "
               f"{'peak MiB: gftvm':>15} {'torch':>7} {'ORT':>7} {'plan':>7}")


def format_step_row(row: dict) -> str:
    cell = lambda value, width, digits=1: (f"{'-':>{width}}" if value is None
                                           else f"{value:{width}.{digits}f}")
    best = row["tuned_ms"] or row["gftvm_ms"]
    ratio = lambda key, over=best: cell(None if row[key] is None else row[key] / over, 9)
    memory = " ".join(cell(row.get(key), width, 2) for key, width in
                      [("gftvm_peak_mib", 15), ("torch_peak_mib", 7), ("ort_peak_mib", 7),
                       ("saved_context_mib", 7)])
    return (f"{row['model']:17} {row['train']:7} {row['method']:6} {cell(row['naive_ms'], 9)} "
            f"{cell(row['direct_ms'], 9)} {cell(row['gftvm_ms'], 9)} "
            f"{cell(row['tuned_ms'], 9)} {row['tuned_kernels']:7d} {cell(row['compile_s'], 9)} "
            f"{cell(row['torch_bp_ms'], 9)} {cell(row['torch_gf_ms'], 9)} "
            f"{cell(row['torch_fwd_upd_ms'], 9)} {cell(row['ort_bp_ms'], 9)} "
            f"{ratio('torch_bp_ms')} {ratio('torch_bp_ms', row['torch_fwd_upd_ms'])} "
            f"{ratio('ort_bp_ms')} | {memory}")


RECORD_COLUMNS = ["model", "train", "method", "image_size", "batch", "tuned_kernels",
                  "default_ms", "tuned_ms", "default/tuned", "tuned_faster_rounds", "rounds"]


def bench_records(args: argparse.Namespace) -> None:
    """Each train step with default schedules and with this CPU's records, in one process,
    timed in turn round after round (see the module docstring)."""
    print(f"{'model':17} {'train':7} {'method':6} {'kernels':>7} {'default ms':>10} "
          f"{'tuned ms':>9} {'default/tuned':>13} {'tuned faster':>12}")
    rows = []
    for size, name, spec in itertools.product(args.image_size, args.models, args.train):
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path, _ = export_model(args, name, size, tmp)
            for patch in [None, *args.filter_patch]:
                row = records_row(args, onnx_path, name, spec, size, patch, tmp)
                rows += [row] if row else []
    write_csv(args.csv, f"{machine_description(args)}; {args.rounds} rounds", RECORD_COLUMNS,
              rows)


def records_row(args: argparse.Namespace, onnx_path: str, name: str, spec: str, size: int,
                patch: int | None, directory: str) -> dict | None:
    """One step (BP, or GF with R = ``patch``) compiled without and with the records and timed
    in turn; None (and a line saying so) if no record applies to it."""
    import gftvm

    from bench_steps import MIN_SECONDS, gftvm_step

    steps = {}
    for column, schedules in (("default_ms", False), ("tuned_ms", True)):
        artifact = gftvm.compile(onnx_path, schedules=schedules, **step_options(args, spec, patch))
        path = os.path.join(directory, f"{patch}_{column}")
        artifact.save(path)
        steps[column] = gftvm_step({"dir": path, "batch": args.batch, "image_size": size})
    tuned_kernels = artifact.manifest["tuned_kernels"]
    method = "BP" if patch is None else f"GF R{patch}"
    if not tuned_kernels:
        print(f"{name:17} {spec:7} {method:6} no record applies")
        return None
    ms = interleaved_rounds(args.rounds, steps, lambda step: median_ms(
        step, args.repeat, min_seconds=MIN_SECONDS))
    default, tuned = (statistics.median(ms[c]) for c in ("default_ms", "tuned_ms"))
    faster = sum(t < d for d, t in zip(ms["default_ms"], ms["tuned_ms"]))
    print(f"{name:17} {spec:7} {method:6} {tuned_kernels:7d} {default:10.2f} {tuned:9.2f} "
          f"{default / tuned:13.2f} {faster:>7d} of {args.rounds}", flush=True)
    return {"model": name, "train": spec, "method": method, "image_size": size,
            "batch": args.batch, "tuned_kernels": tuned_kernels,
            "default_ms": round(default, 3), "tuned_ms": round(tuned, 3),
            "default/tuned": round(default / tuned, 3), "tuned_faster_rounds": faster,
            "rounds": args.rounds}


def export_model(args: argparse.Namespace, name: str, size: int, directory: str):
    """The zoo model ``name`` at ``size`` x ``size``, its BN statistics calibrated on the
    synthetic batch that the steps train on, exported to ``directory``/model.onnx. Returns the
    ONNX path and the PyTorch model."""
    import torch

    from gftvm import models
    from gftvm.data import synthetic

    images, _ = synthetic(args.batch, image_size=size)
    onnx_path = os.path.join(directory, "model.onnx")
    model = models.export_zoo_model(name, onnx_path, size, calibration=torch.from_numpy(images))
    return onnx_path, model


def bench_ort(args: argparse.Namespace) -> None:
    import torch

    import gftvm
    from gftvm import models
    from gftvm.frontend import ort

    print(f"{'model':18} {'ORT ms':>9} {'gftvm BP ms':>12} {'gftvm GF ms':>12} "
          f"{'ORT/BP':>7} {'ORT/GF':>7}  (GF: R2, {args.filter_layers})")
    for name in args.models:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            ort.generate_artifacts(models.build(name), tmp, (args.batch, 3, 32, 32))
            ort_ms = measure(args, {"kind": "ort", "dir": tmp, "batch": args.batch,
                                    "image_size": 32})["ms"]
            gftvm_ms = []
            for grad_filter in (None, gftvm.GradientFilter(2, args.filter_layers)):
                artifact = os.path.join(tmp, "gf" if grad_filter else "bp")
                gftvm.compile(tmp, lr=1e-3, filter=grad_filter).save(artifact)
                gftvm_ms.append(measure(args, {"kind": "gftvm", "dir": artifact,
                                               "batch": args.batch, "image_size": 32})["ms"])
        bp, gf = gftvm_ms
        print(f"{name:18} {ort_ms:9.1f} {bp:12.1f} {gf:12.1f} {ort_ms / bp:7.2f} "
              f"{ort_ms / gf:7.2f}", flush=True)


def bench_profile(args: argparse.Namespace) -> None:
    import torch

    import gftvm
    from gftvm import models
    from gftvm.data import synthetic
    from bench_profile import profile_in_fresh_process, side_by_side, top_kernels

    profiles = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        images, _ = synthetic(args.batch, image_size=args.image_size)
        models.export_zoo_model(args.model, onnx_path, args.image_size,
                                calibration=torch.from_numpy(images))
        for patch in [None, *args.filter_patch]:
            artifact = gftvm.compile(onnx_path, trainable=args.train, batch_size=args.batch,
                                     optimizer="sgd", lr=1e-3, momentum=0.9,
                                     filter=patch and gftvm.GradientFilter(patch, args.train))
            method = "BP" if patch is None else f"GF R{patch}"
            print(f"{method}: {artifact.manifest['tuned_kernels']} kernels with tuned schedules")
            artifact.save(os.path.join(tmp, method))
            profiles[method] = profile_in_fresh_process(os.path.join(tmp, method), args.threads,
                                                        args.repeat)
    title = (f"{args.model}, train {args.train}, {args.image_size}x{args.image_size}, per step "
             f"(calls, microseconds, % of the uninstrumented step); "
             f"{machine_description(args)}")
    text = "\n\n".join([title, side_by_side(profiles, args.top),
                         *(top_kernels(m, p, args.top) for m, p in profiles.items())])
    print(text)
    out = args.out or (f"bench/results/profile_{args.model}_{args.train.replace(':', '')}_"
                       f"{args.image_size}px_b{args.batch}.txt")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(text + "\n")
    print(f"wrote {out}")


def filtered_backward_module(layer: ConvGeometry) -> tvm.IRModule:
    """IRModule with backward(gy, x_sum, w) -> (grad_x, grad_w): the pass's filtered ops alone."""
    from tvm import relax

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
    return bb.get()


def compiled_filtered_backward(layer: ConvGeometry) -> relax.Executable:
    """:func:`filtered_backward_module` compiled (fused and default-scheduled as in a train
    step)."""
    from gftvm import targets, tuning

    executable, _ = tuning.compile_module(filtered_backward_module(layer),
                                          targets.get("host").tvm_target(), None)
    return executable


def layer_profile(layer: ConvGeometry, executable: relax.Executable, inputs: list,
                  flops_rate: float, bandwidth: float, repeat: int) -> list[str]:
    """Each kernel of the compiled filtered backward timed alone on its arguments in the
    backward (tools/bench_profile.py), with its FLOPs (TVM's estimate) per second as a share
    of the FMA peak, and the bytes of its arguments (each read or written once: a lower bound
    of its traffic) per second as a share of the copy speed: which kernels keep the backward
    above its floor. Column ``in bwd``: what the kernel costs inside the backward, the
    backward's time minus its time with the kernel skipped (:func:`bench_profile.in_place_ms`):
    it also counts the inputs that the kernel reads from memory rather than cache and the
    data that it pushes out of cache for the kernels after it."""
    import tvm
    from tvm import relax, s_tir

    from gftvm import targets, tuning
    from bench_profile import in_place_ms, kernel_calls, kernel_us

    lowered = tuning.lower(filtered_backward_module(layer), targets.get("host").tvm_target())
    vm = relax.VirtualMachine(executable, tvm.cpu())
    calls = kernel_calls(vm, "backward", inputs)
    in_place = in_place_ms(vm, "backward", inputs, list(dict.fromkeys(s for s, _ in calls)),
                           rounds=repeat, repeat=repeat)
    lines = [f"{'kernel':36} {'ms':>8} {'in bwd':>8} {'GFLOP/s':>8} {'% peak':>7} {'MB':>7} "
             f"{'GB/s':>6} {'% copy':>7}"]
    for symbol, args in calls:
        ms = kernel_us(executable.mod, symbol, args, repeat) / 1e3
        flops = s_tir.analysis.estimate_tir_flops(tvm.IRModule({"main": lowered[symbol]}))
        nbytes = sum(math.prod(a.shape) * 4 for a in args)
        lines.append(f"{symbol[:36]:36} {ms:8.4g} {in_place[symbol]:8.4g} "
                     f"{flops / ms / 1e6:8.1f} {100 * flops / ms / 1e-3 / flops_rate:7.1f} "
                     f"{nbytes / 1e6:7.1f} {nbytes / ms / 1e6:6.1f} "
                     f"{100 * nbytes / ms / 1e-3 / bandwidth:7.1f}")
    return lines


def filtered_backward_bytes(layer: ConvGeometry) -> int:
    """Bytes the filtered backward must at least move: its inputs gy, x_sum and W read, its
    outputs grad_x and grad_w (every tap) written, fp32."""
    n, c = layer.x_shape[:2]
    tensors = [layer.y_shape, (n, c, *layer.blocks), layer.w_shape, layer.x_shape, layer.w_shape]
    return 4 * sum(math.prod(shape) for shape in tensors)


def filtered_backward_flops(layer: ConvGeometry) -> dict[str, int]:
    """Floating-point operations of the filtered backward (:func:`filtered_backward_module`),
    per kernel, counted from the shapes; a multiply-accumulate is 2. The upsample of grad_x
    and the broadcast of grad_w to every tap are copies (memory traffic, no arithmetic)."""
    n, co = layer.y_shape[:2]
    ci_group, kh, kw = layer.w_shape[1:]
    pixels = n * layer.blocks[0] * layer.blocks[1]     # N x P x Q pooled pixels
    windows = pixels * co
    low_macs = windows * ci_group   # g groups of (Co/g x Ci/g) by N*P*Q
    return {
        # R x R adds per window (partial windows add padded zeros) and one divide per window
        "g_pool": windows * layer.patch ** 2 + windows,
        "w_sum": 0 if (kh, kw) == (1, 1) else co * ci_group * kh * kw,
        # grad_x at low resolution, times 1/s^2 when strided
        "gx_low": 2 * low_macs + (pixels * layer.x_shape[1] if layer.strides != (1, 1) else 0),
        "gw": 2 * low_macs,     # pooled gy x pooled x, summed over N, P, Q
    }


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


def fastest_seconds(measure, runs: int = 10, gap: float = 0.1) -> float:
    """The least of ``runs`` calls of ``measure()`` (seconds), ``gap`` seconds apart: a peak or
    a floor is what the machine can do, and other tenants of this shared machine take a core
    or memory bandwidth for moments (one short window measured half the FMA peak)."""
    fastest = math.inf
    for _ in range(runs):
        fastest = min(fastest, measure())
        time.sleep(gap)
    return fastest


def copy_bandwidth(nbytes: int) -> float:
    """Bytes per second of a tensor copy that moves ``nbytes`` (half read, half written),
    repeated on the same buffers as the timed backward is, so a working set that fits in cache
    is copied from cache (:func:`fastest_seconds`)."""
    import torch

    src = torch.ones(max(1, nbytes // 8))
    dst = torch.empty_like(src)
    seconds = fastest_seconds(lambda: median_ms(lambda: dst.copy_(src), 1) / 1e3)
    return 2 * src.numel() * 4 / seconds


def fma_peak_kernel(chunks: int, lanes: int, vectors: int, steps: int):
    """A PrimFunc doing only fp32 multiply-adds in registers: each of ``chunks`` parallel
    iterations keeps ``vectors`` independent vectors of ``lanes`` accumulators and updates
    each ``steps`` times (``acc = acc * 0.999 + 0.001``, one FMA), from and back to its row
    of ``a``."""
    from tvm.script import tirx as T

    width = lanes * vectors

    @T.prim_func(s_tir=True)
    def main(a: T.Buffer((chunks, width), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for t in T.parallel(chunks):
            acc = T.alloc_buffer((width,), "float32", scope="local")
            for i in T.vectorized(width):
                acc[i] = a[t, i]
            for _ in range(steps):
                for j in T.unroll(vectors):
                    for v in T.vectorized(lanes):
                        acc[j * lanes + v] = acc[j * lanes + v] * T.float32(0.999) \
                            + T.float32(0.001)
            for i in T.vectorized(width):
                a[t, i] = acc[i]

    return main


def fma_peak_rate(threads: int, steps: int = 1 << 14) -> float:
    """The host's fp32 FLOP/s peak on TVM's thread pool (``threads`` threads), measured:
    :func:`fma_peak_kernel` compiled by TVM for the host target at LLVM's vector width, 24
    vectors per chunk (enough independent FMAs to cover their latency), 8 chunks per thread
    (with exactly one per thread, TVM's pool ran both on one core here after
    ``torch.set_num_threads``), :func:`fastest_seconds`."""
    import numpy as np
    import tvm

    from gftvm import targets
    from gftvm.passes.default_schedule import vector_lanes

    target = targets.get("host").tvm_target()
    lanes = vector_lanes(target)
    chunks, vectors = 8 * threads, 24
    library = tvm.compile(tvm.IRModule({"main": fma_peak_kernel(chunks, lanes, vectors, steps)}),
                          target)
    a = tvm.runtime.tensor(np.ones((chunks, lanes * vectors), "float32"))
    timer = library.mod.time_evaluator("main", tvm.cpu(), number=3)
    return 2 * chunks * lanes * vectors * steps / fastest_seconds(lambda: timer(a).min)


LAYER_COLUMNS = ["C", "H", "W", "R", "gftvm_gf_ms", "torch_bp_ms", "eager_gf_ms",
                 "copy_GBps", "traffic_floor_ms", "compute_floor_ms", "floor_ms", "bp/gf",
                 "eager/gf", "gf/floor", "bp/floor"]


def roofline_floor_ms(traffic_bytes: int, flops: int, bandwidth: float, flops_rate: float
                      ) -> tuple[float, float, float]:
    """(traffic floor, compute floor, floor) in ms: the time to move the bytes at
    ``bandwidth``, to do the FLOPs at ``flops_rate``, and the larger of the two."""
    traffic, compute = traffic_bytes / bandwidth * 1e3, flops / flops_rate * 1e3
    return traffic, compute, max(traffic, compute)


def bench_layers(args: argparse.Namespace) -> None:
    # TVM and PyTorch share this process. TVM pins its worker threads to cores; PyTorch's
    # OpenMP thread then competes with one of them, which cannot move: here the FMA peak
    # measured 258-276 instead of 514-559 GFLOP/s, and GF and BP times varied with it. Left
    # unpinned, the OS keeps the threads apart. (Read when TVM's thread pool starts.)
    os.environ["TVM_BIND_THREADS"] = "0"
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    from gftvm.passes.gradient_filter import ConvGeometry

    from bench_steps import MIN_SECONDS

    flops_rate = fma_peak_rate(args.threads)
    print(f"fp32 FMA peak {flops_rate / 1e9:.1f} GFLOP/s; traffic floors at the speed of a copy "
          f"of the same bytes (copy_GBps)")
    widths = [max(8, len(h)) for h in LAYER_COLUMNS]
    print(" ".join(f"{h:>{width}}" for h, width in zip(LAYER_COLUMNS, widths)))
    rows, profiles = [], []
    n = args.batch
    for c, h, w in args.shapes:
        rng = np.random.default_rng(0)
        x = torch.from_numpy(rng.normal(size=(n, c, h, w)).astype(np.float32))
        gy = torch.from_numpy(rng.normal(size=(n, c, h, w)).astype(np.float32))
        weight = torch.from_numpy(rng.normal(size=(c, c, 3, 3)).astype(np.float32))
        layers, runs = {}, {"bp": functools.partial(
            torch.ops.aten.convolution_backward, gy, x, weight, None, [1, 1], [1, 1], [1, 1],
            False, [0, 0], 1, [True, True, False])}
        for patch in args.patch:
            layer = ConvGeometry(patch, (n, c, h, w), (c, c, 3, 3), (n, c, h, w), (1, 1),
                                 (1, 1), 1)
            x_sum = torch.nn.functional.avg_pool2d(x, patch, patch, ceil_mode=True) * patch ** 2
            executable = compiled_filtered_backward(layer)
            inputs = [tvm.runtime.tensor(t.numpy()) for t in (gy, x_sum, weight)]
            layers[patch] = layer, executable, inputs
            runs["gf", patch] = functools.partial(
                relax.VirtualMachine(executable, tvm.cpu())["backward"], *inputs)
            runs["eager", patch] = functools.partial(eager_filtered_backward, gy, x_sum,
                                                     weight, patch)
        ms = {key: statistics.median(times) for key, times in interleaved_rounds(
            args.rounds, runs, lambda run: median_ms(run, args.repeat,
                                                     min_seconds=MIN_SECONDS)).items()}
        torch_bp = ms["bp"]
        for patch, (layer, executable, inputs) in layers.items():
            gf, eager = ms["gf", patch], ms["eager", patch]
            traffic_bytes = filtered_backward_bytes(layer)
            bandwidth = copy_bandwidth(traffic_bytes)
            traffic, compute, floor = roofline_floor_ms(
                traffic_bytes, sum(filtered_backward_flops(layer).values()), bandwidth,
                flops_rate)
            values = [c, h, w, patch, gf, torch_bp, eager, bandwidth / 1e9, traffic, compute,
                      floor, torch_bp / gf, eager / gf, gf / floor, torch_bp / floor]
            rows.append(dict(zip(LAYER_COLUMNS, values)))
            print(" ".join(f"{v:>{width}.2f}" if isinstance(v, float) else f"{v:>{width}}"
                           for v, width in zip(values, widths)), flush=True)
            if args.profile:
                profiles += [f"{c}x{h}x{w} R{patch}: backward {gf:.3f} ms, floor {floor:.3f} ms "
                             f"(traffic {traffic:.3f}, compute {compute:.3f})",
                             *layer_profile(layer, executable, inputs, flops_rate, bandwidth,
                                            args.repeat), ""]
    write_csv(args.csv, f"{machine_description(args)}; fp32 FMA peak {flops_rate / 1e9:.1f} "
              f"GFLOP/s; traffic floors at the speed of a copy of the same bytes", LAYER_COLUMNS,
              [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
               for r in rows])
    plot_layers(rows, args.plot)
    print(f"wrote {args.plot}")
    if args.profile:
        with open(args.profile, "w") as f:
            f.write(f"Kernels of the filtered backward, each timed alone (ms) and in place "
                    f"(in bwd: the backward minus the backward with the kernel skipped); "
                    f"{machine_description(args)}; fp32 FMA peak {flops_rate / 1e9:.1f} GFLOP/s"
                    f"\n\n" + "\n".join(profiles))
        print(f"wrote {args.profile}")


def pyplot():
    """matplotlib.pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STEP_BARS = {"time": [("naive_ms", "gftvm naive loops"), ("direct_ms", "gftvm direct convs"),
                      ("gftvm_ms", "gftvm default"),
                      ("tuned_ms", "gftvm tuned"),
                      ("torch_bp_ms", "PyTorch BP"), ("torch_gf_ms", "PyTorch GF"),
                      ("torch_fwd_upd_ms", "PyTorch fwd+upd"),
                      ("ort_bp_ms", "ORT BP")],
             "memory": [("gftvm_peak_mib", "gftvm"), ("torch_peak_mib", "PyTorch"),
                        ("ort_peak_mib", "ORT BP"), ("saved_context_mib", "gftvm plan")]}


def plot_steps(rows: list[dict], title: str, path: str) -> None:
    """Grouped bars per config: ms per step (left), peak MiB (right)."""
    plt = pyplot()
    panels = [("time", "ms per train step"), ("memory", "peak train-step memory (MiB)")]
    width = max(5.0, 1.4 * len(rows) + 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.5), squeeze=False)
    for ax, (panel, ylabel) in zip(axes[0], panels):
        grouped_bars(ax, rows, STEP_BARS[panel])
        ax.set_ylabel(ylabel)
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def grouped_bars(ax, rows: list[dict], series: list[tuple[str, str]]) -> None:
    """One bar per (column, label) in ``series`` for each row; missing values are left out,
    and a series with no value in any row (the naive loops under ``--no-naive``) has no bar
    and no legend entry."""
    import numpy as np

    series = [(column, label) for column, label in series if any(r.get(column) for r in rows)]
    x = np.arange(len(rows))
    bar = 0.8 / len(series)
    for i, (column, label) in enumerate(series):
        values = [r.get(column) or 0 for r in rows]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * bar, values, bar, label=label)
        ax.bar_label(bars, [f"{v:.3g}" if v else "" for v in values], fontsize=6, rotation=90)
    values = [r.get(c) for r in rows for c, _ in series if r.get(c)]
    ax.set_yscale("log" if values and max(values) > 30 * min(values) else "linear")
    ax.set_xticks(x, [f"{r['model']}\n{r['train']} {r['method']}" for r in rows], fontsize=7)
    ax.legend(fontsize=7, ncols=min(len(series), 4), loc="lower center",
              bbox_to_anchor=(0.5, 1.0), frameon=False)


def plot_layers(rows: list[dict], path: str) -> None:
    plt = pyplot()
    labels = [f"{r['C']}ch {r['H']}x{r['W']} R{r['R']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for column, name, style in [("gftvm_gf_ms", "gftvm GF (compiled)", "-"),
                                ("torch_bp_ms", "PyTorch BP (oneDNN)", "-"),
                                ("eager_gf_ms", "PyTorch eager GF", "-"),
                                ("floor_ms", "roofline floor of GF", "-"),
                                ("traffic_floor_ms", "memory-traffic floor", ":"),
                                ("compute_floor_ms", "compute floor", ":")]:
        ax.plot(labels, [r[column] for r in rows], style, marker="o", label=name)
    ax.set_yscale("log")
    ax.set_ylabel("backward time (ms)")
    ax.tick_params(axis="x", rotation=60)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_csv(path: str, description: str, columns: list[str], rows: list[dict]) -> None:
    """The rows as CSV under a comment line that describes the machine and the run."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(f"# {description}\n")
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


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
    {"steps": bench_steps, "profile": bench_profile, "ort": bench_ort,
     "layers": bench_layers, "records": bench_records}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
