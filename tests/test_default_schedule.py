"""DefaultCPUSchedule: the schedule it picks (Before/Expected) and numbers equal to the
unscheduled kernels, for every kind of kernel a train step has."""

import math
import re

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir, tirx

from gftvm import targets, tuning
from gftvm.passes.default_schedule import SCHEDULED_ATTR, DefaultCPUSchedule, schedule_kernel

#: Cortex-A72: 128-bit NEON, so 4 float lanes on every build machine.
NEON = targets.get("cortex-a72").tvm_target()
#: This machine's CPU with two cores, as CI has: the core count decides how split reductions
#: and weight slabs run in parallel.
HOST = tvm.target.Target({**targets.get("host").tvm_target().export(), "num-cores": 2})


def kernels(build, *shapes) -> tvm.IRModule:
    """The fused, legalized kernels of a one-op Relax function ``build(*params)``."""
    bb = relax.BlockBuilder()
    params = [relax.Var(f"p{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(*params))
        bb.emit_func_output(out)
    return tuning.lower(bb.get(), HOST, winograd=False)


def only_kernel(mod: tvm.IRModule) -> tirx.PrimFunc:
    (func,) = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
    return func


def test_elementwise_innermost_row_vectorized():
    before = only_kernel(kernels(lambda a, b: relax.op.add(a, b), (4, 32), (4, 32)))
    sch = s_tir.Schedule(before)
    _, j = sch.get_loops(sch.get_sblock("T_add"))
    sch.vectorize(sch.split(j, [None, 4])[1])
    expected = sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    tvm.ir.assert_structural_equal(schedule_kernel(before, NEON), expected)


def test_depthwise_output_row_inside_the_reduction():
    """y[n, c, h, w] += x[n, c, h + ry, w + rx] * k[c, 0, ry, rx] (no register tile: every
    axis but w's neighbours indexes x): w innermost, vectorized, (n, c, h) in parallel; the
    padding-free "pad" copy inlined."""
    before = only_kernel(kernels(lambda x, w: relax.op.nn.conv2d(x, w, groups=8),
                                 (2, 8, 18, 18), (8, 1, 3, 3)))
    sch = s_tir.Schedule(before)
    sch.compute_inline(sch.get_sblock("pad_temp"))
    conv = sch.get_sblock("group_conv2d_nchw")
    n, c, h, w, rc, ry, rx = sch.get_loops(conv)
    sch.reorder(n, c, h, rc, ry, rx, w)
    sch.parallel(sch.fuse(n, c, h))
    sch.vectorize(sch.split(w, [None, 4])[1])
    sch.decompose_reduction(conv, rc)
    expected = sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    tvm.ir.assert_structural_equal(schedule_kernel(before, NEON), expected)


def test_padding_the_windows_never_read_is_inlined():
    """A ceil-mode pool whose windows tile the map exactly (the gradient filter's pools) pads
    the map but never reads the padding: the padding is inlined without its condition, so the
    kernel is scheduled exactly as the same pool without ceil mode (no pad copy, no branch)."""
    pool = lambda ceil: lambda x: relax.op.nn.avg_pool2d(x, 4, 4, ceil_mode=ceil)
    padded = only_kernel(kernels(pool(True), (2, 8, 4, 4)))
    assert "pad_temp" in padded.script()
    expected = schedule_kernel(only_kernel(kernels(pool(False), (2, 8, 4, 4))), NEON)
    tvm.ir.assert_structural_equal(schedule_kernel(padded, NEON), expected)


def test_padding_along_rows_only_is_inlined_into_the_pool():
    """A ceil-mode 4x4 pool of a 6x8 map reads padding below the map but none beside it (8
    columns tile exactly): the padding is inlined with its row condition only, into the window
    rows' sum, where one condition covers each vector over the row; no padded copy."""
    scheduled = schedule_kernel(only_kernel(kernels(lambda x: relax.op.nn.avg_pool2d(
        x, 4, 4, ceil_mode=True, count_include_pad=False), (2, 8, 6, 8))), NEON)
    sch = s_tir.Schedule(scheduled)
    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    assert "pad_temp" not in blocks
    rows = blocks["pool_sum_rf_update"]
    loops = sch.get_loops(rows)
    vector = next(sch.get(loop).loop_var for loop in loops
                  if sch.get(loop).kind == tirx.ForKind.VECTORIZED)
    realize = sch.get(loops[-1]).body
    binding = {iv.var: value for iv, value in zip(realize.block.iter_vars, realize.iter_values)}
    condition = realize.block.body.value.b.args[0]
    used = tirx.analysis.undefined_vars(condition)
    assert used and not any(vector.same_as(v) for var in used
                            for v in tirx.analysis.undefined_vars(binding[var]))


def test_padding_beside_the_map_is_copied_row_by_row():
    """A ceil-mode 4x4 pool of a 6x6 map reads padding beside the map too (a condition per
    lane): the padded copy stays, but each output row copies just its windows' rows, vectorized,
    inside the window sums' row loop (so the copy stays in cache), not the whole map
    ahead of the pool."""
    scheduled = schedule_kernel(only_kernel(kernels(lambda x: relax.op.nn.avg_pool2d(
        x, 4, 4, ceil_mode=True, count_include_pad=False), (2, 8, 6, 6))), NEON)
    sch = s_tir.Schedule(scheduled)
    pad, rows = sch.get_sblock("pad_temp"), sch.get_sblock("pool_sum_rf_update")
    row_loops = [sch.get(loop) for loop in sch.get_loops(rows)[:3]]   # n, c, output row p
    pad_loops = [sch.get(loop) for loop in sch.get_loops(pad)]
    assert pad_loops[:3] == row_loops
    assert [int(loop.extent) for loop in pad_loops[3:]] == [4, 2, 4]   # 4 rows of 2 vectors
    assert pad_loops[-1].kind == tirx.ForKind.VECTORIZED


def test_padding_a_window_reads_is_kept():
    """An overlapping 3x3 stride-2 max pool (ResNet's) reads its padding: the padded copy stays
    a block of its own (inlined, its condition would sit in the reduction loops)."""
    before = only_kernel(kernels(lambda x: relax.op.nn.max_pool2d(x, 3, 2, padding=1),
                                 (2, 4, 8, 8)))
    sch = s_tir.Schedule(before)
    pool = sch.get_sblock("pool_max")
    n, c, h, w, ry, rx = sch.get_loops(pool)
    sch.reorder(n, c, h, ry, rx, w)
    sch.vectorize(w)
    sch.decompose_reduction(pool, ry)
    expected = sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    tvm.ir.assert_structural_equal(schedule_kernel(before, NEON), expected)


def test_padding_a_window_reads_is_copied_per_plane():
    """The same pool on a map large enough to run in parallel: the padded copy is computed
    inside the pool's parallel loop, the plane each iteration reads, not as a tensor ahead of
    the pool (at 128x128, batch 32, ResNet-18's took 34 MiB at the step's peak)."""
    scheduled = schedule_kernel(only_kernel(kernels(
        lambda x: relax.op.nn.max_pool2d(x, 3, 2, padding=1), (8, 16, 32, 32))), HOST)
    sch = s_tir.Schedule(scheduled)
    outer, *inner = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("pad_temp"))]
    assert outer.kind == tirx.ForKind.PARALLEL
    assert outer.same_as(sch.get(sch.get_loops(sch.get_sblock("pool_max_update"))[0]))
    assert [int(loop.extent) for loop in inner] == [1, 1, 33, 33]   # the rows and columns read


