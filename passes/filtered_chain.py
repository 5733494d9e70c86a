"""FoldFilteredChain: take the reductions of a filtered backward to low resolution.

After :mod:`gradient_filter`, a filtered conv's gy is only read by the patch pool
``avg_pool2d(gy)``, and a filtered conv's grad_x is a nearest upsample ``up(a) =
take(take(a, rows, 2), cols, 3)`` of a low-resolution tensor ``a``. Between them lie, in the
nets we train, BatchNorm's backward: per-channel scales of the gradient, and per-channel sums
for its bias and scale gradients. Three rewrites, all exact in real arithmetic::

    avg_pool2d(x * c)               ->  avg_pool2d(x) * c       c constant over H and W
    avg_pool2d(x / c)               ->  avg_pool2d(x) / c       (a per-channel factor)
    avg_pool2d(up(a))               ->  take(take(a, rows'), cols')    rows'[P] = rows[P·stride]
                                        (or just ``a`` when rows', cols' are the identity)
    collapse_sum_to(up(a), (., ., 1, 1))  ->  collapse_sum_to(a * count, (., ., 1, 1))

The first two hold for every average pool (the average of c·x over a window is c times the
average of x). The third needs every pool window (clipped to the map) to lie inside one block
of the upsample: the pooled patches of the earlier filtered conv must align with the blocks of
the later one (same grid, patch R₁·s₁ a multiple of R₂, no offset). Where they do not, that
pool is left as it is. ``count[P, Q]`` is the number of pixels of block (P, Q).

So where two filtered convs meet through BatchNorm only (MobileNetV2's linear projection conv
followed by the next filtered conv), the full-resolution grad_x of the later conv and the
scaled gradient are no longer needed; what still reads ``up(a)`` (BatchNorm's scale gradient,
``sum(up(a) * x̂)``) fuses the upsample into its reduction. Where an activation's mask lies
between (ReLU, ReLU6: ``where(mask, 0, up(a))``, varying inside a patch), nothing but the
first rewrite applies. No rewrite reads or writes more than the code it replaces.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_AVG_POOL = tvm.ir.Op.get("relax.nn.avg_pool2d")
_TAKE = tvm.ir.Op.get("relax.take")
_MULTIPLY = tvm.ir.Op.get("relax.multiply")
_DIVIDE = tvm.ir.Op.get("relax.divide")
_COLLAPSE_SUM_TO = tvm.ir.Op.get("relax.collapse_sum_to")


def _shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape)
    except TypeError:  # symbolic dimensions
        return None


def _is_call(expr: relax.Expr, op: tvm.ir.Op) -> bool:
    return isinstance(expr, relax.Call) and expr.op == op


def _per_channel(factor: relax.Expr, x_shape: tuple[int, ...]) -> bool:
    """``factor`` broadcasts against the NCHW ``x`` without varying over H and W, and without
    changing x's shape."""
    shape = _shape(factor)
    if shape is None or len(shape) > 4:
        return False
    padded = (1,) * (4 - len(shape)) + shape
    return padded[2:] == (1, 1) and all(f in (1, d) for f, d in zip(padded, x_shape))


def _index(expr: relax.Expr) -> np.ndarray | None:
    if not isinstance(expr, tvm.ir.GenericConst):
        return None
    index = expr.value.numpy()
    return index if index.ndim == 1 else None


def _window_index(index: np.ndarray, size: int, stride: int, outputs: int,
                  count_include_pad: bool) -> np.ndarray | None:
    """The block of every pool window, if each window (clipped to the map) lies in one. A
    window that sticks out of the map must average its valid pixels only."""
    starts = np.arange(outputs) * stride
    if count_include_pad and starts[-1] + size > len(index):
        return None
    if any(len(set(index[s:s + size])) != 1 for s in starts):
        return None
    return index[starts]


