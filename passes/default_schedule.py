"""DefaultCPUSchedule: a reasonable loop schedule for every CPU kernel that has no tuned one.

TVM lowers an unscheduled kernel to its naive loop nest: one thread, and for a convolution the
reduction loops innermost, where LLVM cannot vectorize. This pass gives every PrimFunc that is
not scheduled yet (no ``tirx.is_scheduled``, which a tuning record sets) a fixed schedule:

1. Producers are inlined into their consumers, except a producer with a condition (padding)
   into a reduction, where the condition would sit in the innermost loop. The parts of a
   padding's condition that no consumer reads past (the arithmetic analyzer proves them true
   at every point that a consumer's read region covers, e.g. ceil-mode pools whose windows
   tile the map exactly) are dropped: the consumer reads the unpadded map directly. Padding
   whose remaining condition leaves the map's rows alone (a ceil-mode pool whose last windows
   are partial only along H) is inlined into a pool with it: the condition is the same for
   every lane of a vector over the row, one branch per row read, not a padded copy. Padding
   beside the map too (a 14x14 map in 4x4 windows) stays a copy, but one that each output
   row of the pool makes of just its windows' rows (see *window rows* below), in cache.
2. A dense reduction block (conv, conv_transpose, matmul, weight gradients) gets a *register
   tile*: a spatial ``vector`` axis, contiguous in every input that uses it (after a relayout
   copy, as below), and tile axes that those inputs do not use (at least ``TILE_MIN`` tile
   points), so each loaded vector feeds one accumulator per tile point (at most
   ``TILE_ACCUMULATORS`` vector registers)::

       for c_o, n, h, w_o (parallel):          # the largest input's axes outermost
           acc[0:16, 0:4] = 0                  # local buffer: registers
           for rc, ry, rx:  for c_i (unrolled):  for w_i (vector):
               acc[c_i, w_i] += x[n, rc, h + ry, 4 w_o + w_i + rx] * k[16 c_o + c_i, rc, ry, rx]
           y[n, 16 c_o + c_i, h, 4 w_o + w_i] = relu(acc[c_i, w_i] + b[...])   # epilogue fused

   The vector is the widest such axis, preferring the output's contiguous one unless a tile
   along another as wide saves more than ``SCATTER_LOADS`` loads per output element (ResNet-18's
   3x3 convs on 16x16 maps: 2 vectors of channels x 8 pixels) or needs no relayout copy larger
   than its input (a weight gradient's x, read at ``h + ry``, copied once per tap); on small maps
   it is the output channel (the weight copied with it last, in blocks as wide as the tile's
   vectors that go first, so the tile's walk over the reduction reads contiguous memory; the
   copy gathers a vector at a few consecutive weight positions in turn, so the rows it reads
   stay in cache) and the tile runs over pixels. Where that weight is the largest input and
   has at least ``SLAB_BLOCKS_PER_CORE`` blocks per core, the parallel loop runs over the
   blocks and each iteration copies its own block just before its tiles: a slab that stays in
   cache, instead of the whole weight copied to memory and read back (ResNet-18's 512-channel
   convs on 4x4 maps, caches flushed: 0.82x the time). The tile is ``V`` vectors of that axis
   (unrolled; ``V = 1`` above) times ``P`` points, ``V P <= TILE_ACCUMULATORS``, extents that
   divide the axes: the shape with the fewest loads per FMA, ``(2 V + P) / (V P)`` (a vector
   load counts as two broadcasts), more than one vector only where their walk over the
   reduction is at least ``TILE_VECTORS_MIN_WALK`` long and stays within
   ``TILE_SLAB_ELEMENTS`` (the tiles after it reread it from cache).
   The gradient filter's 1x1 conv_transpose on a 7x7 map gets 2 vectors of output channels
   times the 7 pixels of a row (14 accumulators, not 7); a 3x3 conv with 512 channels keeps
   1 vector (one vector's walk over the weight takes 295 KiB).
   A product that reads its padded input ``s`` apart along the output row (a strided conv)
   stores that padded copy de-interleaved, ``[..., w % s, w // s]``, so the row reads it
   contiguously; a relayout copy would hold it once per tap.
   Elementwise consumers that cover the whole output are inlined into the write-back. Where
   the two largest inputs both exceed the cache (weight-gradient matmuls), the reduction is
   split into blocks (along its outermost axis that a block can split) that one parallel
   chunk of tiles per core walks in turn, accumulating in the output; inside a block, each
   of the chunk's tiles rereads the block's inputs from cache.
3. Other reduction blocks (pooling, sums, depthwise convs) are vectorized along a unit-stride
   axis, read off the flattened buffer indices:

   - *window rows*: a pool whose windows tile the input's rows (stride = window width,
     the gradient filter's pools) sums each window's rows into a row buffer on the thread's
     stack with vectors contiguous over the input row (``rfactor`` of the window's width),
     then adds the row's neighbours: without it, a vector over output pixels gathers every
     2nd or 4th input element.
   - *spatial*: the output's contiguous row (its trailing axes, fused until a vector wide),
     when every input that it indexes reads it with one stride of at most 4 (strided convs
     and pooling read every 2nd or 4th element). It moves inside the reduction loops::

         for n, c, h (parallel):  for rc, ry, rx:  for w (vector):
             y[n, c, h, w] += x[n, rc, h + ry, w + rx] * k[c, rc, ry, rx]

   - *window sums*: a sum of one input over contiguous windows (the taps of a weight, for the
     gradient filter's low-resolution kernel). Windows of two axes of at most
     ``MAX_INTERLEAVE`` (3x3 taps) are summed in two plain loops, row by row of the output:
     each window row's taps into a row buffer (``rfactor`` of the window's rows), then the
     buffer's groups; LLVM vectorizes both with interleaved loads (a few contiguous loads and
     shuffles per vector; NEON's ``ld3``). Other windows vectorize the output's contiguous axis
     inside the reduction: the lanes gather one window apart.
   - *rfactor*: otherwise a reduction axis contiguous in every input it indexes (the weight
     gradient's W, a sum over H·W, a conv on 1×1 maps). It is split by the vector width and
     ``rfactor``-ed, so partial sums accumulate in vector lanes, then are added up.
   - *relayout*: otherwise, when the output's contiguous axis is strided in one input (a conv
     on 1×1 maps reads ``k[c, rc, ry, rx]`` along output channels ``c``), that input is first
     copied with the axis last (``reindex_cache_read``), then vectorized as *spatial*.
4. Spatial blocks (:func:`_injective`) first split iterators that an index divides
   (upsampling's ``h // 2``, reshapes) so that every index is affine, then are vectorized
   along their innermost row (trailing axes, fused until a vector wide), or else along an
   axis with known strides that an input reads or the output writes contiguously (a weight
   gradient broadcast to every tap); lane-wise index division costs more than gathers.
5. The outer spatial loops of a block run in parallel when it has enough work.

Each step is a TIR schedule primitive, so results equal the unscheduled kernel's, up to float
reassociation in the rfactor-ed sums. A block that fits none of these shapes (or a primitive
that refuses) keeps its loops as they are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import tvm
from tvm import s_tir, tirx
from tvm.sym.pattern import detect_linear_equation

SCHEDULED_ATTR = "tirx.is_scheduled"
#: Below this many loop iterations a block stays on one thread (the pool costs more).
PARALLEL_MIN_WORK = 1 << 14
#: The largest input stride of a vectorized output axis (strided convs, pooling read
#: every 2nd or 4th element; LLVM gathers them).
MAX_GATHER_STRIDE = 4
#: The longest window axis summed in a plain loop (LLVM's loop vectorizer turns a stride of up
#: to 8 into interleaved loads; the 9 taps of a 3x3 kernel it would gather).
MAX_INTERLEAVE = 8
#: Parallel chunks to aim for: a few per core, so that cores finish close together.
PARALLEL_CHUNKS = 64
#: Vector registers a register tile's accumulators may take (AVX-512 and NEON have 32; the
#: rest hold the loaded vector and broadcasts).
TILE_ACCUMULATORS = 24
#: The least number of accumulators for which a register tile beats the rules without one.
TILE_MIN = 4
#: A vector load counts as this many broadcast loads in a tile's loads per FMA (it moves a
#: vector's bytes; measured on Zen 5: 2 vectors x 8 points beat 4 x 4 and 1 x 16).
VECTOR_LOAD_COST = 2
#: The most elements of the loaded inputs that a tile of several vectors walks over the
#: reduction (256 KiB of float32, a quarter of L2): the tiles after it reread them from cache.
TILE_SLAB_ELEMENTS = 1 << 16
#: The shortest walk over the reduction for a tile of several vectors (shorter ones spend
#: their time initialising and writing back the tile: weight gradients of 1x1 maps).
TILE_VECTORS_MIN_WALK = 64
#: Loads a tile must save per output element (over the reduction) to be worth a vector that the
#: output does not store contiguously: its write-back scatters and its inputs may need a
#: relayout copy (measured on Zen 5: ResNet-18's 3x3 convs on 16x16 maps, 1152 multiply-adds
#: per output and 27 loads saved, 7 % faster with 2 vectors of channels x 8 pixels than 1
#: vector of the row x 16 channels; MobileNetV2's 1x1 convs on 8x8 maps, 9 loads saved, 1.8x
#: slower; ResNet-18's 1x1 shortcut convs, 1.5 saved, 1.35x slower).
SCATTER_LOADS = 12
#: Inputs of at most this many elements (1 MiB of float32, a core's L2) are reread from cache.
CACHED_ELEMENTS = 1 << 18
#: Input elements one register tile streams per block of a split reduction (64 KiB of float32).
REDUCTION_BLOCK_ELEMENTS = 1 << 14
#: The fewest blocks of a tile's vectors per core for a weight copied slab by slab: the
#: parallel loop then runs over those blocks alone.
SLAB_BLOCKS_PER_CORE = 4
#: The fewest elements of a padded copy made per parallel iteration
#: (:func:`_pad_per_iteration`); each iteration allocates its part. ResNet's 3x3 stride-2 max
#: pool, batch 8 and 32, znver5: 65x65 and 33x33 planes 1.1-1.35x faster than the whole copy
#: ahead of the pool, 17x17 planes 2.5x slower.
PAD_PER_ITERATION_MIN = 1024


def _stride(region: tvm.ir.TensorRegion, var: tirx.Var) -> int | None:
    """Elements between neighbouring values of ``var`` in the flattened access, or None."""
    coeffs = detect_linear_equation(_flat(region), [var])
    return int(coeffs[0]) if len(coeffs) == 2 and isinstance(coeffs[0], tirx.IntImm) else None


def _flat(region: tvm.ir.TensorRegion) -> tirx.Expr:
    """The flattened index of the region's first element."""
    shape = [int(d) for d in region.source.shape]
    return sum((r.min * math.prod(shape[d + 1:]) for d, r in enumerate(region.region)),
               tirx.const(0, "int64"))


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