def test_strided_conv_reads_its_padded_input_deinterleaved():
    """A stride-2 conv reads its padded input 2 apart along w: the padded copy is stored
    de-interleaved, ``[n, c, h, w % 2, w // 2]``, so the register tile reads it contiguously,
    with no relayout copy of it (which would hold it once per tap)."""
    scheduled = schedule_kernel(only_kernel(kernels(
        lambda x, w: relax.op.nn.conv2d(x, w, strides=2, padding=3), (2, 3, 32, 32),
        (16, 3, 7, 7))), NEON)
    sch = s_tir.Schedule(scheduled)
    blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    pad = next(b for b in blocks if b.name_hint == "pad_temp")
    assert [int(d) for d in pad.writes[0].source.shape] == [2, 3, 38, 2, 19]
    assert not any(b.name_hint.endswith("_global") for b in blocks)
    assert register_tiled(scheduled)


def test_conv_register_tile():
    """y[n, c, h, w] += x[n, rc, h + ry, w + rx] * k[c, rc, ry, rx]: each x vector along w
    feeds 16 accumulators (c), kept in a local buffer inside the reduction loops, initialised
    before and written back after them; c (the largest input k's axis) outermost."""
    before = only_kernel(kernels(lambda x, w: relax.op.nn.conv2d(x, w),
                                 (2, 8, 6, 6), (16, 8, 3, 3)))
    sch = s_tir.Schedule(before)
    sch.compute_inline(sch.get_sblock("pad_temp"))
    conv = sch.get_sblock("conv2d_nchw")
    n, c, h, w, rc, ry, rx = sch.get_loops(conv)
    accumulators = sch.cache_write(conv, 0, "local")
    c_outer, c_inner = sch.split(c, [None, 16])
    w_outer, w_inner = sch.split(w, [None, 4])
    sch.reorder(c_outer, n, h, w_outer, rc, ry, rx, c_inner, w_inner)
    sch.vectorize(w_inner)
    sch.unroll(c_inner)
    sch.reverse_compute_at(accumulators, w_outer)
    sch.parallel(sch.fuse(c_outer, n, h, w_outer))  # 36,864 multiply-adds: enough for threads
    init = sch.decompose_reduction(conv, rc)
    for stage in (init, accumulators):
        c_tile, w_tile = sch.get_loops(stage)[1:]
        sch.unroll(c_tile)
        sch.vectorize(w_tile)
    expected = sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    tvm.ir.assert_structural_equal(schedule_kernel(before, NEON), expected)


