"""DefaultGPUSchedule: a thread-bound schedule for every GPU kernel that has no tuned one.

A GPU kernel cannot run unscheduled: each of its loops must be bound to thread blocks and
threads. TVM's dlight rules give such schedules, and TVM's CUDA pipeline applies them in this
order, taking the first rule that returns one:

- ``Matmul``: shared-memory tiles for products (convs, conv_transposes, weight gradients and
  the gradient filter's low-resolution products, which dlight reads as batched matmuls);
- ``GEMV``: matrix-vector products;
- ``Reduction`` and ``GeneralReduction``: a thread block per output, summing across threads
  (BatchNorm and bias gradients, pools, the loss);
- ``Fallback``: one thread per output (elementwise and injective kernels, the rest).

This pass applies the same rules in the same order, with two changes. A kernel whose reductions
are all shorter than a warp (depthwise and pooling windows, 9 or R² values) skips the rules that
spread a reduction over threads (``GEMV``, ``Reduction``, ``GeneralReduction``): they would give
each output value a thread block of its own (``Reduction``: 4 threads for a 2x2 pool, an eighth
of a warp; ``GeneralReduction``: 256 for a fused depthwise conv, of which 9 sum), where
``Fallback`` gives each output its own thread. And a rule that fails on a kernel is passed over like one that does not apply,
instead of ending the compile. dlight asserts on three kinds of kernel that train steps have:
the loss gradient (``Reduction``: its sum reads no buffer), the gradient filter's
low-resolution depthwise ``conv2d_transpose`` (``GEMV``) and a weight gradient fused with a
slice and its SGD update (``Matmul``, ResNet-18). The next rule's schedule is as correct, if
slower. A kernel that no rule schedules is an error that names it. Kernels with a schedule
already (``tirx.is_scheduled``, which a tuning record sets) are left alone.
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func

from ..errors import UnsupportedOpError
from .default_schedule import SCHEDULED_ATTR, schedule_unscheduled

RULES = (dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
         dlight.gpu.GeneralReduction(), dlight.gpu.Fallback())
CROSS_THREAD = (dlight.gpu.GEMV, dlight.gpu.Reduction, dlight.gpu.GeneralReduction)


def longest_reduction(func: tirx.PrimFunc) -> int:
    """The most values that one output of ``func`` sums (1 without reductions, and where
    dlight cannot analyze ``func``: then only the rules that need no cross-thread sum run)."""
    blocks = normalize_prim_func(s_tir.Schedule(func)) or []
    return max((math.prod(int(it.dom) for it in block.iters if it.kind == "R")
                for block in blocks), default=1)


def schedule_gpu_kernel(func: tirx.PrimFunc, target: tvm.target.Target, name: str = "main"
                        ) -> tirx.PrimFunc:
    """``func`` (the kernel ``name``) with the first dlight rule's schedule for ``target``."""
    short = longest_reduction(func) < int(target.attrs["thread_warp_size"])
    for rule in RULES:
        if short and isinstance(rule, CROSS_THREAD):
            continue
        try:
            space = rule.apply(func, target, False)
        except (AssertionError, s_tir.ScheduleError):
            continue
        if space is not None:
            sch = space if isinstance(space, s_tir.Schedule) else space[0]
            return sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    raise UnsupportedOpError(f"kernel {name}: no GPU schedule rule applies to it "
                             f"(tried {', '.join(type(rule).__name__ for rule in RULES)})")


@tvm.transform.module_pass(opt_level=0, name="DefaultGPUSchedule")
class DefaultGPUSchedule:
    """Schedule every unscheduled PrimFunc of the module for the current (GPU) target."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = tvm.target.Target.current()
        return schedule_unscheduled(mod, lambda func, name: schedule_gpu_kernel(func, target,
                                                                                name))