def _output_axis(block: s_tir.SBlock, spatial: list[_Axis]) -> _Axis | None:
    """The output's contiguous axis: the innermost spatial axis longer than 1, if the output is
    written with stride 1 along it."""
    axis = next((a for a in reversed(spatial) if a.extent > 1), None)
    return axis if axis is not None and _stride(block.writes[0], axis.var) == 1 else None


def _relayout_for_row(sch: s_tir.Schedule, block, spatial: list[_Axis], lanes: int
                      ) -> list[_Axis]:
    """When the output's contiguous axis is strided in an input (a weight read ``w[c, rc, ...]``
    for output channels ``c``), copy that input into a buffer that has the axis last, so the
    row exists. Returns the row, or [] where no input is strided that way."""
    stmt = sch.get(block)
    axis = _output_axis(stmt, spatial)
    if axis is None:
        return []
    for index, region in enumerate(stmt.reads):
        if (_stride(region, axis.var) or 0) <= MAX_GATHER_STRIDE or \
                not all(isinstance(r.min, tirx.Var) for r in region.region):
            continue
        _relayout_read(sch, block, index, axis.var, lanes)
        return _output_row(sch.get(block), spatial, lanes)
    return []


def _relayout_read(sch: s_tir.Schedule, block, index: int, last: tirx.Var, lanes: int,
                   block_by: int | None = None, scheduled: bool = True):
    """Copy the block's read ``index`` into a buffer indexed by the block iterators that it
    uses, in the read's memory order but ``last`` last (``reindex_cache_read``); the copy is
    vectorized and parallel, unless not ``scheduled`` (a copy that the caller moves and
    schedules itself: :func:`_copy_slab`). With ``block_by``, ``last`` is split into blocks of
    that many that go first (``[c // 16, ..., c % 16]``), so one vector's walk over the other
    axes reads contiguous memory. Returns the copy block."""
    stmt = sch.get(block)
    iters = [iv.var for iv in stmt.iter_vars]
    strides = [_stride(stmt.reads[index], v) for v in iters]
    used = sorted((k for k, stride in enumerate(strides) if stride != 0 and
                   not iters[k].same_as(last)), key=lambda k: -abs(strides[k] or 0))
    positions = [*used, next(k for k, v in enumerate(iters) if v.same_as(last))]
    cache = sch.reindex_cache_read(block, index, "global", _picking(positions, len(iters)))
    # The copy's loops run over the used iterators in block order; write in the new order.
    axes = _axes(sch, cache)
    axes = [axes[sorted(positions).index(k)] for k in positions]
    sch.reorder(*[a.loop for a in axes])
    if scheduled and (block_by is None or len(axes) == 1):
        _elementwise(sch, axes, lanes)
    elif scheduled:
        _transposing_copy(sch, [a.loop for a in axes[:-1]], axes[-1].loop, block_by, lanes)
    if block_by is not None and axes[-1].extent > block_by:
        sch.transform_layout(cache, ("write", 0),
                             lambda *i: [i[-1] // block_by, *i[:-1], i[-1] % block_by])
    return cache


def _transposing_copy(sch: s_tir.Schedule, used: list, last, block_by: int, lanes: int,
                      parallel: bool = True) -> None:
    """Schedule a copy that reads along its ``used`` loops (fused) and writes along the
    ``last`` one in blocks of ``block_by``, tile by tile: a vector of the last axis is gathered
    at each of a few consecutive (unrolled) read positions, so that the rows a tile reads stay
    in L1 until it has used all of them (a plain loop order gathers each vector from cold
    rows)."""
    read = sch.fuse(*used) if len(used) > 1 else used[0]
    extent = int(sch.get(read).extent)
    work = extent * int(sch.get(last).extent)
    factor = _vector_factor(block_by, lanes) or 1
    blocks, vectors, lane = sch.split(last, [None, block_by // factor, factor])
    tile = max(d for d in range(1, lanes + 1) if extent % d == 0)
    read_outer, read_inner = sch.split(read, [None, tile])
    sch.reorder(blocks, read_outer, vectors, read_inner, lane)
    sch.unroll(read_inner)
    if factor > 1:
        sch.vectorize(lane)
    if parallel:
        _parallelize(sch, [blocks, read_outer], work)


def _copy_slab(sch: s_tir.Schedule, cache, loop, block_by: int, lanes: int) -> None:
    """Move a weight's blocked copy (:func:`_relayout_read`) inside ``loop``, the parallel loop
    over the blocks of its last axis: each iteration copies the one block that its tiles read
    (a slab that stays in cache for them) into a buffer of that size, instead of the whole
    weight being copied to memory and read back."""
    sch.compute_at(cache, loop)
    # compute_at made one loop per iterator of the copy, in their order, inside ``loop``.
    loops = sch.get_loops(cache)
    loops = loops[[sch.get(lp) for lp in loops].index(sch.get(loop)) + 1:]
    stmt = sch.get(cache)
    inner = tirx.analysis.undefined_vars(stmt.writes[0].region[-1].min)
    last = next(k for k, iv in enumerate(stmt.iter_vars) if any(v.same_as(iv.var) for v in inner))
    _transposing_copy(sch, loops[:last] + loops[last + 1:], loops[last], block_by, lanes,
                      parallel=False)


def _picking(positions: list[int], ndim: int) -> tirx.IndexMap:
    """The index map from the ``ndim`` block iterators to those at ``positions``, in order."""
    return tirx.IndexMap.from_func(lambda *vs: [vs[k] for k in positions], ndim=ndim)


class _Scheduler:
    """The default schedule of one PrimFunc, built block by block on trial copies."""

    def __init__(self, func: tirx.PrimFunc, lanes: int, cores: int) -> None:
        self.sch = s_tir.Schedule(func)
        self.lanes = lanes
        self.cores = cores

    def run(self) -> tirx.PrimFunc:
        progress = True
        while progress:  # inline until nothing more inlines
            progress = any(self.attempt(_inline, name) for name in self.block_names())
        for name in self.block_names():
            self.attempt(
                lambda sch, block: _schedule_block(sch, block, self.lanes, self.cores), name)
        for name in self.block_names():
            self.attempt(_pad_per_iteration, name)
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


def _schedule_block(sch: s_tir.Schedule, block, lanes: int, cores: int) -> None:
    axes = _axes(sch, block)
    if axes is None:
        return
    spatial = [a for a in axes if not a.reduce]
    reduce = [a for a in axes if a.reduce]
    work = math.prod(a.extent for a in axes)
    if not reduce:
        _injective(sch, block, lanes)
        return
    _deinterleave_strided_reads(sch, block, spatial)
    stmt = sch.get(block)
    plan = _tile_plan(stmt, spatial, lanes)
    if plan is not None:
        _register_tile(sch, block, spatial, reduce, plan, lanes, cores)
        return
    window = _window(stmt, spatial, reduce)
    if window is not None:
        _window_rows(sch, block, spatial, window, lanes)
        return
    if _staged_window_sums(sch, block, spatial, reduce, work, lanes):
        return
    row = _output_row(stmt, spatial, lanes) or _window_sums(stmt, spatial, reduce, lanes)
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


def _deinterleave_strided_reads(sch: s_tir.Schedule, block, spatial: list[_Axis]) -> None:
    """Where a product (a strided conv) reads an intermediate (its padded input) ``s`` apart
    along the output's contiguous axis, store that intermediate's last axis de-interleaved,
    ``[..., w % s, w // s]``, so the read is contiguous (``transform_layout``). Otherwise the
    register tile's relayout copy holds one copy of the input per tap over the output grid
    (ResNet's 7x7 stride-2 stem at 128x128, batch 8: 29 MB for a 1.6 MB input). Pools (one
    input) keep their gathers: de-interleaved, ResNet's 3x3 stride-2 max pool was no faster
    on 64x64 maps and slower on 16x16."""
    stmt = sch.get(block)
    row = _output_axis(stmt, spatial)
    if len(stmt.reads) < 2 or row is None:
        return
    producers = {sch.get(p).writes[0].source: p for p in sch.get_producers(block)}
    for region in stmt.reads:
        step = _stride(region, row.var)
        width = int(region.source.shape[-1])
        if region.source in producers and step and step > 1 and width % step == 0:
            sch.transform_layout(producers[region.source], ("write", 0),
                                 lambda *i: [*i[:-1], i[-1] % step, i[-1] // step])


def _window_sums(block: s_tir.SBlock, spatial: list[_Axis], reduce: list[_Axis],
                 lanes: int) -> list[_Axis]:
    """For a sum of one input over windows that are contiguous in it (a weight's taps), the
    output's contiguous axis if a vector divides it and the input steps along it by exactly one
    window: the lanes gather, but the reduction loops use every element of the lines loaded."""
    axis = _output_axis(block, spatial)
    if axis is None or len(block.reads) != 1 or axis.extent % lanes:
        return []
    window = math.prod(a.extent for a in reduce)
    return [axis] if _stride(block.reads[0], axis.var) == window else []


def _staged_window_sums(sch: s_tir.Schedule, block, spatial: list[_Axis], reduce: list[_Axis],
                        work: int, lanes: int) -> bool:
    """Sum windows of two short axes that are contiguous in the one input (``s[o, i]`` = the 3x3
    taps of ``w[o, i]``) in two plain loops per output row, for LLVM to vectorize with
    interleaved loads (the 512x512x3x3 tap sum alone: 0.98 -> 0.12 ms, 2 threads, znver4)::

        for o (parallel):
            for i_ky (fused):  rows[i, ky] = sum(w[o, i, ky, 0:3])    # unrolled
            for i:             s[o, i] = sum(rows[i, 0:3])            # unrolled

    Returns False (nothing changed) unless the output's contiguous axis has an axis outside it
    to run the rows over and steps one window in the input, and a window row is too short for a
    vector; the other window sums (a depthwise weight's, a sum over 8x8 maps) keep the gathers,
    not measured against these loops."""
    stmt = sch.get(block)
    window = [a for a in reduce if a.extent > 1]
    axis = _output_axis(stmt, spatial)
    if len(stmt.reads) != 1 or len(window) != 2 or axis is None or axis is spatial[0] or \
            any(a.extent > MAX_INTERLEAVE for a in window) or \
            _vector_factor(window[1].extent, lanes) is not None or \
            [_stride(stmt.reads[0], a.var) for a in [axis, *window]] != \
            [window[0].extent * window[1].extent, window[1].extent, 1]:
        return False
    rows = sch.rfactor(window[0].loop, factor_axis=len(stmt.writes[0].source.shape))
    # The sum keeps its spatial loops, then the window's rows (now reduced from the buffer).
    loops = sch.get_loops(block)
    outer = loops[:spatial.index(axis)]
    head = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    _parallelize(sch, [head], work)
    sch.unroll(loops[-1])
    sch.compute_at(rows, head)
    # The row buffer's loops in its layout order, fused into one, then its window's taps.
    by_iter = _loops_by_iter(sch, rows)
    own = {sch.get(loop) for loop in sch.get_loops(rows)[1:]}
    stored = [by_iter[v] for v in sch.get(rows).body.indices
              if v in by_iter and sch.get(by_iter[v]) in own]
    taps = [by_iter[iv.var] for iv in sch.get(rows).iter_vars
            if iv.iter_type == tirx.IterVar.CommReduce and iv.var in by_iter]
    sch.reorder(*stored, *taps)
    sch.fuse(*stored)
    sch.unroll(taps[-1])
    return True


@dataclass(eq=False)
class _TilePlan:
    """A register tile: which axis is vectorized, which are unrolled, which inputs relaid out."""

    vector: _Axis                  # vectorized, fed by loads contiguous along it
    factor: int                    # its vector width
    vectors: int                   # vectors of it per tile (unrolled)
    tiles: list[tuple[_Axis, int]]  # unrolled tile axes and their tile extents
    relayout: list[int]            # reads to copy with ``vector`` last first

    @property
    def points(self) -> int:
        return math.prod(size for _, size in self.tiles)

    @property
    def loads_per_fma(self) -> float:
        return _loads_per_fma(self.vectors, self.points)


def _tile_plan(block: s_tir.SBlock, spatial: list[_Axis], lanes: int) -> _TilePlan | None:
    """The register tile of a reduction: a spatial ``vector`` axis that every input using it
    reads contiguously (after a relayout copy where needed), and tile axes that no such input
    uses, so that each loaded vector feeds one accumulator per tile point. Prefers the widest
    vector, then the output's contiguous axis unless another axis as wide saves more than
    ``SCATTER_LOADS`` loads per output element or avoids a relayout that :func:`_expands`; its
    shape is :func:`_tile_shape`."""
    write = block.writes[0]
    reduce = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    candidates = sorted(reversed([a for a in spatial if a.extent > 1]),
                        key=lambda a: _stride(write, a.var) != 1)
    best = None
    for vector in candidates:
        factor = _vector_factor(vector.extent, lanes)
        strides = [_stride(region, vector.var) for region in block.reads]
        if factor is None or None in strides or (best and factor < best.factor):
            continue
        loaded = [region for region, stride in zip(block.reads, strides) if stride]
        free = [axis for axis in reversed(spatial) if axis is not vector and axis.extent > 1
                and all(_stride(region, axis.var) == 0 for region in loaded)]
        # Several vectors where the tile's walk over the reduction is long enough for its
        # loads to matter and short enough to stay in cache for the tiles after it.
        walk = max((math.prod(int(iv.dom.extent) for iv in reduce
                              if _stride(region, iv.var) != 0) for region in loaded), default=0)
        most = 1 if walk < TILE_VECTORS_MIN_WALK else \
            max(1, TILE_SLAB_ELEMENTS // (factor * walk))
        shape = _tile_shape(vector.extent // factor, most, free)
        if shape is None:
            continue
        plan = _TilePlan(vector, factor, *shape,
                         [i for i, stride in enumerate(strides) if stride not in (0, 1)])
        if _preferred(block, plan, best, walk):
            best = plan
    return best


def _preferred(block: s_tir.SBlock, plan: _TilePlan, best: _TilePlan | None, walk: int) -> bool:
    """Whether ``plan`` beats ``best`` (an earlier candidate, so the output's contiguous axis if
    it has one): a wider vector; at equal width, one whose relayout does not copy an input per
    tap, else one that saves more than ``SCATTER_LOADS`` loads per output element over its
    ``walk``."""
    if best is None or plan.factor != best.factor:
        return best is None or plan.factor > best.factor
    if _expands(block, plan) != _expands(block, best):
        return _expands(block, best)
    return walk / plan.factor * (best.loads_per_fma - plan.loads_per_fma) > SCATTER_LOADS


def _expands(block: s_tir.SBlock, plan: _TilePlan) -> bool:
    """Whether the plan's relayout copies an input into more elements than it has: a read
    indexed by sums of iterators (a weight gradient's ``x[n, c, h + ry, w + rx]``) is copied
    once per tap."""
    extents = {iv.var: int(iv.dom.extent) for iv in block.iter_vars}
    for index in plan.relayout:
        region = block.reads[index]
        used = math.prod(extent for var, extent in extents.items() if _stride(region, var) != 0)
        if used > math.prod(int(d) for d in region.source.shape):
            return True
    return False


def _tile_shape(vectors: int, most: int, free: list[_Axis]
                ) -> tuple[int, list[tuple[_Axis, int]]] | None:
    """The cheapest tile of ``V`` (at most ``most``) of the ``vectors`` vectors times ``P``
    points (tile extents of the ``free`` axes, :func:`_point_tiles`), ``V * P <=
    TILE_ACCUMULATORS``, ``P >= TILE_MIN``: fewest loads per FMA, ``(VECTOR_LOAD_COST V + P)
    / (V P)``, then more points."""
    best, best_key = None, None
    for tiles in _point_tiles(free, TILE_ACCUMULATORS):
        points = math.prod(size for _, size in tiles)
        if points < TILE_MIN:
            continue
        for v in range(1, min(most, TILE_ACCUMULATORS // points) + 1):
            key = (_loads_per_fma(v, points), -points)
            if vectors % v == 0 and (best_key is None or key < best_key):
                best, best_key = (v, tiles), key
    return best


def _loads_per_fma(vectors: int, points: int) -> float:
    """Loads per FMA of a tile of ``vectors`` vectors times ``points`` broadcast points."""
    return (VECTOR_LOAD_COST * vectors + points) / (vectors * points)


def _point_tiles(free: list[_Axis], budget: int):
    """The tile extents (divisors, at least 2, at most ``budget`` points in all) of a leading
    run of the ``free`` axes, as (axis, extent) lists."""
    yield []
    if free:
        axis, rest = free[0], free[1:]
        for size in range(min(budget, axis.extent), 1, -1):
            if axis.extent % size == 0:
                for tiles in _point_tiles(rest, budget // size):
                    yield [(axis, size), *tiles]


def _register_tile(sch: s_tir.Schedule, block, spatial: list[_Axis], reduce: list[_Axis],
                   plan: _TilePlan, lanes: int, cores: int) -> None:
    """Compute the tile (``plan.tiles`` x ``plan.vectors`` vectors) in a local accumulator
    buffer inside the reduction loops: spatial tile loops outside (parallel), then the
    reduction loops, then the unrolled vectors and tile loops and the vector lanes. The
    accumulators are initialised before and written back (with fused elementwise consumers)
    after the reduction loops. Where the reduction is split (:func:`_reduction_block`), its
    blocks run inside a parallel loop of one chunk of tiles per core, the chunk's other tile
    loops inside each block, and the tile accumulates in the output."""
    stmt = sch.get(block)
    # The loops over the largest input go outermost, so that it is read once and the smaller
    # inputs are reread from cache (a weight slab by every image of the batch, or an image by
    # every slab of a small weight).
    largest = max(stmt.reads, key=lambda r: math.prod(int(d) for d in r.source.shape))
    spatial = sorted(spatial, key=lambda a: _stride(largest, a.var) == 0)
    contiguous = _stride(stmt.writes[0], plan.vector.var) == 1
    split = _reduction_block(stmt, reduce, plan) if contiguous else None
    width = plan.vectors * plan.factor
    # A weight that only the vector indexes among the output's axes, and that is the largest
    # input (so the vector's blocks are the outermost loop), is copied slab by slab.
    slabs = split is None and spatial[0] is plan.vector and \
        plan.vector.extent // width >= SLAB_BLOCKS_PER_CORE * cores
    copies = []
    for index in plan.relayout:
        by_slab = slabs and [a for a in spatial
                             if _stride(stmt.reads[index], a.var) != 0] == [plan.vector]
        copy = _relayout_read(sch, block, index, plan.vector.var, lanes, width, not by_slab)
        if by_slab:
            copies.append(copy)
    if split is None:
        accumulators = _accumulators(sch, block, plan.vector.var, contiguous)
    inner_of = {plan.vector: [plan.vectors, plan.factor] if plan.vectors > 1 else [plan.factor],
                **{axis: [size] for axis, size in plan.tiles}}
    outer, inner = [], {}
    for axis in spatial:
        if axis in inner_of:
            loop_outer, *inner[axis] = sch.split(axis.loop, [None, *inner_of[axis]])
            outer.append(loop_outer)
        else:
            outer.append(axis.loop)
    *vector_loops, lane = inner[plan.vector]
    tile_loops = [*vector_loops, *[inner[axis][0] for axis, _ in reversed(plan.tiles)]]
    reduce_loops = [a.loop for a in reduce]
    work = math.prod(a.extent for a in [*spatial, *reduce])
    if split is not None:
        # One parallel region, a chunk of tiles per core, each walking the reduction blocks
        # in turn (a parallel loop inside the blocks would synchronise the threads once per
        # block, which is slow when other processes share the cores). Inside a block, all
        # the chunk's tiles run, reusing the block's slab of the inputs from cache.
        axis, size = split
        parallel = _leading(sch, outer, cores)
        chunks = math.prod(int(sch.get(loop).extent) for loop in outer[:parallel - 1])
        last = int(sch.get(outer[parallel - 1]).extent)
        keep = next((d for d in range(1, last + 1) if last % d == 0 and chunks * d >= cores),
                    last)
        if keep < last:
            outer[parallel - 1:parallel] = sch.split(outer[parallel - 1], [keep, None])
        blocks, reduce_loops[axis] = sch.split(reduce_loops[axis], [None, size])
        outer[parallel:parallel] = [*reduce_loops[:axis], blocks]
        del reduce_loops[:axis]
    sch.reorder(*outer, *reduce_loops, *tile_loops, lane)
    sch.vectorize(lane)
    for loop in tile_loops:
        sch.unroll(loop)
    if split is not None:  # the initialisation keeps the tile's loops and their annotations
        _parallelize(sch, outer[:parallel], work, cores)
        sch.decompose_reduction(block, outer[parallel])
        return
    _fuse_consumers(sch, accumulators)
    sch.reverse_compute_at(accumulators, outer[-1])
    for copy in copies:
        _copy_slab(sch, copy, outer[0], width, lanes)
    _parallelize(sch, outer[:1] if copies else outer, work)
    init = sch.decompose_reduction(block, reduce_loops[0])
    depth = len(sch.get_loops(init)) - len(tile_loops) - 1  # the loops outside the tile
    for stage in (init, accumulators):
        *others, last = sch.get_loops(stage)[depth:]
        for loop in others:
            sch.unroll(loop)
        if stage == init or contiguous:
            _vectorize(sch, last, int(sch.get(last).extent), lanes)
        else:
            sch.unroll(last)


def _accumulators(sch: s_tir.Schedule, block, vector: tirx.Var, contiguous: bool):
    """The block's output cached in a local buffer, laid out with ``vector`` last."""
    if contiguous:
        return sch.cache_write(block, 0, "local")
    output = sch.get(block).writes[0]
    iters = [iv.var for iv in sch.get(block).iter_vars]
    order = [k for k, v in enumerate(iters) if _stride(output, v) not in (0, None)
             and not v.same_as(vector)]
    order.append(next(k for k, v in enumerate(iters) if v.same_as(vector)))
    return sch.reindex_cache_write(block, 0, "local", _picking(order, len(iters)))


def _reduction_block(block: s_tir.SBlock, reduce: list[_Axis], plan: _TilePlan
                     ) -> tuple[int, int] | None:
    """Where the two largest inputs both exceed the cache (weight gradients, the gradient
    filter's matmuls: every tile would stream both from memory), the reduction axis to split
    into blocks and the inner extent of its split: the outermost axis that a block of
    ``REDUCTION_BLOCK_ELEMENTS`` of a tile's inputs can split, as large as that allows (an
    image of 60x80 pixels is split into rows). None if no split is needed."""
    sizes = sorted((math.prod(int(d) for d in r.source.shape) for r in block.reads), reverse=True)
    if len(sizes) < 2 or sizes[1] <= CACHED_ELEMENTS:
        return None
    for k, axis in enumerate(reduce):
        step = (plan.points + plan.vectors * plan.factor) * \
            math.prod(a.extent for a in reduce[k + 1:])
        split = max((d for d in range(1, axis.extent + 1)
                     if axis.extent % d == 0 and d * step <= REDUCTION_BLOCK_ELEMENTS), default=0)
        if split:
            return None if k == 0 and split == axis.extent else (k, split)
    return None


def _whole_output_consumer(sch: s_tir.Schedule, block):
    """The block's only consumer if it runs over the block's whole output (an elementwise
    epilogue: TVM would inline or place a slice of a smaller one, out of bounds), else None."""
    consumers = sch.get_consumers(block)
    shape = [int(d) for d in sch.get(block).writes[0].source.shape]
    if len(consumers) == 1 and \
            [int(iv.dom.extent) for iv in sch.get(consumers[0]).iter_vars] == shape:
        return consumers[0]
    return None


def _fuse_consumers(sch: s_tir.Schedule, block) -> None:
    """Inline the elementwise consumers of ``block`` (bias, batch norm, activation) into it,
    while they inline (:func:`_whole_output_consumer`)."""
    while (consumer := _whole_output_consumer(sch, block)) is not None:
        try:
            sch.reverse_compute_inline(consumer)
        except s_tir.schedule.ScheduleError:
            return


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


def _window(block: s_tir.SBlock, spatial: list[_Axis], reduce: list[_Axis]) -> _Axis | None:
    """For a pool whose windows tile its input's rows (one input, read at ``s q + rx`` along
    the row with ``s`` the extent of reduction axis ``rx``, the output's contiguous axis ``q``
    innermost, and another reduction axis longer than 1 to sum over), that ``rx``; else None.
    (A 1xk pool has nothing to sum before its windows, so it is vectorized along its row.)"""
    if len(block.reads) != 1 or len(spatial) < 2 or sum(a.extent > 1 for a in reduce) < 2:
        return None
    read, q = block.reads[0], spatial[-1]
    if q.extent == 1 or _stride(block.writes[0], q.var) != 1:
        return None
    return next((rx for rx in reduce if rx.extent > 1 and _stride(read, rx.var) == 1
                 and _stride(read, q.var) == rx.extent), None)


def _window_rows(sch: s_tir.Schedule, block, spatial: list[_Axis], rx: _Axis,
                 lanes: int) -> None:
    """Sum each input row's windows in two steps: the other reduction axes first, with
    contiguous vectors over the row (``rfactor`` of ``rx``: a row buffer), then the ``rx``
    neighbours in that row::

        for n, c (parallel):  for p:
            row[0:W] = 0
            for ry:  for w (vector):  row[w] += x[n, c, s p + ry, w]
            for q, rx:  y[n, c, p, q] += row[s q + rx]
            for q (vector):  avg[n, c, p, q] = y[n, c, p, q] / count   # an average's

    A padded copy of the input that could not be inlined (padding beside the map) is made
    there too, row ``p``'s windows only, so that it stays in cache (a 4x4 pool of 256x14x14
    maps, batch 8, alone: 0.058-0.077 ms, against 0.094-0.115 with the whole copy made first).
    """
    row = sch.rfactor(rx.loop, factor_axis=len(sch.get(block).writes[0].source.shape))
    # One row per parallel iteration. TVM takes a "local" buffer from its workspace pool (a
    # small "global" one would go on the stack, but measured slower here).
    sch.set_scope(row, 0, "local")
    sch.compute_at(row, spatial[-2].loop)
    for padding in sch.get_producers(row):
        if _condition(sch.get(padding)) is not None:
            sch.compute_at(padding, spatial[-2].loop)
            last = sch.get_loops(padding)[-1]
            _vectorize(sch, last, int(sch.get(last).extent), lanes)
    _parallelize(sch, [a.loop for a in spatial[:-2]],
                 math.prod(a.extent for a in spatial) * rx.extent)
    loops = _loops_by_iter(sch, row)
    iters = sch.get(row).iter_vars
    # rfactor's block iterates over (lane, the spatial axes, the other reduction axes)
    lane, q = loops[iters[0].var], loops[iters[len(spatial)].var]
    sums = [loops[iv.var] for iv in iters if iv.iter_type == tirx.IterVar.CommReduce]
    sch.reorder(*sums, q, lane)
    width = int(sch.get(q).extent) * rx.extent
    _vectorize(sch, sch.fuse(q, lane), width, lanes)
    sch.decompose_reduction(row, sums[0])
    # The average's division (an elementwise consumer) follows each output row, so that the
    # sums stay in cache instead of making a round trip through memory.
    if (consumer := _whole_output_consumer(sch, block)) is not None:
        sch.reverse_compute_at(consumer, spatial[-2].loop)
        last = sch.get_loops(consumer)[-1]
        _vectorize(sch, last, int(sch.get(last).extent), lanes)


def _loops_by_iter(sch: s_tir.Schedule, block) -> dict[tirx.Var, s_tir.schedule.LoopRV]:
    """The block's loops that bind one of its iterators directly, by iterator."""
    loops = sch.get_loops(block)
    realize = sch.get(loops[-1]).body
    by_var = {sch.get(loop).loop_var: loop for loop in loops}
    return {iv.var: by_var[value] for iv, value in zip(sch.get(block).iter_vars,
                                                      realize.iter_values) if value in by_var}


def _inline(sch: s_tir.Schedule, block) -> bool:
    """Inline the block into its consumers, unless it is padding whose condition would sit in a
    reduction's vector loop. Parts of a padding's condition that every read satisfies
    (:func:`_holds_where_read`) are dropped first."""
    consumers = sch.get_consumers(block)
    if not consumers:
        return False
    condition = _condition(sch.get(block))
    if condition is not None:
        conjuncts = _conjuncts(condition.args[0])
        kept = [c for c in conjuncts if not _holds_where_read(sch, block, c, consumers)]
        if kept and not _branch_per_row(sch, block, kept, consumers):
            return False
        if len(kept) < len(conjuncts):
            _set_condition(sch, block, condition, kept)
    sch.compute_inline(block)
    return True


def _pad_per_iteration(sch: s_tir.Schedule, block) -> bool:
    """Compute a padded copy that a pool keeps (:func:`_inline` leaves it when its condition
    would sit in the pool's vector loop) inside the pool's parallel loop, each iteration the
    part it reads, if that is no more work than the whole copy and at least
    ``PAD_PER_ITERATION_MIN`` elements. The copy then lives in one iteration's cache-sized
    buffer (a 65x65 plane of ResNet-18's max pool at 128x128) instead of a tensor larger than
    the pool's input (34 MiB at batch 32), which the step holds at its peak."""
    consumers = sch.get_consumers(block)
    if _condition(sch.get(block)) is None or len(consumers) != 1:
        return False
    pool = sch.get(consumers[0])
    written = {region.source for region in pool.writes}
    if len([region for region in pool.reads if region.source not in written]) != 1 or \
            not any(iv.iter_type == tirx.IterVar.CommReduce for iv in pool.iter_vars):
        return False
    outer = sch.get_loops(consumers[0])[0]
    if sch.get(outer).kind != tirx.ForKind.PARALLEL or \
            sch.get(sch.get_loops(block)[0]).same_as(sch.get(outer)):  # already inside it
        return False
    work = math.prod(int(iv.dom.extent) for iv in sch.get(block).iter_vars)
    sch.compute_at(block, outer, preserve_unit_loops=True)
    extents = [sch.get(loop).extent for loop in sch.get_loops(block)]
    return all(isinstance(e, tirx.IntImm) for e in extents) and \
        math.prod(int(e) for e in extents) <= work and \
        math.prod(int(e) for e in extents[1:]) >= PAD_PER_ITERATION_MIN


def _condition(block: s_tir.SBlock) -> tvm.ir.Call | None:
    """The block's value if it is a condition (``if_then_else``, as in padding), else None."""
    value = getattr(block.body, "value", None)
    if isinstance(value, tvm.ir.Call) and value.op.same_as(tvm.ir.Op.get("prim.if_then_else")):
        return value
    return None


def _branch_per_row(sch: s_tir.Schedule, block, condition: list[tirx.Expr], consumers
                    ) -> bool:
    """Whether the block's ``condition`` may go along into its consumers: none of them is a
    reduction, or each reduction reads this block alone (a pool) and the condition leaves the
    block's last index (the row) alone, so one branch covers a vector over the row."""
    reductions = [sch.get(c) for c in consumers if any(
        iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(c).iter_vars)]
    row = sch.get(block).body.indices[-1]
    return not reductions or all(len(r.reads) == 1 for r in reductions) and not any(
        row.same_as(v) for c in condition for v in tirx.analysis.undefined_vars(c))


def _conjuncts(expr: tirx.Expr) -> list[tirx.Expr]:
    if isinstance(expr, tirx.And):
        return _conjuncts(expr.a) + _conjuncts(expr.b)
    return [expr]


def _holds_where_read(sch: s_tir.Schedule, block, condition: tirx.Expr, consumers) -> bool:
    """Whether ``condition`` (on the block's iterators) holds wherever a consumer reads the
    block's output: for each read region of that buffer, with the block's iterators bound to a
    point of the region and the consumer's iterators ranging over their domains, the analyzer
    proves it."""
    store = sch.get(block).body
    if not all(isinstance(i, tirx.Var) for i in store.indices):
        return False
    for consumer in map(sch.get, consumers):
        for region in consumer.reads:
            if not region.source.same_as(store.buffer):
                continue
            analyzer = tvm.sym.Analyzer()
            for iv in consumer.iter_vars:
                analyzer.bind(iv.var, iv.dom)
            for index, r in zip(store.indices, region.region):
                offset = tirx.Var(f"{index.name}_offset", index.ty)
                analyzer.bind(offset, tvm.ir.Range.from_min_extent(0, r.extent))
                analyzer.bind(index, r.min + offset)
            if not analyzer.can_prove(condition):
                return False
    return True


def _set_condition(sch: s_tir.Schedule, block, condition: tvm.ir.Call,
                   kept: list[tirx.Expr]) -> None:
    """Replace the block's value ``if_then_else(c, a, b)`` by ``if_then_else(kept, a, b)``, or
    by ``a`` if nothing is kept (sound only where every read satisfies the dropped parts)."""
    stmt = sch.get(block)
    value = condition.args[1]
    if kept:
        value = tirx.if_then_else(functools.reduce(tirx.And, kept), value, condition.args[2])
    store = tirx.BufferStore(stmt.body.buffer, value, stmt.body.indices)
    plain = s_tir.SBlock(stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, store,
                         stmt.init, stmt.alloc_buffers, stmt.match_buffers, stmt.annotations)
    sch.state.replace(sch.get_sref(block), plain, {stmt: plain})


def _vector_factor(extent: int, lanes: int) -> int | None:
    """The widest vector (``lanes``, half or quarter of it, at least 4) that divides
    ``extent``."""
    return next((f for f in (lanes, lanes // 2, lanes // 4) if f >= 4 and extent % f == 0),
                None)


def _parallelize(sch: s_tir.Schedule, loops: list, work: int,
                 chunks: int = PARALLEL_CHUNKS) -> None:
    """Run the outermost of ``loops`` in parallel, fused with the next ones only until there
    are ``chunks`` (inner loops keep their plain, affine indices)."""
    if not loops or work < PARALLEL_MIN_WORK:
        return
    count = _leading(sch, loops, chunks)
    sch.parallel(sch.fuse(*loops[:count]) if count > 1 else loops[0])


def _leading(sch: s_tir.Schedule, loops: list, chunks: int) -> int:
    """How many of the outermost ``loops`` it takes to have ``chunks`` iterations."""
    count = 1
    for number, loop in enumerate(loops, 1):
        count *= int(sch.get(loop).extent)
        if count >= chunks:
            return number
    return len(loops)


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


def _injective(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Schedule a block without reduction (elementwise, broadcast, transpose, upsampling):

    1. Iterators that a read indexes through ``v // d`` or ``v % d`` (upsampling by ``d``,
       reshapes) are split by ``d``, so that every index is affine in the new iterators.
    2. The vector is the output's row (:func:`_output_row`) if a vector divides it; else a
       full vector of an axis with known strides (:func:`_strided_vector`: a weight gradient
       broadcast over the taps reads ``gw[o, i]`` along ``i`` and writes ``w[o, i, ky, kx]``
       9 apart); else none. Fusing loops into a vector where an index divides costs more in
       lane-wise division than the gathers and scatters of a strided vector.
    3. The outer loops run in parallel; without a vector, an innermost loop of at most 4
       (an upsampling's copies) is unrolled.
    """
    _split_divided(sch, block)
    axes = _axes(sch, block)
    stmt = _simplified(sch.get(block))
    work = math.prod(a.extent for a in axes)
    row = _output_row(stmt, axes, lanes)
    if row and _vector_factor(math.prod(a.extent for a in row), lanes):
        loops = [a.loop for a in axes[:-len(row)]]
        vector = sch.fuse(*[a.loop for a in row]) if len(row) > 1 else row[0].loop
        _vectorize(sch, vector, math.prod(a.extent for a in row), lanes)
    elif (axis := _strided_vector(stmt, axes, lanes)) is not None:
        # The axes inside it stay inside the vector's outer loop: their accesses fill the
        # cache lines that the vector's lanes touch.
        k = axes.index(axis)
        head, vector = sch.split(axis.loop, [None, lanes])
        loops = [*[a.loop for a in axes[:k]], head, *[a.loop for a in axes[k + 1:]]]
        sch.reorder(*loops, vector)
        sch.vectorize(vector)
    else:
        loops = [a.loop for a in axes]
        if axes[-1].extent <= 4:
            sch.unroll(axes[-1].loop)
    _parallelize(sch, loops, work)


def _split_divided(sch: s_tir.Schedule, block) -> None:
    """Split iterators that a read indexes non-affinely (``v // d``, ``v % d``: upsampling,
    reshapes) into ``(v // d, v % d)`` (``transform_block_layout``), the inner part affine in
    every read, until all are affine or no split makes them so."""
    while (split := _divisor(sch.get(block))) is not None:
        k, d = split
        sch.transform_block_layout(block, tirx.IndexMap.from_func(
            lambda *vs: [*vs[:k], vs[k] // d, vs[k] % d, *vs[k + 1:]],
            ndim=len(sch.get(block).iter_vars)))


def _divisor(block: s_tir.SBlock) -> tuple[int, int] | None:
    """The first iterator ``k`` that a read indexes non-affinely and the least ``d`` dividing
    its extent such that, with ``v = d * vo + vi``, every read is affine in ``vi``."""
    reads = _simplified(block).reads
    for k, iv in enumerate(block.iter_vars):
        var, extent = iv.var, int(iv.dom.extent)
        if all(_stride(r, var) is not None for r in reads):
            continue
        for d in (d for d in range(2, extent) if extent % d == 0):
            analyzer = tvm.sym.Analyzer()
            for other in block.iter_vars:
                if not other.var.same_as(var):
                    analyzer.bind(other.var, other.dom)
            outer, inner = tirx.Var("vo", var.ty), tirx.Var("vi", var.ty)
            analyzer.bind(outer, tvm.ir.Range(0, extent // d))
            analyzer.bind(inner, tvm.ir.Range(0, d))
            analyzer.bind(var, outer * d + inner)
            if all(len(detect_linear_equation(analyzer.simplify(_flat(r)), [inner])) == 2
                   for r in reads):
                return k, d
    return None


def _simplified(block: s_tir.SBlock) -> s_tir.SBlock:
    """The block with its access regions simplified under its iterators' domains (so that
    ``(2 h + dy) // 2`` reads as ``h``), for the stride analysis."""
    analyzer = tvm.sym.Analyzer()
    for iv in block.iter_vars:
        analyzer.bind(iv.var, iv.dom)

    def simplify(region: tvm.ir.TensorRegion) -> tvm.ir.TensorRegion:
        return tvm.ir.TensorRegion(region.source, [
            tvm.ir.Range.from_min_extent(analyzer.simplify(r.min), r.extent)
            for r in region.region], region.ty)

    return s_tir.SBlock(block.iter_vars, [simplify(r) for r in block.reads],
                        [simplify(w) for w in block.writes], block.name_hint, block.body)


def _strided_vector(block: s_tir.SBlock, axes: list[_Axis], lanes: int) -> _Axis | None:
    """Where the output has no row, an axis that a full vector divides and every access steps
    through with a known stride: preferably one that an input reads contiguously (the stores
    scatter), else one that the output writes contiguously (the loads gather), else one that
    no access strides by more than a vector (both, within a few cache lines)."""
    def strides(axis: _Axis) -> list[int | None]:
        return [_stride(r, axis.var) for r in [*block.writes, *block.reads]]

    candidates = [a for a in reversed(axes) if a.extent % lanes == 0 and None not in strides(a)]
    for fits in (lambda s: 1 in s[1:], lambda s: s[0] == 1, lambda s: max(s) <= lanes):
        axis = next((a for a in candidates if fits(strides(a))), None)
        if axis is not None:
            return axis
    return None


def _vector_inside(sch: s_tir.Schedule, block, outer: list, reduce: list, vector,
                   extent: int, work: int, lanes: int) -> None:
    """Order the block's loops as (outer, reduce, vector): outer in parallel, the vector loop
    (``extent`` long) vectorized innermost, the initialisation split off."""
    sch.reorder(*outer, *reduce, vector)
    _parallelize(sch, outer, work)
    _vectorize(sch, vector, extent, lanes)
    sch.decompose_reduction(block, reduce[0])


def vector_lanes(target: tvm.target.Target) -> int:
    """float32 lanes of ``target``'s vectors, from LLVM (16 on AVX-512, 4 on NEON)."""
    return max(4, tvm.target.codegen.llvm_get_vector_width(target) // 32)


def target_cores(target: tvm.target.Target) -> int:
    """The cores that ``target``'s kernels run on: its ``num-cores`` (the Raspberry Pi 4's
    tag says 4), else this machine's physical cores (``host``)."""
    return int(target.attrs.get("num-cores", 0)) or psutil.cpu_count(logical=False) or 1


def schedule_kernel(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """``func`` with the default CPU schedule for ``target``."""
    return _Scheduler(func, vector_lanes(target), target_cores(target)).run()


def schedule_unscheduled(mod: tvm.IRModule,
                         schedule: Callable[[tirx.PrimFunc, str], tirx.PrimFunc]
                         ) -> tvm.IRModule:
    """A copy of ``mod`` (a pass gets the caller's module itself) with ``schedule(func, name)``
    for every PrimFunc that has no schedule (no ``tirx.is_scheduled``: a tuning record's, or
    one written scheduled)."""
    mod = mod.clone()
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc) and not (func.attrs and SCHEDULED_ATTR in func.attrs):
            mod[gvar] = schedule(func, gvar.name_hint)
    return mod


@tvm.transform.module_pass(opt_level=0, name="DefaultCPUSchedule")
class DefaultCPUSchedule:
    """Schedule every unscheduled PrimFunc of the module for the current target."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = tvm.target.Target.current()
        return schedule_unscheduled(mod, lambda func, _name: schedule_kernel(func, target))
