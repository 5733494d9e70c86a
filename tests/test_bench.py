"""tools/bench.py's measurement helpers on tiny configs: the kernel profile, peak memory, the
forward+update step and the FLOP count of the per-layer roofline floor."""

import importlib.util
import math
import os
import sys

import numpy as np
import onnx
import pytest
import torch
import tvm
from tvm import relax
from tvm.s_tir.analysis import estimate_tir_flops

import gftvm
from gftvm import models, targets, trainable, tuning
from gftvm.frontend import ort
from gftvm.passes.gradient_filter import ConvGeometry

TOOLS = os.path.join(os.path.dirname(__file__), os.pardir, "tools")
sys.path.insert(0, TOOLS)
import bench_profile  # noqa: E402
import bench_steps  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_cli", os.path.join(TOOLS, "bench.py"))
bench_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_cli)


def test_profile_kernels_account_for_the_step(mcunet_onnx, tmp_path):
    gftvm.compile(mcunet_onnx, trainable="last:2", batch_size=2, schedules=False).save(tmp_path)
    profile = bench_profile.profile_in_fresh_process(os.fspath(tmp_path), threads=1, repeat=5)
    families = profile.family()
    convs = sum(node.op_type == "Conv" for node in onnx.load(mcunet_onnx).graph.node)
    assert families.calls["conv2d"] >= convs      # every forward conv is a recorded call
    assert all(us > 0 for name, us in profile.us.items() if not bench_profile.is_builtin(name))
    # kernels timed alone, counted per call, make up much of the step, and not more
    assert 0.25 < profile.kernel_us / (profile.step_ms * 1e3) < 1.5
    assert profile.calls["vm.builtin.alloc_tensor"] > 0
    table = bench_profile.side_by_side({"BP": profile, "again": profile}, top=3).splitlines()
    assert table[2].startswith("conv2d ")   # the slowest kind of kernel of this net
    assert any(row.startswith("vm.builtin.alloc_tensor ") for row in table)


def test_peak_growth_sees_what_a_step_allocates(tmp_path):
    # In a fresh process, as the benchmark measures. What a long-lived process did before changes
    # the reading: in a pytest-xdist worker, after other modules' tests, 64 MiB read as 0 MiB.
    script = tmp_path / "peak.py"
    script.write_text(f"import json, sys; sys.path.insert(0, {TOOLS!r}); import numpy as np\n"
                      "from bench_steps import peak_growth_mib\n"
                      "print(json.dumps({'allocating': peak_growth_mib(lambda: np.ones(8 << 20)"
                      ".sum(), steps=2), 'idle': peak_growth_mib(lambda: None, steps=2)}))\n")
    growth = bench_steps.run_fresh(script, [], "peak growth")
    assert growth["allocating"] > 60  # 64 MiB
    assert growth["idle"] < 8


def test_train_steps_measured_in_fresh_processes(artifact_dir, tmp_path):
    manifest = gftvm.runtime.load(artifact_dir).manifest
    torch.save(models.build("mcunet").state_dict(), tmp_path / bench_steps.MODEL_STATE)
    variants = [{"kind": "gftvm", "dir": os.fspath(artifact_dir)},
                {"kind": "torch", "dir": os.fspath(tmp_path), "model": "mcunet",
                 "trainable": manifest["trainable"], "patches": {}}]
    for variant in variants:
        result = bench_steps.measure_in_fresh_process({**variant, "batch": 4, "image_size": 32},
                                                      threads=1, repeat=3, memory_steps=2)
        assert 0 < result["peak_mib"] < 200   # MiB, not KiB or bytes
        assert 0 < result["ms"] < 10_000


def test_ort_baseline_trains_exactly_the_same_parameters(tmp_path):
    model = models.build("mcunet")
    models.export_onnx(model, tmp_path / "m.onnx", (1, 3, 32, 32))
    trained = trainable.resolve(onnx.load(tmp_path / "m.onnx"), "last:2")
    base = {"batch": 2, "image_size": 32}
    variant = bench_cli.ort_variant(model, trained, os.fspath(tmp_path), base)
    assert variant is not None
    assert ort.signature(ort.load_artifact(variant["dir"])).trainable == trained
    assert bench_cli.ort_variant(model, [*trained, "no.such.weight"], os.fspath(tmp_path),
                                 base) is None