@mutator
class _Fold(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)

    def _bound(self, expr: relax.Expr) -> relax.Expr | None:
        """The value bound to ``expr``, through aliases and tuple fields (the Gradient pass
        binds a tuple of the gradients of each op's inputs)."""
        while True:
            if isinstance(expr, relax.Var):
                expr = self.lookup_binding(expr)
            elif isinstance(expr, relax.TupleGetItem):
                fields = self._bound(expr.tuple_value)
                if not isinstance(fields, relax.Tuple):
                    return None
                expr = fields.fields[expr.index]
            else:
                return expr

    def _upsample(self, expr: relax.Expr) -> tuple[relax.Expr, np.ndarray, np.ndarray] | None:
        """(a, rows, cols) if ``expr`` is take(take(a, rows, axis=2), cols, axis=3)."""
        cols_take = self._bound(expr)
        if not (_is_call(cols_take, _TAKE) and int(cols_take.attrs.axis) == 3):
            return None
        rows_take = self._bound(cols_take.args[0])
        if not (_is_call(rows_take, _TAKE) and int(rows_take.attrs.axis) == 2):
            return None
        rows, cols = _index(rows_take.args[1]), _index(cols_take.args[1])
        a = rows_take.args[0]
        if rows is None or cols is None or _shape(a) is None or len(_shape(a)) != 4:
            return None
        return a, rows, cols

    def _pool_of_upsample(self, x: relax.Expr, attrs, out: tuple[int, ...]
                          ) -> relax.Expr | None:
        found = self._upsample(x)
        if found is None:
            return None
        a, rows, cols = found
        per_axis = [_window_index(index, int(attrs.pool_size[axis]), int(attrs.strides[axis]),
                                  out[2 + axis], bool(attrs.count_include_pad))
                    for axis, index in enumerate((rows, cols))]
        if any(index is None for index in per_axis):
            return None
        blocks = _shape(a)[2:]
        for axis, index in enumerate(per_axis):
            if not np.array_equal(index, np.arange(blocks[axis])):
                a = relax.op.take(a, relax.const(index), 2 + axis, "clip")
        return a

    def _pooled(self, x: relax.Expr, attrs, out: tuple[int, ...]) -> relax.Expr | None:
        """An expression equal to avg_pool2d(x) that reads less at full resolution, or None
        when none of the rewrites applies."""
        value = self._bound(x)
        if _is_call(value, _MULTIPLY) or _is_call(value, _DIVIDE):
            lhs, rhs = value.args
            operands = [(lhs, rhs)] + ([(rhs, lhs)] if value.op == _MULTIPLY else [])
            for data, factor in operands:
                if _per_channel(factor, _shape(x)) and _shape(data) == _shape(x):
                    inner = self._pooled(data, attrs, out)
                    if inner is None:
                        inner = relax.Call(_AVG_POOL, [data], attrs)
                    return relax.Call(value.op, [inner, factor])
            return None
        return self._pool_of_upsample(x, attrs, out)

    def _channel_sum(self, call: relax.Call) -> relax.Expr | None:
        target = [int(d) for d in call.args[1].values] if isinstance(
            call.args[1], relax.ShapeExpr) else None
        found = self._upsample(call.args[0])
        if target is None or found is None or len(target) != 4 or target[2:] != [1, 1]:
            return None
        a, rows, cols = found
        blocks = _shape(a)[2:]
        count = np.outer(np.bincount(rows, minlength=blocks[0]),
                         np.bincount(cols, minlength=blocks[1])).astype(str(a.ty.dtype))
        return relax.op.collapse_sum_to(relax.op.multiply(a, relax.const(count[None, None])),
                                        call.args[1])

    def _valid_pool(self, call: relax.Call) -> bool:
        attrs = call.attrs
        return (attrs.layout == "NCHW" and attrs.out_layout == "NCHW"
                and all(int(p) == 0 for p in attrs.padding)
                and all(int(d) == 1 for d in attrs.dilation)
                and _shape(call.args[0]) is not None and len(_shape(call.args[0])) == 4)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = self.visit_expr(binding.value)
        replacement = None
        if _is_call(value, _AVG_POOL) and self._valid_pool(value):
            replacement = self._pooled(value.args[0], value.attrs, _shape(binding.var))
        elif _is_call(value, _COLLAPSE_SUM_TO):
            replacement = self._channel_sum(value)
        if replacement is None:
            super().visit_var_binding_(binding)
            return
        emit = (self.builder_.emit if isinstance(binding.var, relax.DataflowVar)
                else self.builder_.emit_output)
        self.set_var_remap(binding.var, emit(replacement, binding.var.name))


@tvm.transform.module_pass(opt_level=0, name="FoldFilteredChain")
class FoldFilteredChain:
    """Apply the rewrites above to ``func_name`` and drop the bindings they leave unused."""

    def __init__(self, func_name: str) -> None:
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        rewritten = _Fold(mod).visit_expr(mod[self.func_name])
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        mod[self.func_name] = relax.analysis.remove_all_unused(rewritten)
        return mod
