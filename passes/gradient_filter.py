"""GradientFilter: rewrite the backward of chosen conv layers into gradient filtering.

Gradient filtering (Yang, Li, Marculescu, CVPR'23) for ``y = conv2d(x, W; stride s, padding p,
groups g)`` with patch size R, input x of H×W, output gy of Ho×Wo:

- ḡ = gy averaged over R×R patches tiling it from the top-left corner; a partial patch at the
  bottom or right averages only its valid pixels. Shape (N, Co, ⌈Ho/R⌉, ⌈Wo/R⌉).
- grad_x: g̃x = Σ_co W̃[co, ci] · ḡ[co] at low resolution (within each group), where
  W̃ = Σ_taps W / s². (For a patch-constant gy the exact backward reaches each input pixel
  through k²/s² taps on average, hence 1/s².) g̃x is then upsampled by nearest neighbour:
  patch P covers the input block [P·R·s + o, (P+1)·R·s + o) with o = (k-1)//2 - p, and every
  input pixel takes the value of its block, pixels outside all blocks that of the nearest one.
- grad_w[co, ci, :, :] = Σ_{n,P,Q} ḡ · x̃, copied to every tap, with x̃ = (sum of x over the
  block of the patch) / s² (a block of R·s × R·s pixels holds R² taps' worth of samples).
  grad_b is exact (it is not part of the conv).

The rewrite, on calls named by :mod:`conv_backward`, for each layer in ``plan``::

    x_sum = avg_pool2d(fit(x), R·s) · R²          # emitted before the forward conv(x, W)
    ...
    gx = conv2d_grad_input(gy, W)        ->  g_pool = avg_pool2d(gy, R, ceil_mode)
                                             w_sum  = sum(W, taps)      # W if 1×1
                                             gx_low = conv2d_transpose(g_pool, w_sum, groups) / s²
                                             gx     = upsample(gx_low)  # nearest, by R·s
    gw = conv2d_grad_weight(x, gy, W)    ->  gw     = broadcast(g_pool · x_sum over N, P, Q)

x_sum is computed next to the forward conv, so the backward keeps only x_sum alive for the
layer, not x, unless another op's backward needs x: an unfiltered conv reading the same x
(ResNet's downsample shortcut), or an op whose backward reads its input (ReLU, Clip, MaxPool,
Mul, BatchNorm's scale) if x is that input. A conv's input is usually such an op's *output*.
Dilated convs are not filtered (the planner keeps their exact backward and warns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .conv_backward import backward_kind


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes and attributes of one filtered conv (NCHW/OIHW, undilated) and its patch R."""

    patch: int
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    strides: tuple[int, int]
    padding: tuple[int, int]
    groups: int

    @property
    def blocks(self) -> tuple[int, int]:
        return tuple(math.ceil(d / self.patch) for d in self.y_shape[2:])

    @property
    def offsets(self) -> tuple[int, int]:
        return tuple((k - 1) // 2 - p for k, p in zip(self.w_shape[2:], self.padding))

    def block_index(self, axis: int) -> np.ndarray:
        """For every input row (axis 0) or column (axis 1): the index of its block."""
        size, step = self.x_shape[2 + axis], self.patch * self.strides[axis]
        index = (np.arange(size) - self.offsets[axis]) // step
        return np.clip(index, 0, self.blocks[axis] - 1).astype("int64")


def _geometry(func: relax.Function, call: relax.Call, patch: int) -> ConvGeometry:
    attrs = func.attrs
    if any(int(d) != 1 for d in attrs["dilation"]):
        raise ValueError("GradientFilter does not filter dilated convs")
    shape = lambda ty: tuple(int(d) for d in ty.shape)
    x_type = func.params[0].ty if str(attrs["gftvm.conv_backward"]) == "weight" else func.ret_ty
    return ConvGeometry(patch, shape(x_type), shape(call.args[-1].ty), shape(call.args[-2].ty),
                        tuple(int(s) for s in attrs["strides"]),
                        (int(attrs["padding"][0]), int(attrs["padding"][1])),
                        int(attrs["groups"]))


# -- the filtered computation, emitted into any BlockBuilder ------------------------------------

def pooled_input(bb: relax.BlockBuilder, x: relax.Expr, layer: ConvGeometry) -> relax.Var:
    """x̃: x summed over each patch's input block and divided by s², i.e. pool(fit(x)) · R²."""
    (bh, bw), (oh, ow) = layer.blocks, layer.offsets
    (sh, sw), r = layer.strides, layer.patch
    height, width = layer.x_shape[2:]
    begin = [max(oh, 0), max(ow, 0)]
    end = [min(height, oh + bh * r * sh), min(width, ow + bw * r * sw)]
    if begin != [0, 0] or end != [height, width]:
        x = bb.emit(relax.op.strided_slice(x, [2, 3], begin, end), "gf_x_crop")
    before = [max(-oh, 0), max(-ow, 0)]
    after = [bh * r * sh - (end[0] - begin[0]) - before[0],
             bw * r * sw - (end[1] - begin[1]) - before[1]]
    if any(before + after):
        x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, before[0], after[0], before[1], after[1]]),
                    "gf_x_pad")
    pooled = bb.emit(relax.op.nn.avg_pool2d(x, (r * sh, r * sw), (r * sh, r * sw)), "gf_x_pool")
    return bb.emit(relax.op.multiply(pooled, relax.const(float(r * r), "float32")), "gf_x_sum")


