"""DefaultGPUSchedule: which dlight rule schedules which kernel (Before/Expected), the rule
failures it passes over, and whole train steps compiled for the Jetson Nano's GPU: every kernel
within sm_53's limits, and the CUDA C that TVM writes for them compiled offline to sm_53 machine
code with CUDA 12.9's NVRTC and ptxas (CUDA 13 dropped sm_53). No GPU runs them here, so these
tests check the schedules' structure and code, and what they compute with their threads run
one after another on the CPU."""

import ctypes
import pathlib
import re
import subprocess

import nvidia.cuda_cccl
import nvidia.cuda_nvcc
import nvidia.cuda_nvrtc
import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir import meta_schedule as ms

import gftvm
from gftvm import compiler, tuning
from gftvm.errors import ConfigError, UnsupportedOpError
from gftvm.passes import gpu_schedule
from gftvm.passes.gpu_schedule import (SCHEDULED_ATTR, DefaultGPUSchedule, longest_reduction,
                                       schedule_gpu_kernel)
from reference import export, prepared_model

JETSON_GPU = tvm.target.Target("nvidia/jetson-nano", host={"kind": "llvm"})


def only_kernel(build, *params: tuple[tuple[int, ...], str]) -> tirx.PrimFunc:
    """The one legalized kernel of a one-op Relax function ``build(*params)``."""
    bb = relax.BlockBuilder()
    args = [relax.Var(f"p{i}", relax.TensorType(shape, dtype))
            for i, (shape, dtype) in enumerate(params)]
    with bb.function("main", args):
        with bb.dataflow():
            out = bb.emit_output(build(*args))
        bb.emit_func_output(out)
    (func,) = [f for f in tuning.lower(bb.get(), JETSON_GPU).functions.values()
               if isinstance(f, tirx.PrimFunc)]
    return func


def by_rule(rule: dlight.ScheduleRule, func: tirx.PrimFunc) -> tirx.PrimFunc:
    return rule.apply(func, JETSON_GPU, False).mod["main"].with_attr(SCHEDULED_ATTR, True)


CONV = (lambda x, w: relax.op.nn.conv2d(x, w, padding=1),
        ((8, 16, 8, 8), "float32"), ((16, 16, 3, 3), "float32"))
SPATIAL_SUM = (lambda x: relax.op.sum(x, axis=[2, 3]), ((8, 16, 8, 8), "float32"))
RELU = (lambda x: relax.op.nn.relu(x), ((8, 16, 8, 8), "float32"))
#: Sums 9 values per output, fewer than a warp.
DEPTHWISE_RELU = (lambda x, w: relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1, groups=16)),
                  ((8, 16, 8, 8), "float32"), ((16, 1, 3, 3), "float32"))
POOL = (lambda x: relax.op.nn.avg_pool2d(x, 2, 2), ((8, 16, 8, 8), "float32"))
#: dlight's Reduction rule asserts on it (its sum reads no buffer); batch 32: a warp long.
LOSS_GRAD = (lambda g, p, t: relax.op.grad.nll_loss_backward(g, p, t),
             ((), "float32"), ((32, 10), "float32"), ((32,), "int64"))


@pytest.mark.parametrize("case, rule", [
    (CONV, dlight.gpu.Matmul()),
    (SPATIAL_SUM, dlight.gpu.Reduction()),
    (RELU, dlight.gpu.Fallback()),
    (DEPTHWISE_RELU, gpu_schedule.ThreadPerOutput()),
    (POOL, gpu_schedule.ThreadPerOutput()),
    (LOSS_GRAD, dlight.gpu.GeneralReduction()),
], ids=["conv-matmul", "sum-reduction", "relu-fallback", "depthwise-thread-per-output",
        "pool-thread-per-output", "loss-grad-general-reduction"])
def test_each_kind_of_kernel_gets_its_rule(case, rule):
    """The first dlight rule that schedules it, less the cross-thread rules where it sums fewer
    values than a warp."""
    before = only_kernel(*case)
    tvm.ir.assert_structural_equal(schedule_gpu_kernel(before, JETSON_GPU), by_rule(rule, before))