def _loops(func: tvm.tirx.PrimFunc, block: str) -> list[tvm.tirx.For]:
    """The loops around one block of a kernel, outermost first."""
    sch = tvm.s_tir.Schedule(func)
    return [sch.get(loop) for loop in sch.get_loops(sch.get_sblock(block))]


@pytest.mark.parametrize("layer", [
    ConvGeometry(2, (2, 8, 6, 10), (8, 8, 3, 3), (2, 8, 6, 10), (1, 1), (1, 1), 1),
    ConvGeometry(2, (2, 8, 7, 9), (8, 8, 3, 3), (2, 8, 7, 9), (1, 1), (1, 1), 1),  # partial
    ConvGeometry(4, (1, 16, 8, 8), (16, 16, 3, 3), (1, 16, 8, 8), (1, 1), (1, 1), 1),
    ConvGeometry(2, (2, 8, 12, 10), (6, 4, 3, 3), (2, 6, 6, 5), (2, 2), (1, 1), 2),
], ids=["R2", "R2-partial", "R4", "stride2-groups2"])
def test_filtered_backward_costs_match_the_compiled_function(layer):
    """The hand counts from shapes vs the lowered filtered backward: bytes vs its signature,
    FLOPs vs TVM's estimate of its kernels. The estimate of the average pool also counts the
    integer arithmetic of its divisor (count_include_pad=False), so there its sum is compared,
    and one divide per pooled value."""
    counted = bench_cli.filtered_backward_flops(layer)
    lowered = tuning.lower(bench_cli.filtered_backward_module(layer),
                           targets.get("host").tvm_target())
    kernels = {gv.name_hint: f for gv, f in lowered.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc)}
    pool = kernels.pop("avg_pool2d")
    pooled_values = math.prod(int(loop.extent) for loop in _loops(pool, "pool_avg"))
    assert counted["g_pool"] == estimate_tir_flops(_loops(pool, "pool_sum")[0]) + pooled_values
    estimated = sum(estimate_tir_flops(tvm.IRModule({"main": f})) for f in kernels.values())
    assert sum(counted.values()) - counted["g_pool"] == estimated
    assert counted["gx_low"] >= counted["gw"] > 0
    function = lowered["backward"]
    tensors = [param.ty for param in function.params] + list(function.ret_ty.fields)
    assert bench_cli.filtered_backward_bytes(layer) == sum(
        math.prod(int(d) for d in ty.shape) * 4 for ty in tensors)


def test_layer_profile_times_every_kernel_of_the_backward():
    """One row per kernel call of the compiled filtered backward, named as the lowered
    module's kernels, each with a measured time and its arguments' bytes."""
    layer = ConvGeometry(2, (2, 8, 6, 10), (8, 8, 3, 3), (2, 8, 6, 10), (1, 1), (1, 1), 1)
    executable = bench_cli.compiled_filtered_backward(layer)
    rng = np.random.default_rng(0)
    inputs = [tvm.runtime.tensor(rng.normal(size=shape).astype("float32"))
              for shape in (layer.y_shape, (2, 8, *layer.blocks), layer.w_shape)]
    lines = bench_cli.layer_profile(layer, executable, inputs, flops_rate=1e11,
                                    bandwidth=1e10, repeat=2)
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[1:]}
    lowered = tuning.lower(bench_cli.filtered_backward_module(layer),
                           targets.get("host").tvm_target())
    kernels = {gv.name_hint for gv, f in lowered.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc)}
    # every row a kernel; a reshape kernel may run as the VM's builtin (a view) instead
    assert {"avg_pool2d", "sum", "conv2d_transpose", "einsum"} <= set(rows) <= kernels
    assert len(rows) == len(lines) - 1 and all(row[0] > 0 for row in rows.values())
    assert all(math.isfinite(row[1]) for row in rows.values())  # in place: can be < 0 (noise)
    einsum_bytes = 4 * (2 * 2 * 8 * math.prod(layer.blocks) + 8 * 8)  # g_pool, x_sum -> (8, 8)
    assert rows["einsum"][4] == pytest.approx(einsum_bytes / 1e6, abs=0.05)