def pooled_gradient(bb: relax.BlockBuilder, gy: relax.Expr, layer: ConvGeometry) -> relax.Var:
    """ḡ: gy averaged over R×R patches; partial patches average their valid pixels."""
    r = layer.patch
    return bb.emit(relax.op.nn.avg_pool2d(gy, (r, r), (r, r), ceil_mode=True,
                                          count_include_pad=False), "gf_g_pool")


def filtered_grad_input(bb: relax.BlockBuilder, g_pool: relax.Expr, weight: relax.Expr,
                        layer: ConvGeometry) -> relax.Expr:
    """Low-res product with the tap-summed kernel, then nearest upsample to x's shape. The
    1/s² scales the low-res product (an epilogue that fuses into it), not the kernel; a 1×1
    kernel is its own tap sum."""
    sh, sw = layer.strides
    w_sum = weight if layer.w_shape[2:] == (1, 1) else bb.emit(
        relax.op.sum(weight, [2, 3], keepdims=True), "gf_w_sum")
    low = relax.op.nn.conv2d_transpose(g_pool, w_sum, groups=layer.groups)
    if sh * sw != 1:
        low = relax.op.multiply(low, relax.const(1.0 / (sh * sw), "float32"))
    low = bb.emit(low, "gf_gx_low")
    return upsample(bb, low, layer)


def upsample(bb: relax.BlockBuilder, low: relax.Expr, layer: ConvGeometry) -> relax.Expr:
    """Every pixel of x takes the value of its block. Where the blocks start at the corner
    (offset 0: every 'same'-padded conv) as reshape, broadcast, reshape and crop, injective ops
    that FuseOps fuses into grad_x's consumer; otherwise as a gather (take) of each row's and
    column's block, which TVM cannot fuse (its index is data)."""
    n, channels = layer.x_shape[:2]
    (bh, bw), (height, width) = layer.blocks, layer.x_shape[2:]
    step_h, step_w = (layer.patch * s for s in layer.strides)
    if layer.offsets == (0, 0) and bh * step_h >= height and bw * step_w >= width:
        tiles = relax.op.broadcast_to(relax.op.reshape(low, (n, channels, bh, 1, bw, 1)),
                                      (n, channels, bh, step_h, bw, step_w))
        full = relax.op.reshape(tiles, (n, channels, bh * step_h, bw * step_w))
        if (bh * step_h, bw * step_w) == (height, width):
            return full
        return relax.op.strided_slice(full, [2, 3], [0, 0], [height, width])
    rows = bb.emit(relax.op.take(low, relax.const(layer.block_index(0)), 2, "clip"),
                   "gf_gx_rows")
    return relax.op.take(rows, relax.const(layer.block_index(1)), 3, "clip")


