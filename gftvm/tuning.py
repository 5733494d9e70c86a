"""Tuned schedules: MetaSchedule tuning of a train step's kernels, the per-target databases in
``schedules/<target>/`` and how ``gftvm.compile`` applies them.

A kernel is a PrimFunc of the train-step module after legalization and fusion, exactly as
``tvm.compile``'s default pipeline lowers it (each Relax op becomes a PrimFunc, then FuseOps and
FuseTIR merge a conv with its BatchNorm/ReLU6 epilogue and chains of elementwise ops into one).
Tuning and applying both start from :func:`lower`, so a record's workload is the PrimFunc that
compilation meets. Kernels without a record get ``DefaultCPUSchedule`` (``DefaultGPUSchedule`` on
GPUs). A database directory holds MetaSchedule's JSONDatabase files, with records of any number
of CPUs, of which compile applies only the target CPU's (:func:`database_for`). :func:`merge`
keeps the best record per workload and CPU, :func:`prune` drops workloads no given train step
uses, :func:`slower_than_default` finds the records not worth keeping.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import tvm
from tvm import relax, s_tir
from tvm.s_tir import meta_schedule as ms
from tvm.ir.utils import derived_object

from .errors import ConfigError
from .passes.default_schedule import (SCHEDULED_ATTR, DefaultCPUSchedule, schedule_kernel,
                                      target_cores)
from .passes.gpu_schedule import DefaultGPUSchedule
from .passes.hoist_updates import HoistStateUpdates
from .passes.inplace_update import InPlaceStateUpdate
from .passes.winograd import Winograd
from .targets import AARCH64_CXX, TargetSpec

SCHEDULES = Path(__file__).resolve().parent.parent / "schedules"
WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"


def tuning_target(spec: TargetSpec) -> tvm.target.Target:
    """The target to tune for: the compile target, with the core count MetaSchedule needs
    (the physical cores here, for ``host``)."""
    target = spec.tvm_target()
    if "num-cores" in target.attrs:
        return target
    return tvm.target.Target({**target.export(), "num-cores": target_cores(target)})


def lower(mod: tvm.IRModule, target: tvm.target.Target, winograd: bool = True
          ) -> tvm.IRModule:
    """Legalize every Relax op to a TIR kernel and fuse them, as the start of ``tvm.compile``
    does, but without the schedules that TVM's GPU pipeline gives there (records apply first,
    then ``DefaultGPUSchedule``); on CPU targets, first rewrite 3x3 convs as Winograd products
    (unless ``winograd`` is False; see passes/winograd.py)."""
    first = [Winograd()] if winograd and target.kind.name == "llvm" else []
    with target:
        return tvm.transform.Sequential([*first, *relax.pipeline.library_dispatch_passes(target),
                                         *relax.backend.cpu_generic.legalize_passes(target)])(mod)


def open_database(directory: str | os.PathLike) -> ms.database.JSONDatabase:
    """The JSON database in ``directory`` (created empty if missing)."""
    os.makedirs(directory, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=os.fspath(directory))


def database_for(spec: TargetSpec, schedules: str | os.PathLike | bool,
                 say: Callable[[str], None]) -> ms.database.Database | None:
    """The records ``gftvm.compile`` applies: those of ``schedules/<target>/`` (when
    ``schedules`` is True) or of a given directory that were tuned on this target's CPU, or
    None. Records of other CPUs are skipped with a warning: a schedule is correct on any CPU
    of the target's kind, but it was measured to be the fastest only on its own CPU."""
    if schedules is False:
        return None
    directory = SCHEDULES / spec.name if schedules is True else Path(schedules)
    if not (directory / RECORDS).is_file():
        if schedules is not True:
            raise ConfigError(f"schedules={os.fspath(schedules)!r}: no tuning database "
                              f"({RECORDS}) in that directory")
        return None
    database = open_database(directory)
    cpu = cpu_of(spec.tvm_target())
    applied = records_for(database, cpu)
    others = {cpu_of(r.target) for r in database.get_all_tuning_records()} - {cpu}
    if others:
        warnings.warn(f"{directory}: skipped the records tuned on {', '.join(sorted(others))}; "
                      f"this target's CPU is {cpu}, with {len(applied.workloads)} records "
                      f"(tools/tune.py tunes for it)")
    if not applied.workloads:
        return None
    say(f"applying {len(applied.workloads)} tuned schedules ({cpu}) from {directory}")
    return applied