def test_in_place_cost_skips_the_kernel():
    """The hook behind the profile's in-place column skips just the kernel it names: grad_x is
    not computed when its low-resolution product is skipped, grad_w still is."""
    layer = ConvGeometry(2, (2, 8, 6, 10), (8, 8, 3, 3), (2, 8, 6, 10), (1, 1), (1, 1), 1)
    executable = bench_cli.compiled_filtered_backward(layer)
    rng = np.random.default_rng(0)
    inputs = [tvm.runtime.tensor(rng.normal(size=shape).astype("float32"))
              for shape in (layer.y_shape, (2, 8, *layer.blocks), layer.w_shape)]
    expected = [t.numpy() for t in relax.VirtualMachine(executable, tvm.cpu())["backward"](
        *inputs)]
    vm = relax.VirtualMachine(executable, tvm.cpu())
    vm.set_instrument(bench_profile.skipping("conv2d_transpose"))
    grad_x, grad_w = [t.numpy() for t in vm["backward"](*inputs)]
    assert not np.allclose(grad_x, expected[0])
    np.testing.assert_array_equal(grad_w, expected[1])


class _ClockedVM:
    """A stand-in for the Relax VM whose kernels take fixed times on a fake clock, calling the
    instrument hook before each the way the VM does (a nonzero return skips the kernel)."""

    def __init__(self, kernels: dict[str, float]) -> None:
        self.kernels, self.now, self.hook = kernels, 0.0, None

    def set_instrument(self, hook) -> None:
        self.hook = hook

    def clock(self) -> float:
        return self.now

    def __getitem__(self, function: str):
        def run():
            for symbol, seconds in self.kernels.items():
                if not self.hook(None, symbol, True, None):
                    self.now += seconds
        return run


def test_in_place_costs_are_what_skipping_each_kernel_saves(monkeypatch):
    vm = _ClockedVM({"pool": 0.003, "einsum": 0.001})
    monkeypatch.setattr("gftvm.timing.time.perf_counter", vm.clock)
    costs = bench_profile.in_place_ms(vm, "backward", [], ["pool", "einsum"], rounds=3, repeat=2)
    assert costs == pytest.approx({"pool": 3.0, "einsum": 1.0})


def test_roofline_floor_is_the_slower_bound():
    assert bench_cli.roofline_floor_ms(2e9, 1e9, 1e12, 1e12) == (2.0, 1.0, 2.0)
    assert bench_cli.roofline_floor_ms(1e9, 3e9, 1e12, 1e12) == (1.0, 3.0, 3.0)


def test_forward_update_steps_every_trained_parameter_without_backward():
    torch.manual_seed(0)
    model = models.build("mcunet").eval()
    trained = {name for name, _ in list(model.named_parameters())[-2:]}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    optimizer = bench_steps.momentum_sgd(model)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="no gradient"):
        bench_steps.forward_update(model, images, labels, optimizer)
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.ones_like(param)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step = bench_steps.forward_update(model, images, labels, optimizer)
    step()
    step()
    for name, param in model.named_parameters():
        # momentum 0.9, lr 1e-3, gradient 1: two steps move each weight by 1e-3 * (1 + 1.9)
        moved = 2.9e-3 if name in trained else 0.0
        np.testing.assert_allclose((before[name] - param.detach()).numpy(), moved, atol=1e-6)
        if name in trained:   # no backward ran: the gradients are the ones set above
            assert torch.equal(param.grad, torch.ones_like(param))
        else:
            assert param.grad is None