def filtered_grad_weight(bb: relax.BlockBuilder, g_pool: relax.Expr, x_sum: relax.Expr,
                         layer: ConvGeometry) -> relax.Expr:
    """Σ_{n,P,Q} ḡ · x̃ per group (one einsum over the tensors' own layouts, so neither is
    transposed into a matmul layout first), copied to every tap."""
    n, co = layer.y_shape[:2]
    ci_group, kh, kw = layer.w_shape[1:]
    g = layer.groups
    grouped = lambda t, c: relax.op.reshape(t, (n, g, c, *layer.blocks))
    product = bb.emit(relax.op.einsum((grouped(g_pool, co // g), grouped(x_sum, ci_group)),
                                      "ngopq,ngipq->goi"), "gf_gw_1x1")
    return relax.op.broadcast_to(relax.op.reshape(product, (co, ci_group, 1, 1)),
                                 (co, ci_group, kh, kw))


def _weight_name(call: relax.Call) -> str | None:
    weight = call.args[-1]
    return weight.name if isinstance(weight, relax.Var) else None


@mutator
class _Filter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan: dict[str, int]) -> None:
        super().__init__(mod)
        self.mod, self.plan = mod, plan
        self.layers: dict[str, ConvGeometry] = {}   # weight name -> geometry
        self.x_sums: dict[str, relax.Var] = {}
        self.g_pools: dict[tuple[str, relax.Var], relax.Var] = {}

    def collect(self, func: relax.Function) -> None:
        for block in func.body.blocks:
            for binding in block.bindings:
                name = _weight_name(binding.value) if backward_kind(
                    self.mod, binding.value) else None
                if name in self.plan:
                    callee = self.mod[binding.value.op]
                    self.layers[name] = _geometry(callee, binding.value, self.plan[name])

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.nn.conv2d")
                and isinstance(value.args[1], relax.Var) and value.args[1].name in self.layers):
            name = value.args[1].name
            self.x_sums[name] = pooled_input(self.builder_, self.visit_expr(value.args[0]),
                                             self.layers[name])
        kind = backward_kind(self.mod, value)
        name = _weight_name(value) if kind else None
        if name in self.layers:
            gy, weight = self.visit_expr(value.args[-2]), self.visit_expr(value.args[-1])
            layer = self.layers[name]
            if (name, gy) not in self.g_pools:
                self.g_pools[name, gy] = pooled_gradient(self.builder_, gy, layer)
            g_pool = self.g_pools[name, gy]
            result = (filtered_grad_input(self.builder_, g_pool, weight, layer) if kind == "input"
                      else filtered_grad_weight(self.builder_, g_pool, self.x_sums[name], layer))
            emit = (self.builder_.emit if isinstance(binding.var, relax.DataflowVar)
                    else self.builder_.emit_output)
            self.set_var_remap(binding.var, emit(result, binding.var.name))
            return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="GradientFilter")
class GradientFilter:
    """Apply gradient filtering to the conv layers of ``func_name`` named in ``plan``.

    Parameters
    ----------
    func_name : str
        The function holding forward and backward (e.g. the adjoint from ``Gradient``).
    plan : dict[str, int]
        Patch size R for each filtered layer, keyed by the name of its weight parameter.
    """

    def __init__(self, func_name: str, plan: dict[str, int]) -> None:
        self.func_name, self.plan = func_name, dict(plan)

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        func = mod[self.func_name]
        rewriter = _Filter(mod, self.plan)
        rewriter.collect(func)
        missing = set(self.plan) - set(rewriter.layers)
        if missing:
            raise ValueError(f"GradientFilter: no conv backward for weights {sorted(missing)} "
                             f"in {self.func_name}")
        rewritten = rewriter.visit_expr(func)
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        mod[self.func_name] = rewritten
        return mod