def split_reduction_tile(before: tirx.PrimFunc, block_name: str) -> tirx.PrimFunc:
    """The split-reduction register tile expected on NEON for a block over (row, column,
    *outer reductions, k): 16 rows x one vector of 4 columns, 2 x 2 parallel chunks for the
    Cortex-A72's 4 cores, k split by 768 ((16 + 4) x 768 elements within 64 KiB), the chunk's
    other tiles inside each block."""
    sch = s_tir.Schedule(before)
    block = sch.get_sblock(block_name)
    row, col, *outer_reduce, k = sch.get_loops(block)
    row_outer, row_inner = sch.split(row, [None, 16])
    col_outer, col_inner = sch.split(col, [None, 4])
    col_chunk, col_rest = sch.split(col_outer, [2, None])
    k_outer, k_inner = sch.split(k, [None, 768])
    sch.reorder(row_outer, col_chunk, *outer_reduce, k_outer, col_rest, k_inner, row_inner,
                col_inner)
    sch.vectorize(col_inner)
    sch.unroll(row_inner)
    sch.parallel(sch.fuse(row_outer, col_chunk))
    sch.decompose_reduction(block, [*outer_reduce, k_outer][0])
    return sch.mod["main"].with_attr(SCHEDULED_ATTR, True)


def test_large_reduction_is_split_outside_the_tile():
    """Both matmul inputs exceed the cache: the reduction is split into blocks, which one
    parallel chunk of tiles per core walks in turn, all of the chunk's tiles inside each
    block, so that they reread the block of both inputs from cache; the tile accumulates in
    the output."""
    before = only_kernel(kernels(lambda a, b: relax.op.matmul(a, b), (32, 9216), (9216, 32)))
    tvm.ir.assert_structural_equal(schedule_kernel(before, NEON),
                                   split_reduction_tile(before, "matmul"))


def test_split_reduction_blocks_an_inner_axis():
    """Where even one step of the outermost reduction axis (an image of the batch) holds more
    than a block, the blocks split the next axis: the gradient filter's weight gradient sums
    over images and pixels, and its blocks are rows of one image."""
    before = only_kernel(kernels(lambda a, b: relax.op.einsum((a, b), "ako,aki->oi"),
                                 (4, 2304, 32), (4, 2304, 32)))
    tvm.ir.assert_structural_equal(schedule_kernel(before, NEON),
                                   split_reduction_tile(before, "T_einsum"))


def test_reduction_over_contiguous_axis_is_rfactored():
    """A sum over H·W has no contiguous output axis: W is split and rfactor-ed."""
    scheduled = schedule_kernel(
        only_kernel(kernels(lambda x: relax.op.sum(x, axis=[0, 2, 3]), (4, 16, 8, 8))), NEON)
    assert "_rf" in scheduled.script() and "T.vectorized" in scheduled.script()


def test_small_map_weight_copied_in_vector_blocks():
    """On a 1x1 map the tile's vectors run over output channels: the weight k[c, rc, ry, rx]
    is first copied with c split into blocks as wide as the tile's 2 vectors that go first,
    k'[c // 8, rc, ry, rx, c % 8], so the tile's walk over (rc, ry, rx) reads contiguous
    memory. The copy gathers each vector of c at a few consecutive (unrolled) positions of
    (rc, ry, rx) in turn, so the weight rows it reads stay in cache."""
    scheduled = schedule_kernel(only_kernel(kernels(*CASES["conv_on_1x1_map"][:1],
                                                    *CASES["conv_on_1x1_map"][1:])), NEON)
    sch = s_tir.Schedule(scheduled)
    copies = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
              if sch.get(b).name_hint.endswith("_global")]
    assert [[int(d) for d in sch.get(c).writes[0].source.shape] for c in copies] == \
        [[8, 64, 3, 3, 8]]
    *_, read, lane = [sch.get(loop) for loop in sch.get_loops(copies[0])]
    assert (read.kind, int(read.extent)) == (tirx.ForKind.UNROLLED, 4)
    assert (lane.kind, int(lane.extent)) == (tirx.ForKind.VECTORIZED, 4)