def test_fma_peak_kernel_does_every_multiply_add():
    """The peak kernel's result is the NumPy chain of its multiply-adds (nothing skipped or
    folded), and TVM counts 2 FLOPs per lane, vector, step and chunk in it."""
    kernel = bench_cli.fma_peak_kernel(chunks=2, lanes=4, vectors=3, steps=5)
    start = np.arange(24, dtype="float32").reshape(2, 12) / 24
    a = tvm.runtime.tensor(start)
    tvm.compile(tvm.IRModule({"main": kernel}), "llvm")["main"](a)
    expected = start.copy()
    for _ in range(5):
        expected = expected * np.float32(0.999) + np.float32(0.001)
    np.testing.assert_allclose(a.numpy(), expected, rtol=1e-6)
    assert estimate_tir_flops(tvm.IRModule({"main": kernel})) == 2 * 2 * 4 * 3 * 5


def test_median_ms_runs_for_at_least_min_seconds():
    """A short call is repeated until the runs take ``min_seconds``, beyond ``repeat``; a long
    one stops at ``repeat``."""
    from gftvm.timing import median_ms

    calls = []
    median_ms(lambda: calls.append(None), 3, warmup=0, min_seconds=0.02)
    assert len(calls) > 100
    calls.clear()
    median_ms(lambda: calls.append(None), 3, warmup=0)
    assert len(calls) == 3


def test_steps_are_timed_in_interleaved_rounds(monkeypatch):
    """Every variant is timed once per round, all of them in turn before the next round; the
    median round counts, peak memory comes from the first, and the naive-loop reference is
    timed in the first round only."""
    order = []
    times = {"bp": iter([5.0, 1.0, 3.0]), "gf": iter([2.0, 9.0, 4.0]), "naive": iter([7.0])}

    def measure(args, variant):
        order.append(variant)
        return {"ms": next(times[variant]), "peak_mib": 10.0 * len(order)}
    monkeypatch.setattr(bench_cli, "measure", measure)
    args = bench_cli.argparse.Namespace(rounds=3)
    results = bench_cli.measure_rounds(args, {"bp": "bp", "gf": "gf", "naive": "naive"},
                                       once={"naive"})
    assert order == ["bp", "gf", "naive", "bp", "gf", "bp", "gf"]
    assert results == {"bp": {"ms": 3.0, "peak_mib": 10.0}, "gf": {"ms": 4.0, "peak_mib": 20.0},
                       "naive": {"ms": 7.0, "peak_mib": 30.0}}


@pytest.mark.parametrize("no_naive", [False, True])
def test_no_naive_leaves_out_only_the_naive_loops(monkeypatch, tmp_path, no_naive):
    """--no-naive compiles no naive-loop step; the other variants stay (no records: no tuned)."""
    compiled = []

    class Artifact:
        manifest = {"tuned_kernels": 0}

        def save(self, directory):
            pass

    def compile(onnx_path, schedules, default_schedule, winograd, **options):
        compiled.append((default_schedule, winograd))
        return Artifact()
    monkeypatch.setattr(gftvm, "compile", compile)
    args = bench_cli.argparse.Namespace(batch=8, no_naive=no_naive)
    _, _, variants = bench_cli.compile_gftvm(args, "m.onnx", "last:4", None, 32, str(tmp_path))
    naive = [] if no_naive else ["naive_ms"]
    assert list(variants) == [*naive, "direct_ms", "gftvm_ms"]
    assert ((False, False) in compiled) == (not no_naive)


def test_step_plot_leaves_out_series_without_values():
    """A series that no row has (the naive loops under --no-naive) gets no bars and no legend
    entry; one that some rows lack keeps its slot."""
    rows = [{"model": "m", "train": "last:4", "method": "BP", "direct_ms": 2.0,
             "gftvm_ms": 1.5, "torch_bp_ms": 4.0},
            {"model": "m", "train": "last:4", "method": "GF R2", "direct_ms": 1.8,
             "gftvm_ms": 1.2, "torch_bp_ms": 4.0, "torch_gf_ms": 3.0}]
    _, ax = bench_cli.pyplot().subplots()
    bench_cli.grouped_bars(ax, rows, bench_cli.STEP_BARS["time"])
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["gftvm direct convs", "gftvm default", "PyTorch BP", "PyTorch GF"]
    assert len(ax.patches) == 2 * len(labels)


