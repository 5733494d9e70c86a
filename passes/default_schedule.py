"""DefaultCPUSchedule: a reasonable loop schedule for every CPU kernel that has no tuned one.

TVM lowers an unscheduled kernel to its naive loop nest: one thread, and for a convolution the
reduction loops innermost, where LLVM cannot vectorize. This pass gives every PrimFunc that is
not scheduled yet (no ``tirx.is_scheduled``, which a tuning record sets) a fixed schedule:

1. Producers are inlined into their consumers, except a producer with a condition (padding)
   into a reduction, where the condition would sit in the innermost loop.
2. Each reduction block (conv, conv_transpose, matmul, pooling, sums) is vectorized along a
   unit-stride axis, read off the flattened buffer indices:

   - *spatial*: the output's contiguous row (its trailing axes, fused until a vector wide),
     when every input that it indexes reads it with one stride of at most 4 (strided convs
     and pooling read every 2nd or 4th element). It moves inside the reduction loops::

         for n, c, h (parallel):  for rc, ry, rx:  for w (vector):
             y[n, c, h, w] += x[n, rc, h + ry, w + rx] * k[c, rc, ry, rx]

   - *rfactor*: otherwise a reduction axis contiguous in every input it indexes (the weight
     gradient's W, a sum over H·W, a conv on 1×1 maps). It is split by the vector width and
     ``rfactor``-ed, so partial sums accumulate in vector lanes, then are added up.
   - *relayout*: otherwise, when the output's contiguous axis is strided in one input (a conv
     on 1×1 maps reads ``k[c, rc, ry, rx]`` along output channels ``c``), that input is first
     copied with the axis last (``reindex_cache_read``), then vectorized as *spatial*.

3. Spatial blocks are vectorized along their innermost row (trailing axes, fused until a
   vector wide).
4. The outer spatial loops of a block run in parallel when it has enough work.

Each step is a TIR schedule primitive, so results equal the unscheduled kernel's, up to float
reassociation in the rfactor-ed sums. A block that fits none of these shapes (or a primitive
that refuses) keeps its loops as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.sym.pattern import detect_linear_equation

SCHEDULED_ATTR = "tirx.is_scheduled"
#: Below this many loop iterations a block stays on one thread (the pool costs more).
PARALLEL_MIN_WORK = 1 << 14
#: The largest input stride of a vectorized output axis (strided convs, pooling read
#: every 2nd or 4th element; LLVM gathers them).
MAX_GATHER_STRIDE = 4
#: Parallel chunks to aim for: a few per core, so that cores finish close together.
PARALLEL_CHUNKS = 64


def _stride(region: tvm.ir.TensorRegion, var: tirx.Var) -> int | None:
    """Elements between neighbouring values of ``var`` in the flattened access, or None."""
    shape = [int(d) for d in region.source.shape]
    flat = sum((r.min * math.prod(shape[d + 1:]) for d, r in enumerate(region.region)),
               tirx.const(0, "int64"))
    coeffs = detect_linear_equation(flat, [var])
    return int(coeffs[0]) if len(coeffs) == 2 and isinstance(coeffs[0], tirx.IntImm) else None


def _read_strides(reads, var: tirx.Var) -> set[int | None]:
    """The strides of ``var`` in the reads that use it."""
    return {_stride(region, var) for region in reads} - {0}


@dataclass(eq=False)
class _Axis:
    loop: s_tir.schedule.LoopRV
    var: tirx.Var
    extent: int
    reduce: bool


def _axes(sch: s_tir.Schedule, block) -> list[_Axis] | None:
    """The block's loops, if the i-th loop binds exactly the i-th iterator, spatial or
    reduction, with a constant extent (the shape of every legalized op), else None."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if not loops or len(loops) != len(iters):
        return None
    realize = sch.get(loops[-1]).body
    if not isinstance(realize, s_tir.SBlockRealize):
        return None
    axes = []
    for loop_rv, iv, value in zip(loops, iters, realize.iter_values):
        loop = sch.get(loop_rv)
        if not value.same_as(loop.loop_var) or not isinstance(loop.extent, tirx.IntImm) \
                or iv.iter_type not in (tirx.IterVar.DataPar, tirx.IterVar.CommReduce):
            return None
        axes.append(_Axis(loop_rv, iv.var, int(loop.extent),
                          iv.iter_type == tirx.IterVar.CommReduce))
    return axes


def _output_row(block: s_tir.SBlock, spatial: list[_Axis], lanes: int) -> list[_Axis]:
    """The trailing spatial axes that, fused, form a row (:func:`_is_row`), grown until a
    vector wide; [] if that row is shorter than 4."""
    row: list[_Axis] = []
    for axis in reversed(spatial):
        if math.prod(a.extent for a in row) >= lanes or not _is_row(block, [axis, *row]):
            break
        row.insert(0, axis)
    return row if math.prod(a.extent for a in row) >= 4 else []


