"""Gradients for Relax ops that TVM ships without one, registered on import."""

from tvm import relax
from tvm.ir import Call
from tvm.relax.op.base import register_gradient


@register_gradient("relax.nn.pad")
def _pad_grad(orig_var: relax.Var, orig_call: Call, output_grad: relax.Var,
              ctx: relax.BlockBuilder) -> list[relax.Expr]:
    """Constant padding: the input gradient is the output gradient with the pad cropped off."""
    if orig_call.attrs.pad_mode != "constant":
        raise ValueError(f"no gradient for relax.nn.pad with pad_mode={orig_call.attrs.pad_mode}")
    shape = orig_call.args[0].ty.shape
    before = [int(w) for w in orig_call.attrs.pad_width[0::2]]
    axes = list(range(len(before)))
    ends = [b + dim for b, dim in zip(before, shape)]
    return [relax.op.strided_slice(output_grad, axes, before, ends)]


@register_gradient("relax.grad.no_grad")
def _no_grad_grad(orig_var: relax.Var, orig_call: Call, output_grad: relax.Var,
                  ctx: relax.BlockBuilder) -> list[relax.Expr]:
    """A ``no_grad`` gradient tells the Gradient pass to propagate nothing to the input."""
    return [relax.op.grad.no_grad(orig_call.args[0])]