def cpu_of(target: tvm.target.Target) -> str:
    """LLVM's name of the CPU that a target, or the target of a record, is for."""
    return str(target.attrs.get("mcpu"))


def records_for(database: ms.database.Database, cpu: str) -> ms.database.MemoryDatabase:
    """The best record of each workload among the database's records tuned on ``cpu``."""
    out = ms.database.MemoryDatabase()
    _copy_best([database], out, lambda record: cpu_of(record.target) == cpu)
    return out


def compile_module(mod: tvm.IRModule, target: tvm.target.Target,
                   database: ms.database.Database | None, default_schedule: bool = True,
                   donated: dict[str, list[str]] | None = None, winograd: bool = True
                   ) -> tuple[relax.Executable, int]:
    """``tvm.compile`` the module, with the database's schedules for the kernels it has records
    for and ``DefaultCPUSchedule`` (``DefaultGPUSchedule`` on GPUs) for the others (unless
    ``default_schedule`` is False: TVM's naive loops, which only CPUs can run). ``donated``
    names, per function, the inputs its callers give up (``InPlaceStateUpdate`` writes results
    over them). Returns the executable and the number of kernels that got a tuned schedule
    (not counting the kernels that the Winograd pass writes scheduled). ``winograd``: see
    :func:`lower`."""
    if not default_schedule and target.kind.name != "llvm":
        raise ConfigError(f"default_schedule=False: GPU kernels cannot run unscheduled "
                          f"(target {target.kind.name})")
    lowered = lower(mod, target, winograd)
    tuned = 0
    if database is not None:
        written = _scheduled(lowered)
        with target, database:
            lowered = relax.transform.MetaScheduleApplyDatabase()(lowered)
        tuned = len(_scheduled(lowered) - written)
    if default_schedule:
        with target:
            lowered = (DefaultCPUSchedule() if target.kind.name == "llvm"
                       else DefaultGPUSchedule())(lowered)
    for func_name, inputs in (donated or {}).items():
        lowered = HoistStateUpdates(func_name, inputs)(lowered)
        lowered = InPlaceStateUpdate(func_name, inputs)(lowered)
    # The generic pipeline on every target, as CPUs get by default: TVM's GPU pipeline would
    # fuse the scheduled kernels again, into kernels that no rule scheduled.
    return tvm.compile(lowered, target=target, relax_pipeline=relax.get_pipeline("default")), tuned


def _scheduled(mod: tvm.IRModule) -> set[str]:
    """Names of the module's kernels that carry a schedule (a record's or one written so)."""
    return {gvar.name_hint for gvar, func in mod.functions.items()
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None
            and SCHEDULED_ATTR in func.attrs}


def extract_tasks(mods: Iterable[tvm.IRModule], target: tvm.target.Target
                  ) -> list[ms.ExtractedTask]:
    """The distinct kernels of the modules (after :func:`lower`), with their call counts summed
    over all modules as weights; kernels written already scheduled (Winograd's) are left out."""
    seen = ms.database.MemoryDatabase()
    workloads: list[ms.database.Workload] = []
    tasks: list[ms.ExtractedTask] = []
    weights: list[int] = []
    for mod in mods:
        for task in ms.relax_integration.extract_tasks(lower(mod, target), target):
            attrs = task.dispatched[0]["main"].attrs
            if attrs is not None and SCHEDULED_ATTR in attrs:
                continue
            workload = seen.commit_workload(task.dispatched[0])
            index = next((i for i, w in enumerate(workloads) if w.same_as(workload)), None)
            if index is None:
                workloads.append(workload)
                tasks.append(task)
                weights.append(int(task.weight))
            else:
                weights[index] += int(task.weight)
    return [ms.ExtractedTask(t.task_name, t.mod, t.target, list(t.dispatched), w)
            for t, w in zip(tasks, weights)]


def heaviest(tasks: list[ms.ExtractedTask], count: int) -> list[ms.ExtractedTask]:
    """The ``count`` tasks with the most floating-point work per step (FLOPs x calls)."""
    work = lambda task: s_tir.analysis.estimate_tir_flops(task.dispatched[0]) * task.weight
    return sorted(tasks, key=work, reverse=True)[:count]


