"""DeadTaps: drop the kernel taps of a conv that only ever multiply padding zeros.

Along one spatial axis of ``conv2d(x, W; stride s, padding (p0, p1), dilation d)`` with a
kernel of K taps, input length H and output length Ho, tap k reads x[o·s − p0 + k·d] for
o in [0, Ho). It is *live* if one of these indices lies in [0, H). Let [a, b] be the smallest
tap range holding every live tap. When it is shorter than K, on each such axis::

    y = conv2d(x, W, padding=(p0, p1))  ->  W_live = strided_slice(W, taps [a, b + 1))
                                            y = conv2d(x, W_live, padding=(p0 − a·d, p1'))

with p1' the padding that keeps the output length Ho. Every product dropped is a weight times
a padding zero, so y is unchanged up to the order of its float sums. ``conv2d_transpose`` (BP's
grad_x) is the same with the roles of input and output swapped: tap k writes output
o·s − p0 + k·d for input o, and is live if one of these lies in the output; the slice keeps
output length through p1' and ``output_padding``.

When the live window of a pruned conv2d covers its whole unpadded input and gives one output
pixel (layer4.0.conv1: stride 2, 2x2 -> 1x1), it is a 1x1 conv of the input flattened into
channels (and a conv2d_transpose with one input pixel likewise, its output unflattened)::

    y = conv2d(reshape(x, (N, C·kh·kw, 1, 1)), reshape(W_live, (O, C·kh·kw, 1, 1)))

the form TVM's default schedules handle well (the strided small-kernel form ran 20x slower).

Any layout, stride, dilation and group count is handled; an axis is left whole when the new
paddings would be negative or outside what TOPI's conv2d_transpose accepts (padding at most
(K'−1)·d, output padding below the stride), and a conv with a symbolic shape is left alone.
A weight sliced twice the same way in one block (forward conv and its grad_x) is sliced once.
Run it on finished train steps: the gradient filter's tap sum and BP's weight gradient still
see the whole weight, only the products that read padding shrink.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
CONV2D_TRANSPOSE = tvm.ir.Op.get("relax.nn.conv2d_transpose")


@dataclass(frozen=True)
class AxisPrune:
    """The taps [begin, end) kept on one spatial axis, and the paddings that go with them."""

    begin: int
    end: int
    padding: tuple[int, int]
    output_padding: int = 0


def live_taps(kernel: int, positions: int, extent: int, stride: int, pad_before: int,
              dilation: int) -> list[int]:
    """The taps k for which o·stride − pad_before + k·dilation lies in [0, extent) for some
    o in [0, positions)."""
    return [k for k in range(kernel)
            if any(0 <= o * stride - pad_before + k * dilation < extent
                   for o in range(positions))]


def _live_range(kernel: int, positions: int, extent: int, stride: int, pad_before: int,
                dilation: int) -> tuple[int, int] | None:
    """[begin, end) of the live taps (:func:`live_taps`), or None when there is nothing to
    prune (every tap live, or none)."""
    live = live_taps(kernel, positions, extent, stride, pad_before, dilation)
    if not live or (live[0], live[-1]) == (0, kernel - 1):
        return None
    return live[0], live[-1] + 1


def prune_conv_axis(kernel: int, size_in: int, size_out: int, stride: int,
                    padding: tuple[int, int], dilation: int) -> AxisPrune | None:
    """The pruned axis of a conv2d, or None if every tap is kept."""
    taps = _live_range(kernel, size_out, size_in, stride, padding[0], dilation)
    if taps is None:
        return None
    begin, end = taps
    before = padding[0] - begin * dilation
    reach = (size_out - 1) * stride - before + (end - begin - 1) * dilation - (size_in - 1)
    after = max(reach, 0)
    length = (size_in + before + after - (end - begin - 1) * dilation - 1) // stride + 1
    if before < 0 or length != size_out:
        return None
    return AxisPrune(begin, end, (before, after))


def prune_transpose_axis(kernel: int, size_in: int, size_out: int, stride: int,
                         padding: tuple[int, int], dilation: int) -> AxisPrune | None:
    """The pruned axis of a conv2d_transpose, or None if every tap is kept."""
    taps = _live_range(kernel, size_in, size_out, stride, padding[0], dilation)
    if taps is None:
        return None
    begin, end = taps
    span = (end - begin - 1) * dilation
    before = padding[0] - begin * dilation
    excess = (size_in - 1) * stride - before + span + 1 - size_out
    after, output_padding = max(excess, 0), max(-excess, 0)
    if not (0 <= before <= span and after <= span and output_padding < stride):
        return None
    return AxisPrune(begin, end, (before, after), output_padding)


def _static_shape(expr: relax.Expr) -> list[int] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    if not all(isinstance(d, tvm.tirx.IntImm) for d in ty.shape):
        return None
    return [int(d) for d in ty.shape]


def plan_call(call: relax.Call) -> list[AxisPrune | None] | None:
    """For a conv2d or conv2d_transpose with static shapes: the prune of its H and W axes
    (None for an axis kept whole), or None if the call is not one or keeps every tap."""
    if call.op not in (CONV2D, CONV2D_TRANSPOSE):
        return None
    shapes = [_static_shape(call.args[0]), _static_shape(call.args[1]), _static_shape(call)]
    if any(shape is None for shape in shapes):
        return None
    data, weight, out = shapes
    attrs = call.attrs
    prune = prune_conv_axis if call.op == CONV2D else prune_transpose_axis
    axes = []
    for axis, name in enumerate("HW"):
        axes.append(prune(weight[attrs.kernel_layout.index(name)],
                          data[attrs.data_layout.index(name)],
                          out[(attrs.out_layout or attrs.data_layout).index(name)],
                          int(attrs.strides[axis]),
                          (int(attrs.padding[axis]), int(attrs.padding[axis + 2])),
                          int(attrs.dilation[axis])))
    return axes if any(axes) else None


def pruned_call(call: relax.Call, data: relax.Expr, weight: relax.Expr,
                axes: list[AxisPrune | None]) -> relax.Call:
    """``call`` on ``data`` and the sliced ``weight``, with the paddings of ``axes``."""
    attrs = call.attrs
    padding = [int(p) for p in attrs.padding]
    output_padding = [int(p) for p in getattr(attrs, "output_padding", (0, 0))]
    for axis, prune in enumerate(axes):
        if prune is not None:
            padding[axis], padding[axis + 2] = prune.padding
            output_padding[axis] = prune.output_padding
    common = dict(strides=attrs.strides, padding=padding, dilation=attrs.dilation,
                  groups=attrs.groups, data_layout=attrs.data_layout,
                  kernel_layout=attrs.kernel_layout, out_layout=attrs.out_layout,
                  out_dtype=attrs.out_dtype)
    if call.op == CONV2D:
        return relax.op.nn.conv2d(data, weight, **common)
    return relax.op.nn.conv2d_transpose(data, weight, output_padding=output_padding,
                                        **common)


def as_one_by_one(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr | None:
    """A pruned conv whose one window covers all of its unpadded input (conv2d with one output
    pixel; conv2d_transpose: output, with one input pixel) as a 1x1 conv of that map flattened
    into channels, or None. (layer4.0.conv1 of ResNet-18 at 32x32, 2x2 -> 1x1 by stride 2,
    becomes a 1x1 conv with 4·256 input channels, which TVM schedules as well as any other
    conv on 1x1 maps.)"""
    attrs = call.attrs
    transpose = call.op == CONV2D_TRANSPOSE
    data, weight, out = (_static_shape(bb.normalize(e)) for e in (*call.args, call))
    pixel, window = (data, out) if transpose else (out, data)
    if (int(attrs.groups) != 1 or any(int(p) for p in attrs.padding)
            or (attrs.data_layout, attrs.out_layout) != ("NCHW", "NCHW")
            or attrs.kernel_layout != ("IOHW" if transpose else "OIHW")
            or any(int(p) for p in getattr(attrs, "output_padding", ()))
            or pixel[2:] != [1, 1] or window[2:] != weight[2:] or weight[2:] == [1, 1]):
        return None
    taps = weight[2] * weight[3]
    flat_weight = bb.emit(relax.op.reshape(call.args[1], (weight[0], weight[1] * taps, 1, 1)),
                          "live_taps_flat")
    if not transpose:
        flat = bb.emit(relax.op.reshape(call.args[0], (data[0], data[1] * taps, 1, 1)),
                       "window_flat")
        return relax.op.nn.conv2d(flat, flat_weight, out_dtype=attrs.out_dtype)
    flat = bb.emit(relax.op.nn.conv2d_transpose(call.args[0], flat_weight, kernel_layout="IOHW",
                                                out_dtype=attrs.out_dtype), "window_flat")
    return relax.op.reshape(flat, out)


def weight_slice(call: relax.Call, axes: list[AxisPrune | None]
                 ) -> tuple[list[int], list[int], list[int]]:
    """(axes, begin, end) of the strided_slice of ``call``'s weight."""
    layout = call.attrs.kernel_layout
    pruned = [(layout.index(name), prune) for name, prune in zip("HW", axes) if prune]
    return ([axis for axis, _ in pruned], [p.begin for _, p in pruned],
            [p.end for _, p in pruned])


