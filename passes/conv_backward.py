"""Named conv backward: the form in which gftvm's graphs carry a conv2d gradient.

Importing this module registers a gradient for ``relax.nn.conv2d`` that emits the exact backward
as calls to two private Relax functions::

    gx = conv2d_grad_input(gy, w)        # attrs {"gftvm.conv_backward": "input", conv attrs}
    gw = conv2d_grad_weight(x, gy, w)    # attrs {"gftvm.conv_backward": "weight", conv attrs}

so a pass can find every conv backward by name, with its layer (the weight ``w``), instead of
guessing from op shapes. Calls that no pass rewrites are inlined before compilation
(``InlinePrivateFunctions``), which leaves exactly TVM's backward.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir import Call
from tvm.relax.op.base import register_gradient

ATTR = "gftvm.conv_backward"


def backward_kind(mod: tvm.IRModule, call: relax.Expr) -> str | None:
    """"input" or "weight" if ``call`` calls a named conv backward function, else None."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.GlobalVar)):
        return None
    func = mod[call.op]
    return str(func.attrs[ATTR]) if func.attrs and ATTR in func.attrs else None


def _grad_input(gy: relax.Expr, w: relax.Expr, attrs, x_shape: list[int]) -> relax.Expr:
    """conv2d_transpose with the output padding that restores x's shape. (TVM's own conv2d
    gradient leaves dilation out of that padding, so it rejects dilated convs.)"""
    gy_shape = [int(d) for d in gy.ty.shape]
    kernel = [int(d) for d in list(w.ty.shape)[2:]]
    strides, dilation = [int(s) for s in attrs.strides], [int(d) for d in attrs.dilation]
    pad = [int(p) for p in attrs.padding]
    out = [(gy_shape[2 + a] - 1) * strides[a] - pad[a] - pad[a + 2]
           + dilation[a] * (kernel[a] - 1) + 1 for a in (0, 1)]
    return relax.op.nn.conv2d_transpose(
        gy, w, strides, pad, [x_shape[2] - out[0], x_shape[3] - out[1]], dilation,
        attrs.groups, kernel_layout="IOHW")


def _grad_weight(x: relax.Expr, gy: relax.Expr, w: relax.Expr, attrs) -> relax.Expr:
    """A conv of x with gy over the batch (TVM's formulation: CNHW data, strides and
    dilation swapped), cropped to the kernel size."""
    n, ci, h, wd = (int(d) for d in x.ty.shape)
    co, ci_group, kh, kw = (int(d) for d in w.ty.shape)
    g = int(attrs.groups)
    if g != 1:  # put the groups next to the channels: (g·N, C/g, H, W)
        x = relax.op.reshape(relax.op.permute_dims(relax.op.reshape(
            x, (n, g, ci_group, h, wd)), [1, 0, 2, 3, 4]), (g * n, ci_group, h, wd))
    grad = relax.op.nn.conv2d(x, gy, strides=attrs.dilation, padding=attrs.padding,
                              dilation=attrs.strides, groups=g, data_layout="CNHW",
                              kernel_layout="IOHW", out_layout="CNHW")
    return relax.op.strided_slice(grad, [2, 3], [0, 0], [kh, kw])


def backward_function(kind: str, conv: relax.Call, out_type: relax.TensorType
                      ) -> relax.Function:
    """The private function computing the exact ``kind`` gradient of ``conv``."""
    x = relax.Var("x", conv.args[0].ty)
    w = relax.Var("w", conv.args[1].ty)
    gy = relax.Var("gy", out_type)
    attrs = conv.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        raise ValueError(f"conv2d backward supports NCHW/OIHW only, got {attrs.data_layout}/"
                         f"{attrs.kernel_layout}")
    func_attrs = {ATTR: kind, "strides": attrs.strides, "padding": attrs.padding,
                  "dilation": attrs.dilation, "groups": attrs.groups}
    name = f"conv2d_grad_{kind}"
    bb = relax.BlockBuilder()
    with bb.function(name, [gy, w] if kind == "input" else [x, gy, w], attrs=func_attrs,
                     private=True):
        with bb.dataflow():
            grad = (_grad_input(gy, w, attrs, [int(d) for d in x.ty.shape]) if kind == "input"
                    else _grad_weight(x, gy, w, attrs))
            out = bb.emit_output(grad)
        bb.emit_func_output(out)
    return bb.get()[name]


@register_gradient("relax.nn.conv2d", level=20)
def _named_conv2d_grad(orig_var: relax.Var, orig_call: Call, output_grad: relax.Var,
                       ctx: relax.BlockBuilder) -> list[relax.Expr]:
    x, w = orig_call.args
    grad_input = ctx.add_func(backward_function("input", orig_call, orig_var.ty),
                              "conv2d_grad_input")
    grad_weight = ctx.add_func(backward_function("weight", orig_call, orig_var.ty),
                               "conv2d_grad_weight")
    return [relax.Call(grad_input, [output_grad, w]),
            relax.Call(grad_weight, [x, output_grad, w])]