def without_records(tasks: list[ms.ExtractedTask], directory: str | os.PathLike, cpu: str
                    ) -> list[ms.ExtractedTask]:
    """The tasks whose kernel has no record for ``cpu`` in the database of ``directory``."""
    if not (Path(directory) / RECORDS).is_file():
        return tasks
    database = records_for(open_database(directory), cpu)
    return [t for t in tasks if not database.has_workload(t.dispatched[0])]


def export_aarch64(module: tvm.runtime.Module) -> str:
    """MetaSchedule builder export for boards: a shared library linked by the cross compiler,
    so the board needs no compiler."""
    path = os.path.join(tempfile.mkdtemp(), "kernel.so")
    module.export_library(path, fcompile=tvm.support.cc.cross_compiler(AARCH64_CXX))
    return path


def builder(spec: TargetSpec, jobs: int) -> ms.builder.LocalBuilder:
    if spec.cross_compiled and not shutil.which(AARCH64_CXX):
        raise ConfigError(f"target {spec.name} needs the cross compiler {AARCH64_CXX}")
    # Generous timeouts: each build starts a worker that imports TVM, slow on a busy machine.
    return ms.builder.LocalBuilder(max_workers=jobs, timeout_sec=300,
                                   f_export=export_aarch64 if spec.cross_compiled else None)


def runner(tracker: str | None, key: str | None, repeat: int = 3) -> ms.runner.Runner:
    """The local runner, or an RPC runner through a tracker (``HOST:PORT``) for the board
    registered under ``key``."""
    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=repeat, min_repeat_ms=20,
                                          enable_cpu_cache_flush=False)
    if tracker is None:
        return ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=120)
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit() or not key:
        raise ConfigError(f"rpc tracker {tracker!r} / key {key!r}: expected HOST:PORT and a key")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key,
                                 session_timeout_sec=120)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)


@derived_object
class Progress(ms.measure_callback.PyMeasureCallback):
    """Reports each measured batch: trials so far, the task and its best time."""

    def __init__(self, names: list[str], total: int, say: Callable[[str], None]) -> None:
        super().__init__()
        self.names, self.total, self.say = names, total, say
        self.done = 0
        self.best = [float("inf")] * len(names)

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
              runner_results) -> None:
        self.done += len(runner_results)
        times = [sum(r.run_secs) / len(r.run_secs) for r in runner_results
                 if r.error_msg is None and r.run_secs]
        failed = len(runner_results) - len(times)
        self.best[task_id] = min([self.best[task_id], *(float(t) for t in times)])
        best = "no valid run" if self.best[task_id] == float("inf") \
            else f"best {self.best[task_id] * 1e3:.3f} ms"
        self.say(f"trials {self.done:5d}/{self.total}  task {task_id + 1:3d}/{len(self.names)} "
                 f"{self.names[task_id][:40]:40} {best}" + (f" ({failed} failed)" if failed
                                                             else ""))


def tune(tasks: list[ms.ExtractedTask], work_dir: str | os.PathLike, trials: int,
         builder: ms.builder.Builder, runner: ms.runner.Runner,
         say: Callable[[str], None] = print, seed: int | None = None, verbose: bool = False
         ) -> ms.database.JSONDatabase:
    """Tune the tasks with MetaSchedule's evolutionary search for ``trials`` measurements in all,
    recording into the JSON database of ``work_dir``. A work directory that already holds a
    database resumes: its records seed the search, and new ones are appended. MetaSchedule's
    own log goes to ``work_dir/logs`` (and to the console when ``verbose``)."""
    work_dir = os.fspath(work_dir)
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.INFO if verbose
                                                           else logging.WARNING)
    database = open_database(work_dir)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir, seed=seed)
    per_iter = max(1, min(64, trials // max(1, len(tasks))))
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"),
                 Progress([t.task_name for t in tasks], trials, say)]
    return ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir,
                              max_trials_global=trials, num_trials_per_iter=per_iter,
                              builder=builder, runner=runner, database=database,
                              measure_callbacks=callbacks)


