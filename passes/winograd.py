"""Winograd: 3x3 stride-1 convolutions as Winograd F(4x4, 3x3) products, on the CPU.

A 4x4 output tile of a 3x3 conv is ``A^T [(G w G^T) * (B^T d B)] A`` for the tile's 6x6 input
window ``d`` (Lavin & Gray, 2016; interpolation points 0, +-1, +-2): 36 element-wise products
per channel pair instead of 144 multiply-adds, so over the channels 36 matrix products
``m[p] = u[p] v[p]`` (``u[p]``: K x C, ``v[p]``: C x tiles) replace the direct conv's work,
a quarter of its multiply-adds. The rewrite, for NCHW/OIHW float32 convs with stride 1,
dilation 1, one group and padding 1 on every side (``th``, ``tw``: tiles down and across)::

    y = R.nn.conv2d(x, w)
->
    d = permute_dims(reshape(pad(x), (N, C, 4 th + 2, tw + 1, 4)), [0, 1, 2, 4, 3])
    u = call_tir(winograd_weight, (w,))                 # G w G^T: (36, K, C)
    y = call_tir(winograd_conv, (d, u))                 # (N, K, 4 th, 4 tw)
    y = strided_slice(y, [2, 3], [0, 0], [H, W])        # where H or W is not a multiple of 4

``d`` holds the padded input with each row's columns de-interleaved by 4 (``d[..., j, tx]`` is
column ``4 tx + j``), so a tile's window is read with vectors over ``tx``; FuseOps fuses that
relayout with the producer of ``x`` (the previous layer's BatchNorm and ReLU). ``winograd_conv``
runs through blocks of whole tile rows in parallel and keeps a block in cache: the input
transform of every channel, the 36 products (a register tile of ``KT`` output channels x one
or two vectors of tiles), the output transform, written row by row in NCHW. The kernels are
written already scheduled (``tirx.is_scheduled``), as loops; ``d`` and ``y`` are Relax
tensors, so memory planning and fusion work across them as for any kernel.

Float32 results differ from the direct conv's by rounding only, larger than the direct conv's
own (the transforms scale by up to 8): 1e-5 of the output's largest magnitude on ResNet-18's
layers. ``gftvm.compile(..., winograd=False)`` keeps direct convs.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import tvm
from tvm import relax
from tvm.script import tirx as T

from .default_schedule import target_cores, vector_lanes

#: F(4x4, 3x3)'s transforms: input B^T (6x6), kernel G (6x3), output A^T (4x6).
B_T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
G = [[Fraction(1, 4), 0, 0],
     [Fraction(-1, 6), Fraction(-1, 6), Fraction(-1, 6)],
     [Fraction(-1, 6), Fraction(1, 6), Fraction(-1, 6)],
     [Fraction(1, 24), Fraction(1, 12), Fraction(1, 6)],
     [Fraction(1, 24), Fraction(-1, 12), Fraction(1, 6)],
     [0, 0, 1]]
A_T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]

#: Output channels of the products' register tile (broadcast scalars of ``u``).
KT = 8
#: Bytes of one block's transformed input and products, kept in a core's L2 (Sapphire Rapids:
#: 2 MiB; ResNet-18's 128-channel convs on 16x16 maps take 0.87x the time of 1 MiB blocks).
BLOCK_BYTES = 1 << 21
#: The fewest direct-conv multiply-adds per weight element (N x H x W) for which the rewrite
#: pays: the weight transform writes 4x the weight every step, and small maps give few tiles
#: per block (session 10's machine: 8x128x16x16, 2048 per element, 1.58x faster; 8x256x8x8,
#: 512, 0.40x; 8x64x8x8, 512, 0.69x).
MIN_MACS_PER_WEIGHT = 2048
#: The least ``C K / (C + K) * tw`` for which the rewrite pays: the products' work per tile
#: against the transforms' (C input and K output channels per tile), which run vectorized
#: across the ``tw`` tiles of a tile row, so on narrow maps they leave most lanes idle.
#: Session 22, znver5 (AVX-512), one conv with K = C, direct vs Winograd (default schedules):
#: every shape below 256 was slower (32x64x8x8, 64: 0.47x; 8x64x16x16, 128: 0.79x;
#: 32x128x8x8, 128: 0.79x; 32x64x16x16, 128: 0.88x), every one at 256 or more with
#: MIN_MACS_PER_WEIGHT faster (32x256x8x8, 256: 1.05x; 8x128x16x16, 256: 1.29x; 8x64x32x32,
#: 256: 1.38x; 32x256x16x16, 512: 2.25x; docs/benchmarks.md has all 16 shapes).
MIN_PRODUCTS_PER_TRANSFORM = 256


def _sum(coefficients, terms: list[str]) -> str:
    """TVMScript for sum(c * t), written out with only the nonzero coefficients."""
    parts = []
    for c, term in zip(coefficients, terms):
        c = Fraction(c)
        if c:
            magnitude = "" if abs(c) == 1 else f"T.float32({float(abs(c))!r}) * "
            parts.append(("- " if c < 0 else "+ ") + magnitude + term)
    text = " ".join(parts)
    return text[2:] if text.startswith("+ ") else "T.float32(0) " + text


def _transform(matrix, result, source, lanes: int) -> list[str]:
    """Statements for ``result = M X M^T`` of a vector of ``lanes`` tiles, ``M``: ``matrix``
    (r x s), ``X`` (s x s) read as ``source(i, j)``, in two passes through a local buffer (one
    first-pass sum serves a row of results); ``result(a, b)`` names the element to write."""
    rows, inner = len(matrix), len(matrix[0])
    lines = [f"h = T.decl_buffer(({rows * inner}, {lanes}), 'float32', scope='local')",
             f"for l in T.vectorized({lanes}):"]
    first = lambda a, j: _sum(matrix[a], [source(i, j) for i in range(inner)])
    second = lambda a, b: _sum(matrix[b], [f"h[{a * inner + j}, l]" for j in range(inner)])
    lines += [f"    h[{a * inner + j}, l] = {first(a, j)}" for a in range(rows) for j in range(inner)]
    lines.append(f"for l in T.vectorized({lanes}):")
    lines += [f"    {result(a, b)} = {second(a, b)}" for a in range(rows) for b in range(rows)]
    return lines


def _indent(lines: list[str], depth: int) -> list[str]:
    return [" " * depth + line for line in lines]


def weight_kernel(k: int, c: int, lanes: int) -> str:
    """``u[p, k, c] = (G w[k, c] G^T)[p]``, vectors over C (gathered from a row of ``w``) of
    at most ``lanes``: LLVM takes minutes over 128-wide vectors."""
    vl = math.gcd(c, lanes)
    body = _transform(G, lambda a, b: f"u[{a * 6 + b}, ko, cb * {vl} + l]",
                      lambda i, j: f"w[ko, cb * {vl} + l, {i}, {j}]", vl)
    return "\n".join([
        "@T.prim_func(private=True, s_tir=True)",
        f"def winograd_weight(w: T.Buffer(({k}, {c}, 3, 3), 'float32'), "
        f"u: T.Buffer((36, {k}, {c}), 'float32')):",
        "    T.func_attr({'tirx.is_scheduled': True, 'tirx.noalias': True})",
        "    with T.sblock('root'):",
        f"        for ko in T.parallel({k}):",
        f"            for cb in range({c // vl}):",
        *_indent(body, 16)])


def conv_kernel(n: int, c: int, k: int, th: int, tw: int, rows: int, tv: int) -> str:
    """The products and transforms of blocks of ``rows`` tile rows (``rows * tw`` tiles,
    padded to a multiple of the ``tv`` tiles of the register tile; the padding stays zero)."""
    tiles = -(-rows * tw // tv) * tv
    n_of, ty_of = f"(b * {rows} + r) // {th}", f"(b * {rows} + r) % {th}"
    into_v = _transform(B_T, lambda a, j: f"v[{a * 6 + j}, ci, r * {tw} + l]",
                        lambda i, j: f"d[{n_of}, ci, {ty_of} * 4 + {i}, {j % 4}, l + {j // 4}]",
                        tw)
    into_o = _transform(A_T, lambda a, j: f"o[{a * 4 + j}, l]",
                        lambda i, j: f"m[{i * 6 + j}, ko, r * {tw} + l]", tw)
    kt = math.gcd(k, KT)
    return "\n".join([
        "@T.prim_func(private=True, s_tir=True)",
        f"def winograd_conv(d: T.Buffer(({n}, {c}, {4 * th + 2}, 4, {tw + 1}), 'float32'), "
        f"u: T.Buffer((36, {k}, {c}), 'float32'), "
        f"y: T.Buffer(({n}, {k}, {4 * th}, {4 * tw}), 'float32')):",
        "    T.func_attr({'tirx.is_scheduled': True, 'tirx.noalias': True})",
        "    with T.sblock('root'):",
        f"        for b in T.parallel({n * th // rows}):",
        f"            v = T.decl_buffer((36, {c}, {tiles}), 'float32')",
        f"            m = T.decl_buffer((36, {k}, {tiles}), 'float32')",
        f"            for p, ci, t in T.grid(36, {c}, {tiles - rows * tw}):",
        f"                v[p, ci, {rows * tw} + t] = T.float32(0)",
        f"            for ci, r in T.grid({c}, {rows}):",
        *_indent(into_v, 16),
        f"            for p, ko, to in T.grid(36, {k // kt}, {tiles // tv}):",
        f"                acc = T.decl_buffer(({kt}, {tv}), 'float32', scope='local')",
        f"                for ki in T.unroll({kt}):",
        f"                    for l in T.vectorized({tv}):",
        "                        acc[ki, l] = T.float32(0)",
        f"                for ci in range({c}):",
        f"                    for ki in T.unroll({kt}):",
        f"                        for l in T.vectorized({tv}):",
        f"                            acc[ki, l] = acc[ki, l] + u[p, ko * {kt} + ki, ci] "
        f"* v[p, ci, to * {tv} + l]",
        f"                for ki in T.unroll({kt}):",
        f"                    for l in T.vectorized({tv}):",
        f"                        m[p, ko * {kt} + ki, to * {tv} + l] = acc[ki, l]",
        f"            for ko, r in T.grid({k}, {rows}):",
        f"                o = T.decl_buffer((16, {tw}), 'float32', scope='local')",
        *_indent(into_o, 16),
        "                for a in range(4):",
        f"                    for e in T.vectorized({4 * tw}):",
        f"                        y[{n_of}, ko, {ty_of} * 4 + a, e] = o[a * 4 + e % 4, e // 4]"])


@functools.lru_cache(maxsize=None)
def _parse(text: str) -> tvm.tirx.PrimFunc:
    """Parsed once per kernel text: ResNet-18's convs repeat shapes, and a parse takes ~1 s."""
    return tvm.script.from_source(text, extra_vars={"T": T})