@mutator
class _Pruner(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.slices: dict[tuple, relax.Var] = {}

    def visit_binding_block_(self, block: relax.BindingBlock) -> relax.BindingBlock:
        self.slices = {}
        return super().visit_binding_block_(block)

    def visit_dataflow_block_(self, block: relax.DataflowBlock) -> relax.BindingBlock:
        self.slices = {}
        return super().visit_dataflow_block_(block)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        axes = plan_call(value) if isinstance(value, relax.Call) else None
        if axes is None:
            super().visit_var_binding_(binding)
            return
        weight = self.visit_expr(value.args[1])
        taps = weight_slice(value, axes)
        key = (weight, *map(tuple, taps))
        if key not in self.slices:
            self.slices[key] = self.builder_.emit(relax.op.strided_slice(weight, *taps),
                                                  "live_taps")
        call = pruned_call(value, self.visit_expr(value.args[0]), self.slices[key], axes)
        dense = as_one_by_one(self.builder_, call)
        call = call if dense is None else dense
        emit = (self.builder_.emit if isinstance(binding.var, relax.DataflowVar)
                else self.builder_.emit_output)
        self.set_var_remap(binding.var, emit(call, binding.var.name))


@tvm.transform.module_pass(opt_level=0, name="DeadTaps")
class DeadTaps:
    """Slice every conv2d / conv2d_transpose of the module's Relax functions to the kernel
    taps that read (or write) at least one element that is not padding."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        pruner = _Pruner(mod)
        functions = {gv: pruner.visit_expr(func) if isinstance(func, relax.Function) else func
                     for gv, func in mod.functions.items()}
        return tvm.IRModule(functions, attrs=mod.attrs)
