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

This pass applies the same rules in the same order, with four changes. A kernel whose
reductions are all shorter than a warp (depthwise and pooling windows, 9 or R² values) skips the
rules that spread a reduction over threads (``GEMV``, ``Reduction``, ``GeneralReduction``): they
would give each output value a thread block of its own (``Reduction``: 4 threads for a 2x2
pool, an eighth of a warp; ``GeneralReduction``: 256 for a fused depthwise conv, of which 9
sum); they get a thread per output instead. Before ``Fallback`` comes :class:`ThreadPerOutput`: a
thread per output value of a reduction, as ``Fallback`` gives, which also computes the
elementwise ops fused after it (a depthwise conv's BatchNorm and ReLU) instead of launching them
as a second kernel. And a rule that fails on a kernel is passed over like one that does not
apply, instead of ending the compile. dlight asserts on three kinds of kernel that train steps
have: the loss gradient (``Reduction``: its sum reads no buffer), the gradient filter's
low-resolution depthwise ``conv2d_transpose`` (``GEMV``) and a weight gradient fused with a
slice and its SGD update (``Matmul``, ResNet-18). The next rule's schedule is as correct, if
slower. Reductions whose reduction axes all have extent 1 are rewritten as the elementwise
blocks they are before any rule sees them (:func:`without_unit_reductions`): dlight applied
the ops fused after them twice, a wrong result that MobileNetV2's step had. A kernel that no
rule schedules is an error that names it. Kernels with a schedule already
(``tirx.is_scheduled``, which a tuning record sets) are left alone.
"""

from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import max_threads_per_block, try_inline
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

from ..errors import UnsupportedOpError
from .default_schedule import SCHEDULED_ATTR, schedule_unscheduled


class ThreadPerOutput(GPUScheduleRule):
    """A thread per output value of a kernel's one reduction, which also computes the
    elementwise ops fused after it (a BatchNorm, a ReLU) for that value. dlight's ``Fallback``
    gives the reduction a thread per value too, but binds each block on its own, so the
    elementwise ops run as a second kernel that reads the reduction's output back from global
    memory. Applies to a reduction followed by injective blocks only (``None`` otherwise)."""

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _: bool
              ) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None:
            return None
        reduction, *epilogue = try_inline(sch, blocks)
        kinds = reduction.dom_kind()
        if not (reduction.is_reduction() and epilogue and set(kinds) == {"S", "R"}
                and all(block.is_injective() for block in epilogue)):
            return None
        loops = list(zip(sch.get_loops(reduction.block_rv), kinds))
        spatial = [loop for loop, kind in loops if kind == "S"]
        sch.reorder(*spatial, *[loop for loop, kind in loops if kind == "R"])
        outputs = sch.fuse(*spatial)
        blocks_x, threads_x = sch.split(outputs, [None, max_threads_per_block(target)])
        sch.bind(blocks_x, "blockIdx.x")
        sch.bind(threads_x, "threadIdx.x")
        sch.set_scope(reduction.block_rv, 0, "local")  # each thread's value, in a register
        for block in epilogue:
            sch.reverse_compute_at(block.block_rv, threads_x)
        return sch


RULES = (dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
         dlight.gpu.GeneralReduction(), ThreadPerOutput(), dlight.gpu.Fallback())
CROSS_THREAD = (dlight.gpu.GEMV, dlight.gpu.Reduction, dlight.gpu.GeneralReduction)


def longest_reduction(func: tirx.PrimFunc) -> int:
    """The most values that one output of ``func`` sums (1 without reductions, and where
    dlight cannot analyze ``func``: then only the rules that need no cross-thread sum run)."""
    blocks = normalize_prim_func(s_tir.Schedule(func)) or []
    return max((math.prod(int(it.dom) for it in block.iters if it.kind == "R")
                for block in blocks), default=1)


def without_unit_reductions(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with each reduction whose reduction axes all have extent 1 (a depthwise 1x1
    conv: a dead-tap-pruned 3x3 one on a 1x1 map) written as the elementwise block it is, its
    initial value combined with its one update. dlight's analysis drops unit axes, takes such a
    block for a spatial one and inlines the ops after it into both its initialisation and its
    update, which then apply them twice (``conv - mean`` became ``conv - 2 mean``). The unit
    loops that bound the reduction axes go too (with them, dlight's analysis gives up)."""
    unit_loops = []

    def spatial(realize: s_tir.SBlockRealize) -> s_tir.SBlockRealize:
        block, init = realize.block, realize.block.init
        reduce = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        if (init is None or not reduce or any(int(iv.dom.extent) != 1 for iv in reduce)
                or not isinstance(init, tirx.BufferStore)
                or not isinstance(block.body, tirx.BufferStore)):
            return realize
        update = block.body
        output = lambda load: (load.source.same_as(update.buffer) and
                               tvm_ffi.structural_equal(load.indices, update.indices))
        first = lambda var: next((iv.dom.min for iv in reduce if iv.var.same_as(var)), var)
        at_first = lambda node: tvm_ffi.structural_map(node, (tirx.Var, first))
        value = tvm_ffi.structural_map(
            update.value, (tvm.ir.TensorLoad, lambda load: init.value if output(load) else load))
        keep = [k for k, iv in enumerate(block.iter_vars)
                if iv.iter_type != tirx.IterVar.CommReduce]
        unit_loops.extend(v for k, v in enumerate(realize.iter_values)
                          if k not in keep and isinstance(v, tirx.Var))
        body = tirx.BufferStore(update.buffer, at_first(value), update.indices)
        reads = [at_first(r) for r in block.reads if not r.source.same_as(update.buffer)]
        return s_tir.SBlockRealize(
            [realize.iter_values[k] for k in keep], realize.predicate,
            s_tir.SBlock([block.iter_vars[k] for k in keep], reads, block.writes,
                         block.name_hint, body, None, block.alloc_buffers, block.match_buffers,
                         block.annotations))

    def unit_loop_gone(loop: tirx.For) -> tirx.Stmt:
        return loop.body if any(loop.loop_var.same_as(v) for v in unit_loops) else loop
    return tvm_ffi.structural_map(func, [(s_tir.SBlockRealize, spatial),
                                         (tirx.For, unit_loop_gone)])


def schedule_gpu_kernel(func: tirx.PrimFunc, target: tvm.target.Target, name: str = "main"
                        ) -> tirx.PrimFunc:
    """``func`` (the kernel ``name``) with the first dlight rule's schedule for ``target``."""
    func = without_unit_reductions(func)
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