def launches(func: tirx.PrimFunc) -> int:
    """How many kernels ``func`` launches: its loops bound to blockIdx.x."""
    count = 0

    def visit(loop: tirx.For) -> None:
        nonlocal count
        count += loop.kind == tirx.ForKind.THREAD_BINDING and \
            loop.thread_binding.thread_tag == "blockIdx.x"
    tvm_ffi.structural_walk(func.body, [(tirx.For, visit)])
    return count


def test_reduction_and_its_epilogue_are_one_kernel():
    """dlight's Fallback launches the fused depthwise conv and its ReLU as two kernels, the
    conv's output going through global memory; ThreadPerOutput as one, the conv's value of
    each thread kept in a register (local scope)."""
    before = only_kernel(*DEPTHWISE_RELU)
    assert launches(by_rule(dlight.gpu.Fallback(), before)) == 2
    after = schedule_gpu_kernel(before, JETSON_GPU)
    assert launches(after) == 1
    assert [buffer.scope() for buffer in after.body.block.alloc_buffers] == ["local"]


def serial(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its thread-bound loops run one iteration after another, as a CPU kernel.
    TIR's semantics are sequential (binding a loop to threads only maps it), so this computes
    what the schedule means: it checks a schedule's indices, predicates, fused ops and
    shared-memory staging, not the lowering that makes threads of it (barriers, sums across
    threads) or the CUDA code."""
    def unbind(loop: tirx.For) -> tirx.For:
        if loop.kind != tirx.ForKind.THREAD_BINDING:
            return loop
        return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body)
    return tvm_ffi.structural_map(func, (tirx.For, unbind)).with_attr("global_symbol", "main")


def run_serially(func: tirx.PrimFunc, *inputs: np.ndarray, out_shape) -> np.ndarray:
    """The one float32 output of GPU kernel ``func`` run :func:`serial` on the CPU."""
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"))
    library = tvm.compile(tvm.IRModule({"main": serial(func)}), target="llvm")
    library["main"](*[tvm.runtime.tensor(x) for x in inputs], out)
    return out.numpy()


@pytest.mark.parametrize("build, reference, shapes", [
    (DEPTHWISE_RELU[0], lambda x, w: torch.relu(torch.conv2d(x, w, padding=1, groups=16)),
     [shape for shape, _ in DEPTHWISE_RELU[1:]]),
    # 735 outputs: one thread block of 1024 whose last threads compute nothing
    (lambda x, w, b: relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=1, groups=5) + b),
     lambda x, w, b: torch.relu(torch.conv2d(x, w, b.flatten(), padding=1, groups=5)),
     [(3, 5, 7, 7), (5, 1, 3, 3), (1, 5, 1, 1)]),
    (POOL[0], lambda x: torch.nn.functional.avg_pool2d(x, 2, 2), [POOL[1][0]]),
], ids=["depthwise-relu", "depthwise-bias-relu-partial-block", "pool"])
def test_thread_per_output_schedules_compute_the_op(build, reference, shapes):
    """The GPU schedule, its threads run serially on the CPU, against PyTorch."""
    func = schedule_gpu_kernel(only_kernel(build, *[(s, "float32") for s in shapes]),
                               JETSON_GPU)
    assert launches(func) == 1
    inputs = [torch.randn(shape, generator=torch.Generator().manual_seed(i))
              for i, shape in enumerate(shapes)]
    expected = reference(*inputs).numpy()
    got = run_serially(func, *[x.numpy() for x in inputs], out_shape=expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


#: A depthwise 1x1 conv (a dead-tap-pruned 3x3 one on a 1x1 map) and BatchNorm's subtraction:
#: a reduction whose reduction axes all have extent 1, with an op after it.
UNIT_REDUCTION = (lambda x, w, m: relax.op.nn.conv2d(x, w, groups=4) - m,
                  ((2, 4, 1, 1), "float32"), ((4, 1, 1, 1), "float32"), ((1, 4, 1, 1), "float32"))


def test_unit_reductions_are_computed_once():
    """dlight's Fallback inlines the subtraction into the reduction's initialisation and its
    update alike (x·w - 2m); the reduction rewritten as elementwise first, it is x·w - m. (If the
    first assertion fails, TVM fixed this and ``without_unit_reductions`` can go.)"""
    rng = np.random.default_rng(0)
    x, w, m = (rng.normal(size=shape).astype("float32") for shape, _ in UNIT_REDUCTION[1:])
    expected = x * w.reshape(1, 4, 1, 1) - m
    before = only_kernel(*UNIT_REDUCTION)
    dlight_only = run_serially(by_rule(dlight.gpu.Fallback(), before), x, w, m,
                               out_shape=expected.shape)
    np.testing.assert_allclose(dlight_only, expected - m, rtol=1e-6)
    ours = run_serially(schedule_gpu_kernel(before, JETSON_GPU), x, w, m, out_shape=expected.shape)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_short_reductions_skip_the_cross_thread_rules():
    """dlight's GeneralReduction would take the fused depthwise conv (a block of 256 threads
    per output value, 9 of them summing) and its Reduction the pool (4 threads per block)."""
    before = only_kernel(*DEPTHWISE_RELU)
    assert longest_reduction(before) == 9
    assert dlight.gpu.GeneralReduction().apply(before, JETSON_GPU, False) is not None
    pool = only_kernel(*POOL)
    assert longest_reduction(pool) == 4
    assert dlight.gpu.Reduction().apply(pool, JETSON_GPU, False) is not None


def test_reduction_rule_fails_on_the_loss_gradient():
    """What the loss-gradient case above passes over."""
    with pytest.raises(AssertionError):
        dlight.gpu.Reduction().apply(only_kernel(*LOSS_GRAD), JETSON_GPU, False)


def test_kernel_no_rule_schedules_is_an_error_naming_it(monkeypatch):
    monkeypatch.setattr(gpu_schedule, "RULES", (dlight.gpu.Matmul(),))
    with pytest.raises(UnsupportedOpError, match="kernel relu_7: no GPU schedule rule applies"):
        schedule_gpu_kernel(only_kernel(*RELU), JETSON_GPU, "relu_7")


def test_tuned_kernels_are_left_alone():
    func = only_kernel(*CONV).with_attr(SCHEDULED_ATTR, True)
    with JETSON_GPU:
        out = DefaultGPUSchedule()(tvm.IRModule({"conv": func}))
    tvm.ir.assert_structural_equal(out["conv"], func)


def test_gpu_kernels_need_a_schedule():
    with pytest.raises(ConfigError, match="default_schedule=False: GPU kernels cannot run"):
        tuning.compile_module(tvm.IRModule(), JETSON_GPU, None, default_schedule=False)


def test_jetson_target_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="aarch64 needs a CUDA 13 driver and JetPack 4.6 "
                                          "ships CUDA 10.2"):
        gftvm.compile(tmp_path / "never_read.onnx", target="jetson-nano")


def within_limits(func: tirx.PrimFunc, target: tvm.target.Target) -> bool:
    """MetaSchedule's check of a GPU kernel against the target's threads per block, shared
    memory and vector width."""
    check = ms.postproc.VerifyGPUCode()
    check._initialize_with_tune_context(ms.TuneContext(mod=tvm.IRModule({"main": func}),
                                                       target=target))
    return check.apply(s_tir.Schedule(func))


def test_limit_check_can_fail():
    one_warp = tvm.target.Target({**JETSON_GPU.export(), "max_threads_per_block": 32,
                                  "max_num_threads": 32}, host={"kind": "llvm"})
    relu = schedule_gpu_kernel(only_kernel(*RELU), JETSON_GPU)  # 1024 threads per block
    assert within_limits(relu, JETSON_GPU) and not within_limits(relu, one_warp)


def nvrtc_ptx(source: str, arch: str) -> bytes:
    """PTX for virtual architecture ``arch`` (e.g. compute_53) from CUDA 12.9's NVRTC."""
    nvrtc = ctypes.CDLL(str(pathlib.Path(nvidia.cuda_nvrtc.__path__[0]) / "lib/libnvrtc.so.12"))
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernels.cu", 0,
                                    None, None) == 0
    include = pathlib.Path(nvidia.cuda_cccl.__path__[0]) / "include"
    options = [f"--gpu-architecture={arch}".encode(), f"-I{include}".encode()]
    status = nvrtc.nvrtcCompileProgram(program, len(options),
                                       (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert status == 0, log.value.decode()
    nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(program, ptx)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return ptx.value


def ptxas_entries(ptx: bytes, arch: str, tmp_path: pathlib.Path) -> set[str]:
    """Assemble ``ptx`` for ``arch`` (e.g. sm_53) with CUDA 12.9's ptxas; the names of the
    entry functions it compiled."""
    (tmp_path / "kernels.ptx").write_bytes(ptx)
    ptxas = pathlib.Path(nvidia.cuda_nvcc.__path__[0]) / "bin/ptxas"
    done = subprocess.run([str(ptxas), f"--gpu-name={arch}", "--verbose", "--output-file",
                           str(tmp_path / "kernels.cubin"), str(tmp_path / "kernels.ptx")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"Compiling entry function '(\w+)'", done.stderr))


@pytest.fixture(scope="module", params=[
    ("mobilenetv2-0.35", gftvm.GradientFilter(patch=2, layers="last:4")),
    ("resnet18", None),
    ("resnet18", gftvm.GradientFilter(patch=2, layers="last:4")),
], ids=["mobilenetv2-gf-r2", "resnet18-bp", "resnet18-gf-r2"])
def jetson_step(request, tmp_path_factory):
    """A train step (batch 8, ``last:4``) for the Jetson Nano's GPU: the program, its kernels
    before scheduling and after ``DefaultGPUSchedule``."""
    model, filter = request.param
    program = compiler.build_program(
        export(prepared_model(model), tmp_path_factory.mktemp(model) / "m.onnx"), "last:4", 8,
        filter=filter)
    lowered = tuning.lower(program.mod, JETSON_GPU)
    with JETSON_GPU:
        scheduled = DefaultGPUSchedule()(lowered)
    kernels = lambda mod: {gvar.name_hint: func for gvar, func in mod.functions.items()
                           if isinstance(func, tirx.PrimFunc)}
    return program, kernels(lowered), kernels(scheduled)


def test_train_step_compiles_for_the_jetson_gpu(jetson_step, tmp_path):
    """Every kernel of the train step gets a schedule within sm_53's limits, and TVM's CUDA C
    for them compiles to sm_53 machine code."""
    program, _, kernels = jetson_step
    assert [name for name, func in kernels.items() if not within_limits(func, JETSON_GPU)] == []

    executable, _ = tuning.compile_module(program.mod, JETSON_GPU, None)
    (cuda,) = [m for m in executable.mod.imports[0].imports if m.kind == "cuda"]
    ptx = nvrtc_ptx(cuda.inspect_source(), "compute_53")
    assert b".target sm_53" in ptx
    # TVM launches a kernel as one or more entry functions: NAME_kernel, NAME_kernel_1, ...
    launched = {re.sub(r"_kernel(_\d+)?$", "", entry)
                for entry in ptxas_entries(ptx, "sm_53", tmp_path)}
    assert launched == set(kernels)


def test_train_step_kernels_compute_their_ops(jetson_step):
    """Every kernel of the step computes with its GPU schedule, run :func:`serial` on the CPU,
    what its unscheduled loops compute, on random inputs (zeros for integer ones: valid
    indices)."""
    _, lowered, kernels = jetson_step
    rng = np.random.default_rng(0)
    for name in kernels:
        inputs = [rng.normal(size=[int(d) for d in p.shape]).astype(str(p.dtype))
                  if "float" in str(p.dtype) else np.zeros([int(d) for d in p.shape], str(p.dtype))
                  for p in lowered[name].params]
        results = []
        for func in (lowered[name].with_attr("global_symbol", "main"), serial(kernels[name])):
            args = [tvm.runtime.tensor(x) for x in inputs]
            tvm.compile(tvm.IRModule({"main": func}), target="llvm")["main"](*args)
            results.append([a.numpy() for a in args])
        for expected, got in zip(*results):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, equal_nan=True,
                                       err_msg=name)