def test_large_weight_copied_slab_by_slab():
    """A 3x3 conv with 512 output channels on a 2x2 map (NEON: 4 lanes, 4 cores): the tile's
    vectors run over output channels, and the weight, the largest input, is copied in blocks
    of them. The parallel loop runs over those blocks alone, and each iteration copies the one
    block that its tiles read, just before them: the copy is a slab that stays in cache (the
    buffer shrinks to one block when lowered), not the whole weight written to memory and
    read back."""
    scheduled = schedule_kernel(only_kernel(kernels(*CASES["conv_weight_slabs"][:1],
                                                    *CASES["conv_weight_slabs"][1:])), NEON)
    sch = s_tir.Schedule(scheduled)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    (copy,) = [b for b in blocks if sch.get(b).name_hint.endswith("_global")]
    (tile,) = [b for b in blocks if sch.get(b).name_hint.endswith("_update")]
    chunk = sch.get(sch.get_loops(copy)[0])
    assert chunk.same_as(sch.get(sch.get_loops(tile)[0]))
    assert (chunk.kind, int(chunk.extent)) == (tirx.ForKind.PARALLEL, 512 // 8)
    *_, read, lane = [sch.get(loop) for loop in sch.get_loops(copy)]
    assert (read.kind, lane.kind) == (tirx.ForKind.UNROLLED, tirx.ForKind.VECTORIZED)
    lowered = tvm.transform.Sequential([
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation()])(tvm.IRModule({"main": scheduled}))
    (allocation,) = [line for line in lowered.script().splitlines()
                     if "_global = T.sblock_alloc_buffer" in line]
    assert [int(d) for d in re.findall(r"T\.int64\((\d+)\)", allocation)] == [1, 16, 3, 3, 8]


def test_long_reduction_tiles_channels_not_the_row():
    """A 3x3 conv with 16 input channels on a 4x4 map (NEON: one vector is the whole row):
    a row vector times 16 channels loads 1.125 times per FMA, 2 vectors of channels times 8
    pixels 0.75; over 144 multiply-adds per output that saves 13.5 loads per output element,
    more than the channels' scattered write-back and weight copy cost (``SCATTER_LOADS``),
    so the tile runs over channels: the weight is copied in blocks of 2 vectors. A 1x1 conv
    (8 multiply-adds per output) keeps the row and reads its weight in place."""
    def weight_copies(shapes):
        scheduled = schedule_kernel(only_kernel(kernels(
            lambda x, w: relax.op.nn.conv2d(x, w, padding=shapes[1][2] // 2), *shapes)), NEON)
        sch = s_tir.Schedule(scheduled)
        return [[int(d) for d in sch.get(b).writes[0].source.shape]
                for b in sch.get_child_blocks(sch.get_sblock("root"))
                if sch.get(b).name_hint.endswith("_global")]
    assert weight_copies([(2, 16, 4, 4), (32, 16, 3, 3)]) == [[4, 16, 3, 3, 8]]
    assert weight_copies([(2, 8, 4, 4), (32, 8, 1, 1)]) == []


def test_weight_gradient_is_not_copied_per_tap():
    """A weight gradient on 4x4 maps, y[c, k, ry, rx] += x[n, c, h + ry, w + rx] * gy[n, k, h, w]:
    vectors of c would need x copied with c last for every tap (its read is indexed by
    h + ry), 4x the padded x; vectors of k copy gy as it is, so the tile runs over k."""
    scheduled = schedule_kernel(only_kernel(kernels(
        lambda x, gy: relax.op.nn.conv2d(x, gy, padding=1, data_layout="CNHW",
                                         kernel_layout="IOHW", out_layout="CNHW"),
        (8, 32, 4, 4), (8, 32, 4, 4))), NEON)
    sch = s_tir.Schedule(scheduled)
    copies = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))
              if sch.get(b).name_hint.endswith("_global")]
    assert [c.reads[0].source.name for c in copies] == ["p1"]
    assert all(math.prod(int(d) for d in c.writes[0].source.shape) ==
               math.prod(int(d) for d in c.reads[0].source.shape) for c in copies)


def test_small_map_tile_has_several_vectors():
    """A 1x1 conv_transpose on a 7x7 map (the gradient filter's low-resolution product): the
    tile's points run over the 7 pixels of a row, too few accumulators for one vector, so the
    tile takes 2 vectors of output channels (unrolled) times 7 points, 14 accumulators."""
    scheduled = schedule_kernel(only_kernel(kernels(*CASES["conv_transpose_1x1_small_map"][:1],
                                                    *CASES["conv_transpose_1x1_small_map"][1:])),
                                NEON)
    sch = s_tir.Schedule(scheduled)
    (update,) = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                 if sch.get(b).name_hint.endswith("_update")]
    assert sch.get(update).writes[0].source.scope() == "local"
    tile = [(sch.get(loop).kind, int(sch.get(loop).extent)) for loop in sch.get_loops(update)[-3:]]
    assert tile == [(tirx.ForKind.UNROLLED, 2), (tirx.ForKind.UNROLLED, 7),
                    (tirx.ForKind.VECTORIZED, 4)]


def test_pool_windows_summed_row_by_row():
    """A 2x2 stride-2 pool sums each window's rows first, in a row buffer on the thread's
    stack, with vectors contiguous over the input row, then the row's neighbours."""
    scheduled = schedule_kernel(only_kernel(kernels(
        lambda x: relax.op.nn.avg_pool2d(x, 2, 2), (8, 16, 8, 32))), NEON)
    sch = s_tir.Schedule(scheduled)
    rows = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
            if sch.get(b).name_hint == "pool_sum_rf_update"]
    assert len(rows) == 1 and sch.get(rows[0]).writes[0].source.scope() == "local"
    kinds = [sch.get(loop).kind for loop in sch.get_loops(rows[0])]
    assert kinds[0] == tirx.ForKind.PARALLEL and kinds[-1] == tirx.ForKind.VECTORIZED
    assert int(sch.get(sch.get_loops(rows[0])[-1]).extent) == 4   # NEON: 4 lanes