def block_plan(n: int, c: int, k: int, th: int, tw: int, lanes: int, cores: int
               ) -> tuple[int, int]:
    """Tile rows per block and the register tile's tiles (one or two vectors). The rows: the
    most whose transformed input and products (36 values per tile and channel, in and out)
    fit ``BLOCK_BYTES``, of those that leave every core a block; they divide ``n * th``."""
    fits = [r for r in range(1, n * th + 1) if n * th % r == 0
            and 36 * (c + k) * r * tw * 4 <= BLOCK_BYTES]
    rows = max([r for r in fits if n * th // r >= cores] or fits or [1])
    return rows, 2 * lanes if rows * tw >= 2 * lanes else lanes


def eligible(call: relax.Call) -> bool:
    """Whether the rewrite applies to ``call`` and pays (see ``MIN_MACS_PER_WEIGHT`` and
    ``MIN_PRODUCTS_PER_TRANSFORM``)."""
    if not (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.nn.conv2d")):
        return False
    a = call.attrs
    x, w = call.args[0].ty, call.args[1].ty
    if not all(isinstance(t, relax.TensorType) and t.dtype == "float32" and t.shape is not None
               and all(isinstance(d, tvm.tirx.IntImm) for d in t.shape) for t in (x, w)):
        return False
    n, c, h, wd = (int(d) for d in x.shape)
    k = int(w.shape[0])
    return ([int(v) for v in list(w.shape)[2:]] == [3, 3] and [int(v) for v in a.strides] == [1, 1]
            and [int(v) for v in a.dilation] == [1, 1] and [int(v) for v in a.padding] == [1] * 4
            and int(a.groups) == 1 and (a.data_layout, a.kernel_layout, a.out_layout)
            == ("NCHW", "OIHW", "NCHW") and str(a.out_dtype or "float32") == "float32"
            and n * h * wd >= MIN_MACS_PER_WEIGHT
            and c * k * -(-wd // 4) >= MIN_PRODUCTS_PER_TRANSFORM * (c + k))


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, lanes: int, cores: int):
        super().__init__(mod)
        self.lanes, self.cores = lanes, cores

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        return self.winograd(call) if eligible(call) else call

    def winograd(self, call: relax.Call) -> relax.Expr:
        x, w = call.args
        n, c, h, wd = (int(d) for d in x.ty.shape)
        k = int(w.ty.shape[0])
        th, tw = -(-h // 4), -(-wd // 4)
        rows, tv = block_plan(n, c, k, th, tw, self.lanes, self.cores)
        bb = self.builder_
        padded = relax.op.nn.pad(x, [0, 0, 0, 0, 1, 4 * th + 1 - h, 1, 4 * tw + 3 - wd])
        d = bb.emit(relax.op.permute_dims(relax.op.reshape(padded, (n, c, 4 * th + 2, tw + 1, 4)),
                                          [0, 1, 2, 4, 3]))
        weight = bb.add_func(_parse(weight_kernel(k, c, self.lanes)), "winograd_weight")
        u = bb.emit(relax.call_tir(weight, [w], relax.TensorType((36, k, c), "float32")))
        conv = bb.add_func(_parse(conv_kernel(n, c, k, th, tw, rows, tv)), "winograd_conv")
        y = relax.call_tir(conv, [d, u], relax.TensorType((n, k, 4 * th, 4 * tw), "float32"))
        if (4 * th, 4 * tw) != (h, wd):
            y = relax.op.strided_slice(bb.emit(y), [2, 3], [0, 0], [h, wd])
        return y


@tvm.transform.module_pass(opt_level=0, name="Winograd")
class Winograd:
    """Rewrite the eligible conv2d calls of every Relax function for the current target's
    vectors and cores."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = tvm.target.Target.current()
        rewriter = _Rewriter(mod, vector_lanes(target), target_cores(target))
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.get()
