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
               "host": machine(), "board": None if remote is None else (
                   args.rpc or f"tracker {args.rpc_tracker}, key {args.rpc_key}"),
               "rows": rows}
    # alternately from the full space and from its small networks, where budgets bite
    half = (args.count + 1) // 2
    sampled = zip(space.sample(space.FULL, half, args.seed),
                  space.sample(space.SMALL, half, args.seed))
    configs = [c for pair in sampled for c in pair][:args.count]
    for i, config in enumerate(configs):
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
    if args.append:
        payload = load_rows(args.output, "train")
        rows = payload["rows"]
    else:
        rows = []
        payload = {"data": args.cifar or "digits", "image_size": args.image_size,
                   "epochs": args.epochs, "train_images": len(train[0]),
                   "test_images": len(test[0]), "host": machine(), "rows": rows}
    ranges = space.SMALL if args.space == "small" else space.FULL
    for i, config in enumerate(space.sample(ranges, args.count, args.seed)):
        start = time.perf_counter()
        accuracy = train_and_evaluate(config, train, test, args.epochs, seed=args.seed)
        degree = float(nn_degree(config.widths, config.depths, config.skips))
        rows.append({"widths": config.widths, "depths": config.depths, "skips": config.skips,
                     "space": args.space, "nn_degree": degree, "accuracy": accuracy,
                     "train_s": time.perf_counter() - start})
        write_json(args.output, payload)
        print(f"[{i + 1}/{args.count}] {config}: NN-Degree {degree:.1f}, accuracy "
              f"{accuracy:.3f} ({rows[-1]['train_s']:.0f}s)", flush=True)
    return 0


def load_rows(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"error: {path} is missing: run `python tools/search.py {what}` first "
                         f"(docs/flash.md)") from None


def fit_models(args: argparse.Namespace):
    """The accuracy predictor and the latency model from the recorded results."""
    from gftvm.flash.degree import nn_degree
    from gftvm.flash.hardware import LatencyModel, features
    from gftvm.flash.predictor import AccuracyPredictor

    accuracy = load_rows(args.accuracy, "train")["rows"]
    latency = load_rows(args.latency or os.path.join(RESULTS, f"{args.target}_latency.json"),
                        f"measure --target {args.target}")
    key = f"{args.latency_of}_ms"
    rows = [r for r in latency["rows"] if key in r]
    if not rows:
        raise SystemExit(f"error: no {key} measurements for target {args.target}")
    predictor = AccuracyPredictor.fit([r["nn_degree"] for r in accuracy],
                                      [r["accuracy"] for r in accuracy])
    columns = lambda rs: [np.array([r[k] for r in rs]) for k in ("widths", "depths", "skips")]
    model = LatencyModel.fit(features(*columns(rows), latency["batch"]),
                             [r[key] for r in rows])
    return predictor, model, latency["batch"], nn_degree


def cmd_search(args: argparse.Namespace) -> int:
    from gftvm.flash.hardware import energy_mj, features
    from gftvm.flash.search import Problem, hierarchical_shgo

    predictor, model, batch, nn_degree = fit_models(args)
    problem = Problem(space.FULL, predictor, model, args.latency_ms, args.memory_kb * 1024,
                      batch)
    result = hierarchical_shgo(problem)
    if result.config is None:
        print(f"no network of the space fits {args.latency_ms} ms and {args.memory_kb} KB")
        return 1
    c = result.config
    accuracy, latency, memory = problem.evaluate(c.vector())
    print(f"architecture   {c}  (width, depth, skip budget per cell)")
    print(f"NN-Degree      {float(nn_degree(c.widths, c.depths, c.skips)):.2f}")
    print(f"accuracy       {accuracy:.3f} predicted")
    print(f"latency        {latency:.2f} ms modelled ({args.latency_of}, batch {batch}, "
          f"{args.target})")
    print(f"memory         {memory / 1024:.1f} KB modelled")
    print(f"energy         {energy_mj(features(c.widths, c.depths, c.skips, batch)):.3f} mJ "
          f"modelled (not measured)")
    print(f"search         {result.seconds * 1e3:.0f} ms, {result.evaluations} model "
          f"evaluations (hierarchical SHGO)")
    if args.emit_onnx:
        from gftvm import models

        models.export_onnx(space.build(c), args.emit_onnx, (1, 3, 32, 32))
        print(f"onnx           {args.emit_onnx} (python tools/compile.py {args.emit_onnx} ...)")
    if args.measure:
        from gftvm.flash.measure import compile_config, time_host

        with tempfile.TemporaryDirectory() as tmp:
            times = time_host(compile_config(c, tmp, "host", batch))
        print(f"measured       {times[f'{args.latency_of}_ms']:.2f} ms ({args.latency_of}, host)")
    return 0