def test_pool_average_divides_each_row_after_its_sums():
    """The average's division runs inside the same output-row loop as the window sums (and
    vectorized), so the sums are divided while in cache instead of being written to memory by
    one parallel loop and read back by another."""
    scheduled = schedule_kernel(only_kernel(kernels(
        lambda x: relax.op.nn.avg_pool2d(x, 2, 2), (8, 16, 8, 32))), NEON)
    sch = s_tir.Schedule(scheduled)
    sums, divide = (sch.get_sblock(name) for name in ("pool_sum", "pool_avg"))
    row_loops = sch.get_loops(sums)[:-2]          # n, c (parallel), output row p
    assert [sch.get(loop) for loop in sch.get_loops(divide)[:len(row_loops)]] == \
        [sch.get(loop) for loop in row_loops]
    last = sch.get(sch.get_loops(divide)[-1])
    assert last.kind == tirx.ForKind.VECTORIZED and int(last.extent) == 4


def upsample(low, factor: int = 2):
    """The gradient filter's upsampling (passes/gradient_filter.py): each value copied to a
    factor x factor block, as a reshape and broadcast."""
    n, c, h, w = (int(d) for d in low.ty.shape)
    tiles = relax.op.broadcast_to(relax.op.reshape(low, (n, c, h, 1, w, 1)),
                                  (n, c, h, factor, w, factor))
    return relax.op.reshape(tiles, (n, c, h * factor, w * factor))


def taps_broadcast(gw):
    """A weight gradient copied to every tap of a 3x3 kernel, as the filter writes it."""
    co, ci = (int(d) for d in gw.ty.shape)
    return relax.op.broadcast_to(relax.op.reshape(gw, (co, ci, 1, 1)), (co, ci, 3, 3))


def test_upsampling_split_into_affine_loops():
    """y[n, c, h, w] = x[n, c, h // 2, w // 2]: h and w are split by 2 (h = 2 ho + dy), so no
    index divides; no axis has a full vector of known strides, so the copies stay scalar, the
    innermost unrolled."""
    before = only_kernel(kernels(upsample, (2, 8, 3, 3)))
    sch = s_tir.Schedule(before)
    for name in ("T_reshape", "T_broadcast_to"):
        sch.compute_inline(sch.get_sblock(name))
    block = sch.get_sblock("T_reshape1")
    split_h = lambda n, c, h, w: [n, c, h // 2, h % 2, w]
    split_w = lambda n, c, ho, dy, w: [n, c, ho, dy, w // 2, w % 2]
    for split in (split_h, split_w):
        sch.transform_block_layout(block, split)
    sch.unroll(sch.get_loops(block)[-1])
    expected = sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    tvm.ir.assert_structural_equal(schedule_kernel(before, NEON), expected)


def test_broadcast_to_taps_vectorized_along_the_read():
    """w[o, i, ky, kx] = gw[o, i]: the vector runs along i (contiguous in gw, stores 9 apart)
    with the taps inside its outer loop, not along the fused (i, ky, kx) with i = f // 9."""
    before = only_kernel(kernels(taps_broadcast, (8, 16)))
    sch = s_tir.Schedule(before)
    sch.compute_inline(sch.get_sblock("T_reshape"))
    block = sch.get_sblock("T_broadcast_to")
    o, i, ky, kx = sch.get_loops(block)
    head, lane = sch.split(i, [None, 4])
    sch.reorder(o, head, ky, kx, lane)
    sch.vectorize(lane)
    expected = sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    tvm.ir.assert_structural_equal(schedule_kernel(before, NEON), expected)


def tap_sum(w):
    """The gradient filter's low-resolution kernel: a weight summed over its taps."""
    return relax.op.sum(w, axis=[2, 3], keepdims=True)


def test_tap_sum_in_two_plain_loops_per_row():
    """s[o, i] = sum over taps of w[o, i, ky, kx]: per output row o (parallel), each window
    row's 3 taps summed into a row buffer laid out [i, ky] (rfactor of ky), one fused loop,
    then the buffer's groups of 3: plain loops with the window unrolled, which LLVM vectorizes
    with interleaved loads, instead of vectors gathering 9 apart."""
    before = only_kernel(kernels(tap_sum, (128, 16, 3, 3)))
    sch = s_tir.Schedule(before)
    block = sch.get_child_blocks(sch.get_sblock("root"))[0]
    rows = sch.rfactor(sch.get_loops(block)[4], factor_axis=4)
    o, i, a2, a3, ky = sch.get_loops(block)
    sch.parallel(o)
    sch.unroll(ky)
    sch.compute_at(rows, o)
    ky_rows, i_rows, kx = sch.get_loops(rows)[1:]    # compute_at leaves out the unit axes
    sch.reorder(i_rows, ky_rows, kx)
    sch.fuse(i_rows, ky_rows)
    sch.unroll(kx)
    expected = sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    tvm.ir.assert_structural_equal(schedule_kernel(before, NEON), expected)


def test_tap_sum_loops_compile_to_interleaved_loads():
    """LLVM vectorizes the tap sum's plain loops: on NEON with ``ld3`` (three vectors loaded
    de-interleaved), the code the schedule relies on instead of TVM's vectorize."""
    kernel = schedule_kernel(only_kernel(kernels(tap_sum, (128, 16, 3, 3))), NEON)
    executable = tvm.compile(tvm.IRModule({"tap_sum": kernel.with_attr(
        "global_symbol", "tap_sum")}), target=NEON)
    assert re.search(r"\bld3\s", executable.mod.inspect_source("s"))


def test_depthwise_tap_sum_vectorized_across_windows():
    """A depthwise weight's tap sum s[o] has no axis outside o to run rows over: the vector
    along o runs inside the tap loops (lanes one window apart), no relayout copy."""
    before = only_kernel(kernels(tap_sum, (16, 1, 3, 3)))
    sch = s_tir.Schedule(before)
    block = sch.get_child_blocks(sch.get_sblock("root"))[0]
    o, i, a2, a3, ky, kx = sch.get_loops(block)
    sch.reorder(i, a2, a3, ky, kx, o)
    sch.vectorize(sch.split(o, [None, 4])[1])
    sch.decompose_reduction(block, ky)
    expected = sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    tvm.ir.assert_structural_equal(schedule_kernel(before, NEON), expected)


def reduction_vectorized(func: tirx.PrimFunc) -> bool:
    """Whether a block that reduces (the conv, matmul, pool or sum itself, or its rfactor
    partial sums) runs inside a vectorized loop."""
    sch = s_tir.Schedule(func)
    return any(any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)
               and any(sch.get(loop).kind == tirx.ForKind.VECTORIZED
                       for loop in sch.get_loops(block))
               for block in sch.get_child_blocks(sch.get_sblock("root")))


def register_tiled(func: tirx.PrimFunc) -> bool:
    """Whether a reduction block runs in an unrolled tile of vectors (no other rule unrolls)."""
    sch = s_tir.Schedule(func)
    return any(any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)
               and {tirx.ForKind.UNROLLED, tirx.ForKind.VECTORIZED}
               <= {sch.get(loop).kind for loop in sch.get_loops(block)}
               for block in sch.get_child_blocks(sch.get_sblock("root")))


