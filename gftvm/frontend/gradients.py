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


@register_gradient("relax.repeat")
def _repeat_grad(orig_var: relax.Var, orig_call: Call, output_grad: relax.Var,
                 ctx: relax.BlockBuilder) -> list[relax.Expr]:
    """Each input element was copied ``repeats`` times along ``axis``: sum the copies."""
    if orig_call.attrs.axis is None:
        raise ValueError("no gradient for relax.repeat without an axis")
    shape = [int(d) for d in orig_call.args[0].ty.shape]
    axis = int(orig_call.attrs.axis) % len(shape)
    split = shape[:axis + 1] + [int(orig_call.attrs.repeats)] + shape[axis + 1:]
    return [relax.op.sum(relax.op.reshape(output_grad, split), axis=axis + 1)]


@register_gradient("relax.grad.no_grad")
def _no_grad_grad(orig_var: relax.Var, orig_call: Call, output_grad: relax.Var,
                  ctx: relax.BlockBuilder) -> list[relax.Expr]:
    """A ``no_grad`` gradient tells the Gradient pass to propagate nothing to the input."""
    return [relax.op.grad.no_grad(orig_call.args[0])]