def zoo_degrees() -> dict:
    """NN-Degree of the zoo networks, one cell per stage (output resolution)."""
    import onnx

    from gftvm import models
    from gftvm.flash.degree import channel_graph_degree, resolution_cell

    degrees = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("resnet18", "mobilenetv2-0.35", "mcunet"):
            models.export_zoo_model(name, os.path.join(tmp, "m.onnx"))
            stages = channel_graph_degree(onnx.load(os.path.join(tmp, "m.onnx")),
                                          resolution_cell)
            degrees[name] = {"per_stage": {str(k): v for k, v in stages.items()},
                             "nn_degree": sum(stages.values())}
    return degrees


BUDGETS = [(5, 512), (10, 256), (20, 512), (50, 1024), (100, 2048)]   # (ms, KB) compared


def cmd_report(args: argparse.Namespace) -> int:
    """Held-out fits of both models, search times, plots and docs/flash/report.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gftvm.flash.hardware import LatencyModel, cell_working_bytes, features, mape
    from gftvm.flash.measure import planned_activation_bytes
    from gftvm.flash.predictor import AccuracyPredictor
    from gftvm.flash.search import Problem, exhaustive, hierarchical_shgo, random_search

    report: dict = {}
    accuracy = load_rows(args.accuracy, "train")["rows"]
    order = np.random.default_rng(0).permutation(len(accuracy))
    fit, held = [accuracy[i] for i in order[:25]], [accuracy[i] for i in order[25:]]
    g = lambda rs: np.array([r["nn_degree"] for r in rs])
    a = lambda rs: np.array([r["accuracy"] for r in rs])
    report["predictor"] = {f"order {k}": AccuracyPredictor.fit(g(fit), a(fit), k).score(
        g(held), a(held)) for k in (1, 2)}
    predictor = AccuracyPredictor.fit(g(fit), a(fit), 2)
    report["predictor"].update(fitted_on=len(fit), held_out=len(held), **predictor.to_json())
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter(g(fit), a(fit), label="fitted (25)")
    ax.scatter(g(held), a(held), marker="x", label=f"held out ({len(held)})")
    grid = np.linspace(g(accuracy).min(), g(accuracy).max(), 100)
    ax.plot(grid, predictor.predict(grid), "k-", label="quadratic fit")
    ax.set(xlabel="NN-Degree", ylabel="test accuracy (digits)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.docs, "flash_predictor.png"), dpi=120)

    latency = load_rows(args.latency or os.path.join(RESULTS, "host_latency.json"), "measure")
    rows, cut = latency["rows"], 20
    x = features(*[np.array([r[k] for r in rows]) for k in ("widths", "depths", "skips")],
                 latency["batch"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    report["latency"] = {"fitted_on": cut, "held_out": len(rows) - cut}
    for key, marker in (("predict_ms", "o"), ("step_ms", "s")):
        measured = np.array([r[key] for r in rows])
        model = LatencyModel.fit(x[:cut], measured[:cut])
        predicted = model.predict(x)
        report["latency"][key] = {"mape_held_out": mape(predicted[cut:], measured[cut:]),
                                  "mape_fitted": mape(predicted[:cut], measured[:cut]),
                                  "coefficients": model.to_json()}
        ax.scatter(measured[cut:], predicted[cut:], marker=marker, label=f"{key} held out")
    top = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([0, top], [0, top], "k:")
    ax.set(xscale="log", yscale="log", xlabel="measured ms (gftvm, host)", ylabel="modelled ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.docs, "flash_latency.png"), dpi=120)

    configs = [space.Config(tuple(r["widths"]), tuple(r["depths"]), tuple(r["skips"]))
               for r in rows]
    planned = np.array([planned_activation_bytes(c) for c in configs], float)
    modelled = np.array([cell_working_bytes(c.widths, c.depths, c.skips).max()
                         for c in configs])
    report["memory"] = {"networks": len(rows), "mape_vs_relax_plan": mape(modelled, planned),
                        "ratio_min": float((modelled / planned).min()),
                        "ratio_max": float((modelled / planned).max())}

    model = LatencyModel.fit(x, [r["predict_ms"] for r in rows])
    predictor = AccuracyPredictor.fit(g(accuracy), a(accuracy), 2)
    report["search"] = []
    for ranges, name in ((space.REDUCED, "reduced"), (space.FULL, "full")):
        for ms, kb in BUDGETS:
            problem = Problem(ranges, predictor, model, ms, kb * 1024, latency["batch"])
            runs = {"shgo": hierarchical_shgo(problem),
                    "random 1e3": random_search(problem, 1000),
                    "random 1e5": random_search(problem, 100_000),
                    "random 1e6": random_search(problem, 1_000_000)}
            if ranges is space.REDUCED:
                runs["exhaustive"] = exhaustive(problem)
            report["search"].append({"space": name, "latency_ms": ms, "memory_kb": kb, **{
                k: {"config": str(r.config), "accuracy": r.accuracy, "seconds": r.seconds,
                    "evaluations": r.evaluations} for k, r in runs.items()}})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, marker in (("shgo", "o"), ("exhaustive", "s"), ("random 1e3", "^"),
                      ("random 1e5", "v"), ("random 1e6", "D")):
        points = [(r[k]["seconds"], r[k]["accuracy"]) for r in report["search"] if k in r
                  and np.isfinite(r[k]["accuracy"])]
        ax.scatter(*zip(*points), marker=marker, label=k)
    ax.set(xscale="log", xlabel="search time (s)", ylabel="predicted accuracy of the answer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.docs, "flash_search.png"), dpi=120)
    report["zoo"] = zoo_degrees()
    report["host"] = machine()
    write_json(os.path.join(RESULTS, "report.json"), report)
    print(json.dumps(report, indent=1))
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
    parser.add_argument("--latency-ms", type=float, default=5.0, help="latency budget")
    parser.add_argument("--memory-kb", type=float, default=512.0, help="memory budget")
    parser.add_argument("--latency-of", choices=["predict", "step"], default="predict",
                        help="budget the inference (predict) or the train step")
    parser.add_argument("--accuracy", default=os.path.join(RESULTS, "accuracy_digits.json"),
                        help="trained networks for the predictor")
    parser.add_argument("--latency", help="latency measurements (default: "
                        "docs/flash/TARGET_latency.json)")
    parser.add_argument("--emit-onnx", metavar="FILE", help="export the chosen network")
    parser.add_argument("--measure", action="store_true",
                        help="compile the chosen network and time it on the host")
    parser.add_argument("--docs", default=os.path.join(HERE, os.pardir, "docs"),
                        help="where report writes its plots")
    parser.add_argument("--space", choices=["full", "small"], default="full",
                        help="train: sample the full space or its small networks")
    parser.add_argument("--append", action="store_true", help="train: add to --output")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per network")
    parser.add_argument("--image-size", type=int, default=32,
                        help="digits resolution for training (the hardware uses 32)")
    parser.add_argument("--cifar", metavar="DIR", help="train on CIFAR-10 batches in DIR")
    parser.add_argument("--train-count", type=int, default=10000,
                        help="CIFAR training images used (test: a quarter of it)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return {"search": cmd_search, "measure": cmd_measure, "train": cmd_train,
            "report": cmd_report}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