def writes_in_bounds(func: tirx.PrimFunc) -> bool:
    """Whether every block writes inside its buffers, over its iterators' whole domain (an
    out-of-bounds write may go unnoticed in the numbers)."""
    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(block)
        analyzer = tvm.sym.Analyzer()
        for iv in stmt.iter_vars:
            analyzer.bind(iv.var, iv.dom)
        for region in stmt.writes:
            for r, size in zip(region.region, region.source.shape):
                bound = analyzer.const_int_bound(r.min + r.extent - 1)
                if bound.min_value < 0 or bound.max_value >= int(size):
                    return False
    return True


def gf_grad_weight(g, x):
    """The gradient filter's weight gradient: Σ over batch and blocks of ḡ·x̃, an einsum
    over both tensors' own layouts (see passes/gradient_filter.py)."""
    return relax.op.einsum((g, x), "nopq,nipq->oi")


def naive_and_scheduled(build, *shapes) -> tuple[list[tirx.PrimFunc], np.ndarray, np.ndarray]:
    """The default-scheduled kernels of ``build`` and its results on random inputs, with TVM's
    naive loops and with those kernels."""
    mod = kernels(build, *shapes)
    with HOST:
        scheduled = DefaultCPUSchedule()(mod)
    rng = np.random.default_rng(0)
    inputs = [tvm.runtime.tensor(rng.standard_normal(s).astype("float32")) for s in shapes]
    results = [relax.VirtualMachine(tvm.compile(module, target=HOST), tvm.cpu())["main"](
        *inputs).numpy() for module in (mod, scheduled)]
    funcs = [f for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)]
    return funcs, *results