def test_layers_are_timed_in_interleaved_rounds(monkeypatch, tmp_path):
    """A shape's oneDNN BP, compiled GF and eager GF backwards are timed in turn, round after
    round, and the table holds each one's median round; the GF timed is the compiled
    backward (its results checked against PyTorch-eager GF)."""
    order, results = [], {}
    times = {"bp": iter([5.0, 1.0, 3.0]), "gf": iter([0.2, 0.9, 0.4]),
             "eager": iter([2.0, 6.0, 4.0])}

    def median_ms(run, repeat, min_seconds=0.0):
        kind = ("bp" if run.func is torch.ops.aten.convolution_backward else
                "eager" if run.func is bench_cli.eager_filtered_backward else "gf")
        order.append(kind)
        results[kind] = run()
        return next(times[kind])
    monkeypatch.setattr(bench_cli, "median_ms", median_ms)
    monkeypatch.setattr(bench_cli, "fma_peak_rate", lambda threads: 1e11)
    monkeypatch.setattr(bench_cli, "copy_bandwidth", lambda nbytes: 1e10)
    monkeypatch.setattr(bench_cli, "plot_layers", lambda rows, path: None)
    args = bench_cli.argparse.Namespace(
        shapes=[(4, 6, 8)], patch=[2], batch=2, rounds=3, repeat=1, threads=2,
        csv=str(tmp_path / "layers.csv"), plot=None, profile=None)
    bench_cli.bench_layers(args)
    assert order == ["bp", "gf", "eager"] * 3
    with open(args.csv) as f:
        row = list(bench_cli.csv.DictReader(line for line in f if not line.startswith("#")))[0]
    assert [float(row[k]) for k in ("torch_bp_ms", "gftvm_gf_ms", "eager_gf_ms")] == \
        [3.0, 0.4, 4.0]
    grad_x, grad_w = (t.numpy() for t in results["gf"])
    np.testing.assert_allclose(grad_x, results["eager"][0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_w, results["eager"][1].numpy(), rtol=1e-4, atol=1e-5)


def test_records_are_timed_against_default_schedules_in_rounds(monkeypatch, tmp_path):
    """Each step is compiled with default schedules and with the records, timed in turn round
    after round in this process; the CSV holds the median rounds and how often tuned won, and
    a step no record applies to is left out."""
    compiled, order = [], []
    times = {"default_ms": iter([5.0, 1.0, 3.0]), "tuned_ms": iter([4.0, 2.0, 2.0])}

    class Artifact:
        def __init__(self, schedules, filter):
            self.manifest = {"tuned_kernels": 3 if schedules and filter is None else 0}

        def save(self, directory):
            pass

    def compile_step(path, schedules, filter, **options):
        compiled.append((schedules, filter and filter.patch, options["trainable"]))
        return Artifact(schedules, filter)

    def median_ms(run, repeat, min_seconds=0.0):
        order.append(run())
        return next(times[run()])
    monkeypatch.setattr(gftvm, "compile", compile_step)
    monkeypatch.setattr(models, "export_zoo_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench_steps, "gftvm_step",
                        lambda variant: lambda: variant["dir"].rsplit("_", 2)[-2] + "_ms")
    monkeypatch.setattr(bench_cli, "median_ms", median_ms)
    args = bench_cli.argparse.Namespace(
        models=["mcunet"], train=["last:4"], image_size=[8], filter_patch=[2], batch=2,
        rounds=3, repeat=1, threads=2, csv=str(tmp_path / "records.csv"))
    bench_cli.bench_records(args)
    assert compiled == [(False, None, "last:4"), (True, None, "last:4"),
                        (False, 2, "last:4"), (True, 2, "last:4")]
    assert order == ["default_ms", "tuned_ms"] * 3
    with open(args.csv) as f:
        rows = list(bench_cli.csv.DictReader(line for line in f if not line.startswith("#")))
    assert [(r["method"], r["tuned_kernels"], r["default_ms"], r["tuned_ms"],
             r["default/tuned"], r["tuned_faster_rounds"]) for r in rows] == \
        [("BP", "3", "3.0", "2.0", "1.5", "2")]