def _write(directory: str | os.PathLike, fill: Callable[[ms.database.Database], None]) -> int:
    """Build a new database with ``fill`` and replace ``directory`` with it. Returns the number
    of records written."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    tmp.chmod(0o755)
    fill(open_database(tmp))
    count = len(open_database(tmp).get_all_tuning_records())
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return count


def _copy_best(sources: Iterable[ms.database.Database], out: ms.database.Database,
               keep: Callable[[ms.database.TuningRecord], bool] = lambda record: True) -> None:
    """Commit to ``out`` the fastest record of each workload and CPU among the sources'
    records that ``keep`` accepts."""
    pools: dict[str, ms.database.MemoryDatabase] = {}
    for source in sources:
        for record in source.get_all_tuning_records():
            if keep(record):
                pool = pools.setdefault(cpu_of(record.target), ms.database.MemoryDatabase())
                pool.commit_tuning_record(ms.database.TuningRecord(
                    record.trace, pool.commit_workload(record.workload.mod), record.run_secs,
                    record.target, record.args_info))
    for pool in pools.values():
        for workload in pool.workloads:
            for best in pool.get_top_k(workload, 1):
                out.commit_tuning_record(ms.database.TuningRecord(
                    best.trace, out.commit_workload(workload.mod), best.run_secs, best.target,
                    best.args_info))


def merge(sources: list[str | os.PathLike], destination: str | os.PathLike,
          keep: Callable[[ms.database.TuningRecord], bool] = lambda record: True) -> int:
    """Merge databases into ``destination`` (its own records included), keeping the fastest
    record per workload and CPU (of the records ``keep`` accepts). Returns the number of
    records kept."""
    for source in sources:
        if not (Path(source) / RECORDS).is_file():
            raise ConfigError(f"{os.fspath(source)}: no tuning database ({RECORDS})")
    databases = [open_database(s) for s in [*sources, destination]
                 if (Path(s) / RECORDS).is_file()]
    return _write(destination, lambda out: _copy_best(databases, out, keep))


def slower_than_default(tasks: list[ms.ExtractedTask], directory: str | os.PathLike,
                        target: tvm.target.Target, builder: ms.builder.Builder,
                        runner: ms.runner.Runner) -> ms.database.MemoryDatabase:
    """The workloads whose best record for the target's CPU in ``directory`` is not faster
    than ``DefaultCPUSchedule``'s schedule of the kernel, timed now with the same builder and
    runner (a record worth keeping must beat what compiles without it)."""
    database = records_for(open_database(directory), cpu_of(target))
    tasks = [t for t in tasks if database.has_workload(t.dispatched[0])]
    kernels = [t.dispatched[0]["main"] for t in tasks]
    built = builder.build([ms.builder.BuilderInput(
        tvm.IRModule({"main": schedule_kernel(k, target)}), target) for k in kernels])
    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    runs = runner.run([ms.runner.RunnerInput(b.artifact_path, device,
                                             ms.arg_info.ArgInfo.from_prim_func(k))
                       for b, k in zip(built, kernels) if b.error_msg is None])
    default_secs = iter(_mean_secs(r.result()) for r in runs)
    slower = ms.database.MemoryDatabase()
    for task, build in zip(tasks, built):
        default = next(default_secs) if build.error_msg is None else None
        best = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
        if default is not None and best and _mean_secs(best[0]) >= default:
            slower.commit_workload(task.dispatched[0])
    return slower


def except_slower(slower: ms.database.MemoryDatabase, cpu: str
                  ) -> Callable[[ms.database.TuningRecord], bool]:
    """A ``keep`` for :func:`merge` and :func:`prune` that drops the records tuned on ``cpu``
    of the workloads in ``slower`` (from :func:`slower_than_default`); other CPUs' records
    stay, as they cannot be timed here."""
    return lambda record: (cpu_of(record.target) != cpu
                           or not slower.has_workload(record.workload.mod))


def _mean_secs(result) -> float:
    """Mean measured seconds of a runner result or tuning record (inf if it has none)."""
    secs = [float(s) for s in (result.run_secs or [])]
    return sum(secs) / len(secs) if secs and getattr(result, "error_msg", None) is None \
        else float("inf")


def prune(directory: str | os.PathLike, tasks: list[ms.ExtractedTask],
          keep: Callable[[ms.database.TuningRecord], bool] = lambda record: True) -> int:
    """Keep only the best record per CPU of each workload that one of ``tasks`` uses (of the
    records ``keep`` accepts). Returns the number of records kept."""
    if not (Path(directory) / RECORDS).is_file():
        raise ConfigError(f"{os.fspath(directory)}: no tuning database ({RECORDS})")
    used = ms.database.MemoryDatabase()
    for task in tasks:
        used.commit_workload(task.dispatched[0])
    database = open_database(directory)
    return _write(directory, lambda out: _copy_best(
        [database], out, lambda record: used.has_workload(record.workload.mod) and keep(record)))