CASES = {
    "conv3x3": (lambda x, w: relax.op.nn.conv2d(x, w, padding=1), (8, 16, 8, 8), (16, 16, 3, 3)),
    "conv_stride2": (lambda x, w: relax.op.nn.conv2d(x, w, strides=2, padding=1),
                     (8, 16, 16, 16), (32, 16, 3, 3)),
    "conv7x7_stride2_stem": (lambda x, w: relax.op.nn.conv2d(x, w, strides=2, padding=3),
                             (4, 3, 32, 32), (16, 3, 7, 7)),
    "depthwise": (lambda x, w: relax.op.nn.conv2d(x, w, padding=1, groups=16),
                  (8, 16, 8, 8), (16, 1, 3, 3)),
    "conv_on_1x1_map": (lambda x, w: relax.op.nn.conv2d(x, w, padding=1),
                        (8, 64, 1, 1), (64, 64, 3, 3)),
    "conv_weight_slabs": (lambda x, w: relax.op.nn.conv2d(x, w, padding=1),
                          (2, 16, 2, 2), (512, 16, 3, 3)),
    "pointwise_2x2": (lambda x, w: relax.op.nn.conv2d(x, w), (8, 64, 2, 2), (128, 64, 1, 1)),
    "conv_transpose": (lambda x, w: relax.op.nn.conv2d_transpose(x, w, padding=1),
                       (8, 16, 8, 8), (16, 8, 3, 3)),
    "weight_gradient": (lambda x, gy: relax.op.nn.conv2d(
        x, gy, padding=1, data_layout="CNHW", kernel_layout="IOHW", out_layout="CNHW"),
        (8, 16, 8, 8), (8, 32, 8, 8)),
    "weight_gradient_4x4": (lambda x, gy: relax.op.nn.conv2d(
        x, gy, padding=1, data_layout="CNHW", kernel_layout="IOHW", out_layout="CNHW"),
        (8, 32, 4, 4), (8, 32, 4, 4)),
    "matmul_transposed": (lambda a, b: relax.op.matmul(a, relax.op.permute_dims(b)),
                          (8, 64), (32, 64)),
    "avg_pool": (lambda x: relax.op.nn.avg_pool2d(x, 2, 2), (8, 16, 8, 8)),
    "avg_pool_ceil_tiling": (lambda x: relax.op.nn.avg_pool2d(
        x, 4, 4, ceil_mode=True, count_include_pad=False), (8, 16, 4, 4)),
    "avg_pool_ceil_reads_padding": (lambda x: relax.op.nn.avg_pool2d(
        x, 4, 4, ceil_mode=True, count_include_pad=False), (8, 16, 6, 6)),
    "avg_pool_ceil_partial_rows": (lambda x: relax.op.nn.avg_pool2d(
        x, 4, 4, ceil_mode=True, count_include_pad=False), (8, 16, 6, 16)),
    "avg_pool_1x4": (lambda x: relax.op.nn.avg_pool2d(x, (1, 4), (1, 4)), (8, 16, 6, 16)),
    "avg_pool_4x1": (lambda x: relax.op.nn.avg_pool2d(x, (4, 1), (4, 1)), (8, 16, 8, 16)),
    "max_pool_padded": (lambda x: relax.op.nn.max_pool2d(x, 3, 2, padding=1), (8, 16, 8, 8)),
    "max_pool_padded_per_plane": (lambda x: relax.op.nn.max_pool2d(x, 3, 2, padding=1),
                                  (8, 16, 32, 32)),
    "max_pool_windows": (lambda x: relax.op.nn.max_pool2d(x, 2, 2), (8, 16, 8, 24)),
    "sum_hw": (lambda x: relax.op.sum(x, axis=[2, 3]), (8, 16, 8, 8)),
    "conv_bn_relu6": (lambda x, w, s: relax.op.clip(relax.op.multiply(
        relax.op.nn.conv2d(x, w, padding=1), s), 0, 6), (8, 16, 8, 8), (16, 16, 3, 3),
        (1, 16, 1, 1)),
    "conv_small_map_bias_relu": (lambda x, w, b: relax.op.nn.relu(relax.op.add(
        relax.op.nn.conv2d(x, w, padding=1), b)), (8, 32, 4, 4), (32, 32, 3, 3), (1, 32, 1, 1)),
    "conv_16x16_channel_tile": (lambda x, w: relax.op.nn.conv2d(x, w, padding=1),
                                (2, 64, 16, 16), (32, 64, 3, 3)),
    "conv_transpose_1x1_small_map": (lambda x, w: relax.op.nn.conv2d_transpose(x, w),
                                     (8, 64, 7, 7), (64, 64, 1, 1)),
    "conv_transpose_stride2": (lambda x, w: relax.op.nn.conv2d_transpose(
        x, w, strides=2, padding=1, output_padding=1), (4, 32, 5, 5), (32, 16, 3, 3)),
    "conv_sliced_add": (lambda x, w, b: relax.op.add(relax.op.strided_slice(
        relax.op.nn.conv2d(x, w), [2, 3], [0, 0], [3, 3]), b),
        (4, 8, 6, 6), (16, 8, 3, 3), (4, 16, 3, 3)),
    "matmul_split_reduction": (lambda a, b: relax.op.matmul(a, b), (32, 9216), (9216, 32)),
    "batch_matmul": (lambda a, b: relax.op.matmul(a, b), (2, 16, 32), (2, 32, 24)),
    "gf_grad_weight": (gf_grad_weight, (4, 32, 3, 5), (4, 24, 3, 5)),
    "gf_grad_weight_beyond_cache": (gf_grad_weight, (2, 64, 48, 48), (2, 64, 48, 48)),
    "tap_sum": (tap_sum, (64, 32, 3, 3)),
    "tap_sum_depthwise": (tap_sum, (32, 1, 3, 3)),
}
#: The kernels whose reduction gets a register tile (the others have no axis to tile).
TILED = set(CASES) - {"depthwise", "avg_pool", "avg_pool_ceil_tiling",
                      "avg_pool_ceil_reads_padding", "avg_pool_ceil_partial_rows",
                      "avg_pool_1x4", "avg_pool_4x1",
                      "max_pool_padded", "max_pool_padded_per_plane", "max_pool_windows",
                      "sum_hw", "tap_sum",
                      "tap_sum_depthwise"}
