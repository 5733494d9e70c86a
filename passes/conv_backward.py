"""Named conv backward: the form in which gftvm's graphs carry a conv2d gradient.

Importing this module registers a gradient for ``relax.nn.conv2d`` that emits the exact backward
(TVM's own ``conv2d_grad``) as calls to two private Relax functions::

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
from tvm.relax.op import _op_gradient
from tvm.relax.op.base import register_gradient

ATTR = "gftvm.conv_backward"


def backward_kind(mod: tvm.IRModule, call: relax.Expr) -> str | None:
    """"input" or "weight" if ``call`` calls a named conv backward function, else None."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.GlobalVar)):
        return None
    func = mod[call.op]
    return str(func.attrs[ATTR]) if func.attrs and ATTR in func.attrs else None


def backward_function(kind: str, conv: relax.Call, out_type: relax.TensorType
                      ) -> relax.Function:
    """The private function computing the exact ``kind`` gradient of ``conv``."""
    x = relax.Var("x", conv.args[0].ty)
    w = relax.Var("w", conv.args[1].ty)
    gy = relax.Var("gy", out_type)
    attrs = conv.attrs
    func_attrs = {ATTR: kind, "strides": attrs.strides, "padding": attrs.padding,
                  "dilation": attrs.dilation, "groups": attrs.groups}
    name = f"conv2d_grad_{kind}"
    bb = relax.BlockBuilder()
    with bb.function(name, [gy, w] if kind == "input" else [x, gy, w], attrs=func_attrs,
                     private=True):
        with bb.dataflow():
            grads = _op_gradient.conv2d_grad(relax.Var("y", out_type),
                                             relax.Call(conv.op, [x, w], attrs), gy, bb)
            out = bb.emit_output(grads[0] if kind == "input" else grads[1])
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
