"""Tuning end to end: tools/tune.py measures through an RPC tracker and server on loopback,
the next compile applies the record, and the tuned train step still matches PyTorch."""

import pytest
import torch
import tvm
from torch import nn
from tvm import relax
from tvm.s_tir import meta_schedule as ms

import gftvm
from gftvm import models, targets, tuning
from reference import check_parity, export, free_port
from test_tools import run

IMAGE = 8


def tiny_conv_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    models.calibrate_batchnorm(model, torch.randn(16, 3, IMAGE, IMAGE))
    return model


@pytest.fixture(scope="module")
def rpc_tracker():
    """A tracker and a server registered with it under key ``loopback``, on 127.0.0.1."""
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker_port = free_port()
    tracker = Tracker("127.0.0.1", port=tracker_port, port_end=tracker_port + 1, silent=True)
    server_port = free_port()
    server = Server("127.0.0.1", port=server_port, port_end=server_port + 1, key="loopback",
                    tracker_addr=("127.0.0.1", tracker.port), silent=True)
    yield f"127.0.0.1:{tracker.port}"
    server.terminate()
    tracker.terminate()


@pytest.fixture(scope="module")
def tuned(rpc_tracker, tmp_path_factory):
    """The tiny net tuned for a few trials (its conv2d_transpose kernel) through the tracker."""
    tmp = tmp_path_factory.mktemp("tune")
    model = tiny_conv_net()
    path = export(model, tmp / "tiny.onnx", IMAGE)
    database = tmp / "schedules"
    out = run("tune.py", "tune", str(path), "--train", "all", "--batch", "4",
              "--ops", "conv2d_transpose", "--trials", "2", "--work-dir", str(tmp / "work"),
              "--rpc-tracker", rpc_tracker, "--rpc-key", "loopback", "--keep-all",
              "-o", str(database))
    assert "trials     2/2" in out
    return model, path, database


def commit_copy(record: ms.database.TuningRecord, database: ms.database.Database, secs: float,
                cpu: str | None = None) -> None:
    """Commit the record to ``database`` with its measured time (and its target's CPU)
    replaced."""
    target = record.target if cpu is None else \
        tvm.target.Target({**record.target.export(), "mcpu": cpu})
    database.commit_tuning_record(ms.database.TuningRecord(
        record.trace, database.commit_workload(record.workload.mod), [secs], target,
        record.args_info))


def test_tuned_record_is_applied_and_step_matches_pytorch(tuned, tmp_path):
    model, path, database = tuned
    records = tuning.open_database(database).get_all_tuning_records()
    assert len(records) == 1 and records[0].run_secs  # measured on the RPC server
    (tmp_path / "m").mkdir()
    session = check_parity(model, export(model, tmp_path / "m" / "tiny.onnx", IMAGE), "all",
                           "sgd", image_size=IMAGE, schedules=database)
    assert session.manifest["tuned_kernels"] == 1
    untuned = gftvm.compile(path, trainable="all", batch_size=4, schedules=False)
    assert untuned.manifest["tuned_kernels"] == 0


def test_tuned_kernel_differs_from_untuned(tuned):
    _, path, database = tuned
    program = gftvm.compiler.build_program(path, trainable="all", batch_size=4)
    target = targets.get("host").tvm_target()
    lowered = tuning.lower(program.mod, target)
    with target, tuning.open_database(database):
        scheduled = relax.transform.MetaScheduleApplyDatabase()(lowered)
    changed = [gv.name_hint for gv, func in scheduled.functions.items()
               if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None
               and tuning.SCHEDULED_ATTR in func.attrs]
    assert len(changed) == 1 and "conv2d_transpose" in changed[0]
    assert not lowered[changed[0]].same_as(scheduled[changed[0]])
    assert str(lowered[changed[0]]) != str(scheduled[changed[0]])


def test_merge_keeps_best_and_prune_drops_unused(tuned, tmp_path):
    _, path, database = tuned
    merged = tmp_path / "merged"
    run("tune.py", "merge", str(database), str(database), "-o", str(merged))
    records = tuning.open_database(merged).get_all_tuning_records()
    assert len(records) == 1  # one workload, the same record twice: the best is kept once
    other = export(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * IMAGE * IMAGE,
                                                                           10)),
                   tmp_path / "other.onnx", IMAGE)
    run("tune.py", "prune", str(merged), str(other), "--train", "all", "--batch", "4")
    assert tuning.open_database(merged).get_all_tuning_records() == []
    run("tune.py", "merge", str(database), "-o", str(merged))
    run("tune.py", "prune", str(merged), str(path), "--train", "all", "--batch", "4")
    assert len(tuning.open_database(merged).get_all_tuning_records()) == 1