#: Kernels left as plain loops for LLVM's loop vectorizer (interleaved loads).
PLAIN_LOOPS = {"tap_sum"}


@pytest.mark.parametrize("case", CASES)
def test_scheduled_kernels_compute_the_same(case):
    funcs, naive, scheduled = naive_and_scheduled(*CASES[case])
    assert all(f.attrs[SCHEDULED_ATTR] for f in funcs)
    assert any(reduction_vectorized(f) for f in funcs) == (case not in PLAIN_LOOPS), \
        "the rules no longer vectorize the reduction"
    assert any(register_tiled(f) for f in funcs) == (case in TILED)
    assert all(writes_in_bounds(f) for f in funcs)
    np.testing.assert_allclose(scheduled, naive, rtol=1e-5, atol=1e-5)


#: Kernels without reduction whose indices divide (upsampling, reshapes, the filter's
#: broadcast to every tap) or stride; results must equal the naive loops' (up to the
#: rounding of a multiply-add that LLVM contracts into one FMA).
INJECTIVE = {
    "upsample_7x7": (upsample, (4, 32, 7, 7)),
    "upsample_4x4_cropped_add_relu_grad": (lambda low, g, y: relax.op.where(
        relax.op.less(y, relax.const(0.0)), relax.const(0.0),
        relax.op.add(g, relax.op.strided_slice(upsample(low, 4), [2, 3], [0, 0], [14, 14]))),
        (4, 32, 4, 4), (4, 32, 14, 14), (4, 32, 14, 14)),
    "taps_broadcast_update": (lambda gw, m: relax.op.add(
        relax.op.multiply(m, relax.const(0.9)), taps_broadcast(gw)), (64, 32), (64, 32, 3, 3)),
    "live_taps_flattened": (lambda w: relax.op.reshape(relax.op.strided_slice(
        w, [2, 3], [1, 1], [3, 3]), (64, 128, 1, 1)), (64, 32, 3, 3)),
    "batch_to_rows": (lambda x: relax.op.permute_dims(relax.op.reshape(
        relax.op.permute_dims(x, [1, 0, 2, 3]), (1, 32, 196)), [0, 2, 1]), (4, 32, 7, 7)),
    "bias_add_7x7": (lambda x, b: relax.op.add(x, b), (4, 32, 7, 7), (1, 32, 1, 1)),
}


@pytest.mark.parametrize("case", INJECTIVE)
def test_injective_kernels_compute_the_same(case):
    funcs, naive, scheduled = naive_and_scheduled(*INJECTIVE[case])
    assert all(writes_in_bounds(f) for f in funcs)
    np.testing.assert_allclose(scheduled, naive, rtol=1e-6, atol=1e-6)


def test_tuned_kernels_are_left_alone():
    mod = kernels(*CASES["conv3x3"][:1], *CASES["conv3x3"][1:])
    gvar, func = next((g, f) for g, f in mod.functions.items() if isinstance(f, tirx.PrimFunc))
    mod[gvar] = func.with_attr(SCHEDULED_ATTR, True)
    with HOST:
        tvm.ir.assert_structural_equal(DefaultCPUSchedule()(mod)[gvar], mod[gvar])


def test_pass_leaves_its_input_alone():
    """The pass returns a new module: the caller's (here the naive kernels that the numbers are
    checked against) keeps its kernels."""
    mod = kernels(*CASES["conv3x3"][:1], *CASES["conv3x3"][1:])
    naive = mod.clone()
    with HOST:
        scheduled = DefaultCPUSchedule()(mod)
    tvm.ir.assert_structural_equal(mod, naive)
    assert SCHEDULED_ATTR in only_kernel(scheduled).attrs


def test_train_step_equals_naive_loops(mcunet_onnx, tmp_path):
    """A whole filtered train step (all kernels default-scheduled) against TVM's naive loops."""
    import gftvm
    from gftvm.data import synthetic

    x, y = synthetic(4, image_size=32)
    results = []
    for default in (False, True):
        gftvm.compile(mcunet_onnx, trainable="all", batch_size=4, momentum=0.9, schedules=False,
                      default_schedule=default, filter=gftvm.GradientFilter(2, "last:2")
                      ).save(tmp_path / str(default))
        session = gftvm.runtime.load(tmp_path / str(default))
        losses = [session.step(x, y) for _ in range(2)]
        results.append((losses, session.parameters()))
    (naive_losses, naive), (losses, params) = results
    np.testing.assert_allclose(losses, naive_losses, rtol=1e-5)
    for name, value in naive.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
