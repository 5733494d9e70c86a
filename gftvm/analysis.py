"""What a differentiated Relax function keeps alive from its forward for its backward."""

from __future__ import annotations

import math

import tvm
from tvm import relax


def _bytes(var: relax.Var) -> int:
    ty = var.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return 0
    return math.prod(int(d) for d in ty.shape) * tvm.DataType(str(ty.dtype)).bits // 8


def saved_for_backward(adjoint: relax.Function) -> dict[relax.Var, int]:
    """Tensors (with their bytes) computed in the forward of an adjoint function from
    ``relax.transform.Gradient`` and read by its backward: bound at or before the loss binding,
    used after it. Parameters and the input are not counted: they live regardless."""
    loss = adjoint.body.body.fields[0]
    bindings = [b for block in adjoint.body.blocks for b in block.bindings]
    end = next(i for i, b in enumerate(bindings) if b.var.same_as(loss))
    forward = {b.var for b in bindings[:end + 1]}
    used_later = {v for b in bindings[end + 1:] for v in relax.analysis.free_vars(b.value)}
    return {var: _bytes(var) for var in forward & used_later}


def conv_calls(func: relax.Function) -> dict[str, relax.Call]:
    """The forward conv2d calls of ``func``, keyed by the name of their weight parameter."""
    conv2d = tvm.ir.Op.get("relax.nn.conv2d")
    return {b.value.args[1].name: b.value
            for block in func.body.blocks for b in block.bindings
            if isinstance(b.value, relax.Call) and b.value.op == conv2d
            and isinstance(b.value.args[1], relax.Var)}


def planned_storage_bytes(mod: tvm.IRModule, func_name: str = "train_step") -> int:
    """Bytes of storage Relax's static memory planner reserves for ``func_name`` (tensors whose
    lifetimes do not overlap share storage), lowered as ``tvm.compile`` lowers it."""
    lowered = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(), relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(), relax.transform.StaticPlanBlockMemory()])(mod)
    alloc_storage = tvm.ir.Op.get("relax.memory.alloc_storage")
    sizes = []

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and expr.op == alloc_storage:
            sizes.append(int(expr.args[0].values[0]))

    relax.analysis.post_order_visit(lowered[func_name], visit)
    return sum(sizes)