def test_prune_drops_records_slower_than_the_default(tuned, tmp_path):
    """The record's measured time set to 1000 s: prune --drop-slower drops it, plain prune
    keeps it."""
    _, path, database = tuned
    (record,) = tuning.open_database(database).get_all_tuning_records()
    commit_copy(record, tuning.open_database(tmp_path / "slow"), 1e3)
    prune = ["tune.py", "prune", str(tmp_path / "slow"), str(path), "--train", "all",
             "--batch", "4"]
    run(*prune)
    assert len(tuning.open_database(tmp_path / "slow").get_all_tuning_records()) == 1
    assert "1 records no faster than the default" in run(*prune, "--drop-slower")
    assert tuning.open_database(tmp_path / "slow").get_all_tuning_records() == []


def test_schedules_option_errors(tuned, tmp_path):
    _, path, _ = tuned
    with pytest.raises(gftvm.ConfigError, match="no tuning database"):
        gftvm.compile(path, trainable="all", batch_size=4, schedules=tmp_path)
    with pytest.raises(gftvm.ConfigError, match="HOST:PORT"):
        tuning.runner("nohost", "key")


def test_records_of_another_cpu_are_skipped(tuned, tmp_path):
    """A database with the record tuned on this CPU and a faster one of the same kernel tuned
    on cortex-a53: compile applies this CPU's record (with a warning about the other), merge
    and prune keep both, and ``except_slower`` drops only this CPU's."""
    _, path, database = tuned
    (record,) = tuning.open_database(database).get_all_tuning_records()
    cpu = tuning.cpu_of(targets.get("host").tvm_target())
    assert tuning.cpu_of(record.target) == cpu
    mixed = tuning.open_database(tmp_path / "mixed")
    commit_copy(record, mixed, 1.0, cpu)
    commit_copy(record, mixed, 1e-6, "cortex-a53")
    with pytest.warns(UserWarning, match=f"skipped the records tuned on cortex-a53; this "
                                         f"target's CPU is {cpu}, with 1 records"):
        applied = tuning.database_for(targets.get("host"), tmp_path / "mixed", lambda m: None)
    assert [(tuning.cpu_of(r.target), [float(s) for s in r.run_secs])
            for r in applied.get_all_tuning_records()] == [(cpu, [1.0])]

    assert tuning.merge([tmp_path / "mixed"], tmp_path / "merged") == 2
    tasks = tuning.extract_tasks([gftvm.compiler.build_program(path, "all", 4).mod],
                                 tuning.tuning_target(targets.get("host")))
    slower = ms.database.MemoryDatabase()
    slower.commit_workload(record.workload.mod)
    assert tuning.prune(tmp_path / "merged", tasks) == 2
    assert tuning.prune(tmp_path / "merged", tasks, tuning.except_slower(slower, cpu)) == 1
    (left,) = tuning.open_database(tmp_path / "merged").get_all_tuning_records()
    assert tuning.cpu_of(left.target) == "cortex-a53"

    only_other = tmp_path / "other"
    tuning.merge([tmp_path / "merged"], only_other)
    with pytest.warns(UserWarning, match="with 0 records"):
        assert tuning.database_for(targets.get("host"), only_other, lambda m: None) is None


@pytest.mark.parametrize("record_secs, dropped", [(1e3, True), (1e-12, False)])
def test_records_no_faster_than_the_default_are_dropped(tuned, tmp_path, record_secs, dropped):
    """slower_than_default times the default schedule of the kernel and compares it with the
    record's measured time (here set to 1000 s and to 1 ps)."""
    _, path, database = tuned
    (record,) = tuning.open_database(database).get_all_tuning_records()
    commit_copy(record, tuning.open_database(tmp_path), record_secs)
    spec = targets.get("host")
    tasks = tuning.extract_tasks([gftvm.compiler.build_program(path, "all", 4).mod],
                                 tuning.tuning_target(spec))
    slower = tuning.slower_than_default(tasks, tmp_path, tuning.tuning_target(spec),
                                        tuning.builder(spec, 1), tuning.runner(None, None))
    assert slower.has_workload(record.workload.mod) == dropped