def _is_row(block: s_tir.SBlock, axes: list[_Axis]) -> bool:
    """Whether the axes, fused into one loop, step through the output with stride 1 and
    through each input with one stride of at most ``MAX_GATHER_STRIDE`` (or 0)."""
    axes = [a for a in axes if a.extent > 1]
    if not axes:
        return True
    write = block.writes[0]
    for region in [write, *block.reads]:
        strides = [_stride(region, a.var) for a in axes]
        if None in strides or any(outer != inner * axis.extent for outer, inner, axis
                                  in zip(strides, strides[1:], axes[1:])):
            return False
        allowed = range(1, 2) if region is write else range(MAX_GATHER_STRIDE + 1)
        if strides[-1] not in allowed:
            return False
    return True


def _relayout_for_row(sch: s_tir.Schedule, block, spatial: list[_Axis], lanes: int
                      ) -> list[_Axis]:
    """When the output's contiguous axis is strided in an input (a weight read ``w[c, rc, ...]``
    for output channels ``c``), copy that input into a buffer that has the axis last, so the
    row exists. Returns the row, or [] where no input is strided that way."""
    nonunit = [a for a in spatial if a.extent > 1]
    stmt = sch.get(block)
    if not nonunit or _stride(stmt.writes[0], nonunit[-1].var) != 1:
        return []
    axis = nonunit[-1]
    iters = [iv.var for iv in stmt.iter_vars]
    for index, region in enumerate(stmt.reads):
        indices = [r.min for r in region.region]
        if (_stride(region, axis.var) or 0) <= MAX_GATHER_STRIDE or \
                not all(isinstance(i, tirx.Var) for i in indices):
            continue
        order = [i for i in indices if not i.same_as(axis.var)] + [axis.var]
        positions = [next(k for k, v in enumerate(iters) if v.same_as(i)) for i in order]
        relayout = tirx.IndexMap.from_func(lambda *vs: [vs[k] for k in positions],
                                           ndim=len(iters))
        cache = sch.reindex_cache_read(block, index, "global", relayout)
        _elementwise(sch, _axes(sch, cache), lanes)
        return _output_row(sch.get(block), spatial, lanes)
    return []


class _Scheduler:
    """The default schedule of one PrimFunc, built block by block on trial copies."""

    def __init__(self, func: tirx.PrimFunc, lanes: int) -> None:
        self.sch = s_tir.Schedule(func)
        self.lanes = lanes

    def run(self) -> tirx.PrimFunc:
        progress = True
        while progress:  # inline until nothing more inlines
            progress = any(self.attempt(_inline, name) for name in self.block_names())
        for name in self.block_names():
            self.attempt(lambda sch, block: _schedule_block(sch, block, self.lanes), name)
        return self.sch.mod["main"].with_attr(SCHEDULED_ATTR, True)

    def block_names(self) -> list[str]:
        return [self.sch.get(b).name_hint
                for b in self.sch.get_child_blocks(self.sch.get_sblock("root"))]

    def attempt(self, step, name: str) -> bool:
        """Apply ``step(schedule, block)`` to block ``name`` on a copy of the schedule; keep the
        copy unless the step fails or returns False."""
        trial = self.sch.copy()
        try:
            changed = step(trial, trial.get_sblock(name))
        except (s_tir.schedule.ScheduleError, tvm.error.InternalError):
            return False
        if changed is not False:
            self.sch = trial
        return changed is not False


def _schedule_block(sch: s_tir.Schedule, block, lanes: int) -> None:
    axes = _axes(sch, block)
    if axes is None:
        return
    spatial = [a for a in axes if not a.reduce]
    reduce = [a for a in axes if a.reduce]
    work = math.prod(a.extent for a in axes)
    if not reduce:
        _elementwise(sch, spatial, lanes)
        return
    stmt = sch.get(block)
    row = _output_row(stmt, spatial, lanes)
    inner = None if row else next(
        (a for a in reversed(reduce)
         if _vector_factor(a.extent, lanes) and _read_strides(stmt.reads, a.var) == {1}), None)
    if not row and inner is None:
        row = _relayout_for_row(sch, block, spatial, lanes)
    if row:
        vector = sch.fuse(*[a.loop for a in row]) if len(row) > 1 else row[0].loop
        _vector_inside(sch, block, [a.loop for a in spatial if a not in row],
                       [a.loop for a in reduce], vector, math.prod(a.extent for a in row),
                       work, lanes)
    elif inner is not None:
        _rfactor(sch, block, spatial, reduce, inner, lanes)
    else:
        _parallelize(sch, [a.loop for a in spatial], work)


