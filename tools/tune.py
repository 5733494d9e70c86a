#!/usr/bin/env python
"""Tune the kernels of a train step with MetaSchedule, and manage schedules/<target>/.

    python tools/tune.py tune [MODEL.onnx] --target host --train last:4 --batch 8 \
        [--filter-patch 2 ...] --trials 500 --work-dir out/tune/host \
        [--rpc-tracker HOST:PORT --rpc-key rasp4] [-o schedules/host]
    python tools/tune.py merge SRC [SRC ...] -o schedules/host
    python tools/tune.py prune schedules/host [MODEL.onnx] --train last:4 --batch 8 \
        [--filter-patch 2 ...] [--drop-slower]

``tune`` tunes the exact-backprop step and, per --filter-patch R, the gradient-filtered step
(kernels they share are tuned once), times each tuned kernel's default schedule the same way,
and merges the best records that beat it (all with --keep-all) into the output database
(default schedules/<target>/), which gftvm.compile applies. The work directory is resumable.
``prune`` keeps only the records of kernels that the given train steps use (with
--drop-slower, only those still faster than the default schedule, e.g. after it improved).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from compile import add_model_arguments, model_path, step_options

from tvm.s_tir import meta_schedule as ms

import gftvm
from gftvm import compiler, targets, tuning

# The kernels worth the trials by default: the convolutions, their backward and the matmuls,
# pools and reductions. Elementwise kernels are memory-bound loops that gain little.
HEAVY_OPS = ("conv2d", "conv2d_transpose", "matmul", "avg_pool2d", "sum", "collapse_sum", "mean")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tune = sub.add_parser("tune", help="tune a train step's kernels")
    add_model_arguments(tune, several_patches=True)
    tune.add_argument("--trials", type=int, default=500, help="measurements in all")
    tune.add_argument("--work-dir", default=None,
                      help="MetaSchedule work directory (default out/tune/<target>; resumable)")
    tune.add_argument("--ops", default=",".join(HEAVY_OPS),
                      help="comma-separated kernel kinds to tune, or 'all' (default: %(default)s)")
    tune.add_argument("--max-tasks", type=int,
                      help="tune only this many of them, those with the most FLOPs per step")
    tune.add_argument("--untuned-only", action="store_true",
                      help="skip kernels that already have a record in the output database")
    tune.add_argument("--rpc-tracker", metavar="HOST:PORT",
                      help="measure on a board through this RPC tracker (default: locally)")
    tune.add_argument("--rpc-key", default="rasp4", help="the board's key at the tracker")
    tune.add_argument("--keep-all", action="store_true",
                      help="keep records even where the default schedule is as fast")
    tune.add_argument("--jobs", type=int, default=1, help="parallel kernel builds (default 1)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--verbose", action="store_true", help="MetaSchedule's log on the console")
    tune.add_argument("-o", "--output", help="database to merge into (default schedules/TARGET)")

    merge = sub.add_parser("merge", help="merge databases, keeping the best record per kernel")
    merge.add_argument("sources", nargs="+")
    merge.add_argument("-o", "--output", required=True)

    prune = sub.add_parser("prune", help="drop the kernels the given train steps do not use")
    prune.add_argument("database")
    add_model_arguments(prune, several_patches=True)
    prune.add_argument("--drop-slower", action="store_true",
                       help="also drop records no faster than the kernel's current default "
                            "schedule, timed now as tune does")
    return parser.parse_args(argv)


def train_steps(args: argparse.Namespace, log) -> list:
    """The Relax modules of the exact step and each filtered step of the arguments."""
    directory = args.work_dir if getattr(args, "work_dir", None) else "out/tune"
    model = model_path(args, directory, log)
    return [compiler.build_program(model, **step_options(args, patch)).mod
            for patch in [None, *args.filter_patch]]


def kernel_ops(task_name: str, kinds: set[str]) -> set[str]:
    """The ``kinds`` among the ops a kernel fuses, read off its name
    (``fused_conv2d_transpose1_where`` -> {conv2d_transpose}; the longest kind wins)."""
    found = set()
    for start in [0, *(m.end() for m in re.finditer("_", task_name))]:
        ops = [k for k in kinds if task_name.startswith(k, start)
               and re.match(r"\d*(_|$)", task_name[start + len(k):])]
        if ops:
            found.add(max(ops, key=len))
    return found


def selected(tasks: list, ops: str) -> list:
    if ops == "all":
        return tasks
    kinds = set(ops.split(","))
    return [t for t in tasks if kernel_ops(t.task_name, kinds | set(HEAVY_OPS)) & kinds]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    log = lambda message: print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)
    try:
        if args.command == "merge":
            log(f"{args.output}: {tuning.merge(args.sources, args.output)} records")
            return 0
        spec = targets.get(args.target)
        target = tuning.tuning_target(spec)
        if args.command == "tune":
            args.work_dir = args.work_dir or os.path.join("out", "tune", args.target)
        tasks = tuning.extract_tasks(train_steps(args, log), target)
        if args.command == "prune":
            keep = lambda record: True
            if args.drop_slower:
                slower = tuning.slower_than_default(tasks, args.database, target,
                                                    tuning.builder(spec, 1),
                                                    tuning.runner(None, None))
                log(f"{len(slower.workloads)} records no faster than the default schedule "
                    f"({tuning.cpu_of(target)})")
                keep = tuning.except_slower(slower, tuning.cpu_of(target))
            log(f"{args.database}: {tuning.prune(args.database, tasks, keep)} records kept "
                f"for {len(tasks)} kernels")
            return 0
        output = args.output or os.fspath(tuning.SCHEDULES / args.target)
        chosen = selected(tasks, args.ops)
        if args.untuned_only:
            chosen = tuning.without_records(chosen, output, tuning.cpu_of(target))
        if args.max_tasks is not None:
            chosen = tuning.heaviest(chosen, args.max_tasks)
        log(f"{len(tasks)} distinct kernels, tuning {len(chosen)} ({args.ops}) for "
            f"{args.target} ({target.attrs['mcpu']}) with {args.trials} trials in "
            f"{args.work_dir}: {', '.join(t.task_name for t in chosen)}")
        builder = tuning.builder(spec, args.jobs)
        runner = tuning.runner(args.rpc_tracker, args.rpc_key if args.rpc_tracker else None)
        tuning.tune(chosen, args.work_dir, args.trials, builder, runner, say=log,
                    seed=args.seed, verbose=args.verbose)
        slower = ms.database.MemoryDatabase() if args.keep_all else \
            tuning.slower_than_default(chosen, args.work_dir, target, builder, runner)
        log(f"{len(slower.workloads)} of {len(chosen)} kernels tuned no faster than their "
            f"default schedule: their records are not kept")
        kept = tuning.merge([args.work_dir], output,
                            tuning.except_slower(slower, tuning.cpu_of(target)))
        log(f"{output}: {kept} records")
    except gftvm.GftvmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
