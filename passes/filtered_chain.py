"""FoldFilteredChain: take the reductions around a filtered backward to low resolution.

After :mod:`gradient_filter`, a filtered conv's gy is read only by its patch pool
``avg_pool2d(gy)``, and its grad_x is a nearest upsample ``up(a)`` of a low-resolution ``a``
(pixel (h, w) takes ``a[..., rows[h], cols[w]]``; either form of
:func:`gradient_filter.upsample`). What lies between them in our nets is BatchNorm's backward
(per-channel scales of the gradient, per-channel sums for its bias and scale gradients) or an
activation's mask. The rewrites, exact in real arithmetic::

    avg_pool2d(x * c), avg_pool2d(x / c)  ->  avg_pool2d(x) * c, avg_pool2d(x) / c
    avg_pool2d(up(a))                     ->  a, or a gathered at low resolution
    collapse_sum_to(up(a), (., ., 1, 1))  ->  collapse_sum_to(a * count, (., ., 1, 1))
    collapse_sum_to(up(a) * z, (., ., 1, 1))
                                          ->  collapse_sum_to(a * block_sum(z), (., ., 1, 1))

- c is constant over H and W (a per-channel factor): the average of c·x over a window is c
  times the average of x. This holds for every average pool.
- The pool of an upsample needs every pool window (clipped to the map) to lie inside one
  block: the patches of the earlier filtered conv must align with the blocks of the later one
  (same grid, no offset, block size R₁·s₁ a multiple of R₂). Each window then averages one
  value, ``a[rows[P·stride], cols[Q·stride]]``. Where a window straddles blocks, the pool is
  kept.
- ``count[P, Q]`` is the number of pixels of block (P, Q).
- ``block_sum(z) = avg_pool2d(z, blocks, ceil_mode) * count`` needs the blocks to be tiles
  from the corner (rows = h // step), each reaching into the map.

Where two filtered convs meet through BatchNorm alone (MobileNetV2's linear projection conv
and the next filtered conv), nothing reads the later conv's full-resolution grad_x any more,
and the earlier conv's pooled gradient is the per-channel scaled low-resolution ``a``. Where a
ReLU or ReLU6 mask lies between (``where(mask, 0, up(a))``, varying inside a patch), only the
first rewrite applies. No rewrite reads or writes more than the code it replaces: the scaled
x or ``up(a) * z`` is read at full resolution once either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

_AVG_POOL = tvm.ir.Op.get("relax.nn.avg_pool2d")
_TAKE = tvm.ir.Op.get("relax.take")
_MULTIPLY = tvm.ir.Op.get("relax.multiply")
_DIVIDE = tvm.ir.Op.get("relax.divide")
_COLLAPSE_SUM_TO = tvm.ir.Op.get("relax.collapse_sum_to")
_RESHAPE = tvm.ir.Op.get("relax.reshape")
_BROADCAST_TO = tvm.ir.Op.get("relax.broadcast_to")
_STRIDED_SLICE = tvm.ir.Op.get("relax.strided_slice")


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


def _is_crop(call: relax.Call) -> bool:
    """strided_slice(x, axes=(2, 3), begin=(0, 0), end, [strides=(1, 1)])."""
    ints = lambda arg: [int(getattr(f, "value", f)) for f in arg.fields] if isinstance(
        arg, relax.Tuple) else None
    axes, begin = ints(call.args[1]), ints(call.args[2])
    strides = ints(call.args[4]) if len(call.args) > 4 else [1, 1]
    return axes == [2, 3] and begin == [0, 0] and strides == [1, 1]


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


def _scalings(value: relax.Expr, shape: tuple[int, ...]) -> list[tuple[relax.Expr, relax.Expr]]:
    """(data, c) if ``value`` is data * c, c * data or data / c, c a per-channel factor."""
    if not (_is_call(value, _MULTIPLY) or _is_call(value, _DIVIDE)):
        return []
    lhs, rhs = value.args
    pairs = [(lhs, rhs)] + ([(rhs, lhs)] if value.op == _MULTIPLY else [])
    return [(data, c) for data, c in pairs if _shape(data) == shape and _per_channel(c, shape)]


@dataclass(frozen=True)
class _Upsample:
    """x = up(low): pixel (h, w) of x is low[..., rows[h], cols[w]]. ``low`` may be an
    expression not yet emitted, so its shape is kept here."""

    low: relax.Expr
    rows: np.ndarray
    cols: np.ndarray
    blocks: tuple[int, int]
    dtype: str

    def scaled(self, op: tvm.ir.Op, factor: relax.Expr) -> _Upsample:
        """up(low) ⊙ c = up(low ⊙ c) for a per-channel c."""
        return _Upsample(relax.Call(op, [self.low, factor]), self.rows, self.cols,
                         self.blocks, self.dtype)

    def block_sizes(self) -> relax.Expr:
        """The number of pixels that take each value of ``low``, (1, 1, P, Q)."""
        count = np.outer(np.bincount(self.rows, minlength=self.blocks[0]),
                         np.bincount(self.cols, minlength=self.blocks[1]))
        return relax.const(count[None, None].astype(self.dtype))

    def block_sums(self, z: relax.Expr) -> relax.Expr | None:
        """z summed over each block, where the blocks are s_h × s_w tiles from the corner (the
        last ones cropped) and every value of ``low`` has one."""
        steps = [int(np.count_nonzero(index == 0)) for index in (self.rows, self.cols)]
        tiles = all(np.array_equal(index, np.arange(len(index)) // step)
                    for index, step in zip((self.rows, self.cols), steps))
        if not tiles or tuple(-(-len(index) // step) for index, step in zip(
                (self.rows, self.cols), steps)) != self.blocks:
            return None
        pooled = relax.op.nn.avg_pool2d(z, steps, steps, ceil_mode=True,
                                        count_include_pad=False)
        return relax.op.multiply(pooled, self.block_sizes())


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

    def _upsample(self, expr: relax.Expr) -> _Upsample | None:
        """``expr`` as an upsample, in either form that :func:`gradient_filter.upsample`
        emits, seen through per-channel scales."""
        shape = _shape(expr)
        if shape is None or len(shape) != 4:
            return None
        value = self._bound(expr)
        for data, factor in _scalings(value, shape):
            inner = self._upsample(data)
            if inner is not None:
                return inner.scaled(value.op, factor)
        if _is_call(value, _TAKE):
            return self._gather(value)
        if _is_call(value, _STRIDED_SLICE) and _is_crop(value):
            value = self._bound(value.args[0])
        if not _is_call(value, _RESHAPE):
            return None
        tiles = self._bound(value.args[0])
        if not _is_call(tiles, _BROADCAST_TO) or len(_shape(tiles.args[0]) or ()) != 6:
            return None
        n, c, bh, one_h, bw, one_w = _shape(tiles.args[0])
        _, _, bh_, step_h, bw_, step_w = _shape(tiles)
        column = self._bound(tiles.args[0])
        if not (_is_call(column, _RESHAPE) and (one_h, one_w, bh_, bw_) == (1, 1, bh, bw)
                and _shape(column.args[0]) == (n, c, bh, bw)):
            return None
        return _Upsample(column.args[0], np.arange(shape[2]) // step_h,
                         np.arange(shape[3]) // step_w, (bh, bw), str(expr.ty.dtype))

    def _gather(self, cols_take: relax.Call) -> _Upsample | None:
        """take(take(a, rows, axis=2), cols, axis=3)."""
        rows_take = self._bound(cols_take.args[0])
        if not (int(cols_take.attrs.axis) == 3 and _is_call(rows_take, _TAKE)
                and int(rows_take.attrs.axis) == 2):
            return None
        rows, cols = _index(rows_take.args[1]), _index(cols_take.args[1])
        a = rows_take.args[0]
        if rows is None or cols is None or _shape(a) is None or len(_shape(a)) != 4:
            return None
        return _Upsample(a, rows, cols, _shape(a)[2:], str(a.ty.dtype))

    def _pool_of_upsample(self, x: relax.Expr, attrs, out: tuple[int, ...]
                          ) -> relax.Expr | None:
        found = self._upsample(x)
        if found is None:
            return None
        per_axis = [_window_index(index, int(attrs.pool_size[axis]), int(attrs.strides[axis]),
                                  out[2 + axis], bool(attrs.count_include_pad))
                    for axis, index in enumerate((found.rows, found.cols))]
        if any(index is None for index in per_axis):
            return None
        low = found.low
        for axis, index in enumerate(per_axis):
            if not np.array_equal(index, np.arange(found.blocks[axis])):
                low = relax.op.take(low, relax.const(index), 2 + axis, "clip")
        return low

    def _pooled(self, x: relax.Expr, attrs, out: tuple[int, ...]) -> relax.Expr | None:
        """An expression equal to avg_pool2d(x) that reads less at full resolution, or None
        when none of the rewrites applies."""
        pooled = self._pool_of_upsample(x, attrs, out)
        if pooled is not None:
            return pooled
        value = self._bound(x)
        for data, factor in _scalings(value, _shape(x)):
            inner = self._pooled(data, attrs, out)
            if inner is None:
                inner = relax.Call(_AVG_POOL, [data], attrs)
            return relax.Call(value.op, [inner, factor])
        return None

    def _channel_sum(self, call: relax.Call) -> relax.Expr | None:
        """collapse_sum_to over H and W (and maybe N) of up(a), or of up(a) * z."""
        target = call.args[1]
        if not (isinstance(target, relax.ShapeExpr) and len(target.values) == 4
                and [int(d) for d in target.values[2:]] == [1, 1]):
            return None
        found = self._upsample(call.args[0])
        if found is not None:
            return relax.op.collapse_sum_to(relax.op.multiply(found.low, found.block_sizes()),
                                            target)
        product = self._bound(call.args[0])
        if not _is_call(product, _MULTIPLY):
            return None
        for up, z in (product.args, reversed(product.args)):
            found = self._upsample(up)
            block_sums = None if found is None or _shape(z) != _shape(up) else \
                found.block_sums(z)
            if block_sums is not None:
                return relax.op.collapse_sum_to(relax.op.multiply(found.low, block_sums),
                                                target)
        return None

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