def _rfactor(sch: s_tir.Schedule, block, spatial: list[_Axis], reduce: list[_Axis],
             inner: _Axis, lanes: int) -> None:
    """Split the contiguous reduction axis ``inner`` by the vector width and accumulate its
    lanes in a partial-sum buffer (vectorized), then add the lanes up."""
    others = [a for a in reduce if a is not inner]
    sch.reorder(*[a.loop for a in spatial], *[a.loop for a in others], inner.loop)
    factor = _vector_factor(inner.extent, lanes)
    _, lane = sch.split(inner.loop, [None, factor])
    partial = sch.rfactor(lane, factor_axis=len(sch.get(block).writes[0].source.shape))
    # The partial sums keep the loops: spatial..., others..., outer, lane (now spatial).
    loops = sch.get_loops(partial)
    _vector_inside(sch, partial, loops[:len(spatial)], loops[len(spatial):-1], loops[-1],
                   factor, math.prod(a.extent for a in [*spatial, *reduce]), lanes)
    _parallelize(sch, [a.loop for a in spatial], math.prod(a.extent for a in spatial))


def _inline(sch: s_tir.Schedule, block) -> bool:
    """Inline the block into its consumers, unless it is padding feeding a reduction."""
    consumers = sch.get_consumers(block)
    if not consumers:
        return False
    if _has_condition(sch.get(block)) and any(
            any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(c).iter_vars)
            for c in consumers):
        return False
    sch.compute_inline(block)
    return True


def _has_condition(block: s_tir.SBlock) -> bool:
    """Whether the block's value is a condition (``if_then_else``, as in padding)."""
    value = getattr(block.body, "value", None)
    return isinstance(value, tvm.ir.Call) and \
        value.op.same_as(tvm.ir.Op.get("prim.if_then_else"))


def _vector_factor(extent: int, lanes: int) -> int | None:
    """The widest vector (``lanes``, half or quarter of it, at least 4) that divides
    ``extent``."""
    return next((f for f in (lanes, lanes // 2, lanes // 4) if f >= 4 and extent % f == 0),
                None)


def _parallelize(sch: s_tir.Schedule, loops: list, work: int) -> None:
    """Run the outermost of ``loops`` in parallel, fused with the next ones only until there
    are enough chunks (inner loops keep their plain, affine indices)."""
    if not loops or work < PARALLEL_MIN_WORK:
        return
    count = 1
    for chunks, loop in enumerate(loops, 1):
        count *= int(sch.get(loop).extent)
        if count >= PARALLEL_CHUNKS:
            break
    sch.parallel(sch.fuse(*loops[:chunks]) if chunks > 1 else loops[0])


def _vectorize(sch: s_tir.Schedule, loop, extent: int, lanes: int) -> None:
    factor = _vector_factor(extent, lanes)
    if factor is not None:
        sch.vectorize(sch.split(loop, [None, factor])[1] if extent > factor else loop)


def _elementwise(sch: s_tir.Schedule, spatial: list[_Axis], lanes: int) -> None:
    """Vectorize the innermost row (trailing loops fused until it is a vector wide) and run the
    outer loops in parallel."""
    row = len(spatial) - 1
    while row > 0 and math.prod(a.extent for a in spatial[row:]) < lanes:
        row -= 1
    loops = [a.loop for a in spatial[:row]]
    inner = sch.fuse(*[a.loop for a in spatial[row:]]) if row < len(spatial) - 1 \
        else spatial[-1].loop
    extent = math.prod(a.extent for a in spatial[row:])
    factor = _vector_factor(extent, lanes)
    if factor is not None and extent > factor:
        outer, lane = sch.split(inner, [None, factor])
        loops.append(outer)
        sch.vectorize(lane)
    elif factor is not None:
        sch.vectorize(inner)
    _parallelize(sch, loops, math.prod(a.extent for a in spatial))


def _vector_inside(sch: s_tir.Schedule, block, outer: list, reduce: list, vector,
                   extent: int, work: int, lanes: int) -> None:
    """Order the block's loops as (outer, reduce, vector): outer in parallel, the vector loop
    (``extent`` long) vectorized innermost, the initialisation split off."""
    sch.reorder(*outer, *reduce, vector)
    _parallelize(sch, outer, work)
    _vectorize(sch, vector, extent, lanes)
    sch.decompose_reduction(block, reduce[0])


def schedule_kernel(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """``func`` with the default CPU schedule for ``target`` (vector width from LLVM)."""
    lanes = max(4, tvm.target.codegen.llvm_get_vector_width(target) // 32)
    return _Scheduler(func, lanes).run()


@tvm.transform.module_pass(opt_level=0, name="DefaultCPUSchedule")
class DefaultCPUSchedule:
    """Schedule every unscheduled PrimFunc of the module for the current target."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = tvm.target.Target.current()
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc) and not (func.attrs and
                                                        SCHEDULED_ATTR in func.attrs):
                mod[gvar] = schedule_kernel(func, target)
        return mod
