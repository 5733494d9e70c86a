"""StopGradientAtFrozen: cut differentiation where frozen computation enters trained layers.

For a function and the set T of its parameters that are trained, a binding is *trained* if it
depends on a parameter in T. The pass rewrites every use of a frozen value by a trained binding::

    v = frozen_op(...)              # depends on no parameter in T
    w = op(v, p_t)                  # depends on T

into::

    v = frozen_op(...)
    v_ng = R.grad.no_grad(v)
    w = op(v_ng, p_t)

``relax.transform.Gradient`` then never walks into the frozen part: its ops need no registered
gradient, and no backward code is built for them. ``no_grad`` legalizes to the identity.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..frontend import gradients  # noqa: F401  (registers the gradient of no_grad)


def _trained_and_boundary(func: relax.Function, trained: set[str]
                          ) -> tuple[set[relax.Var], set[relax.Var]]:
    """Vars that depend on a trained parameter, and frozen vars that trained bindings use."""
    tainted = {p for p in func.params if p.name in trained}
    boundary: set[relax.Var] = set()
    for block in func.body.blocks:
        for binding in block.bindings:
            uses = set(relax.analysis.free_vars(binding.value))
            if uses & tainted:
                tainted.add(binding.var)
                boundary |= uses - tainted
    return tainted, boundary


@mutator
class _Cutter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, tainted: set[relax.Var],
                 boundary: set[relax.Var]) -> None:
        super().__init__(mod)
        self.tainted, self.boundary = tainted, boundary

    def _cut(self, expr: relax.Expr) -> relax.Expr:
        if isinstance(expr, relax.Var) and expr in self.boundary:
            return relax.op.grad.no_grad(expr)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self._cut(field) for field in expr.fields])
        return expr

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if binding.var in self.tainted:
            if isinstance(value, relax.Call):
                value = relax.Call(value.op, [self._cut(arg) for arg in value.args],
                                   value.attrs, value.ty_args)
            else:
                value = self._cut(value)
        super().visit_var_binding_(relax.VarBinding(binding.var, value))


@tvm.transform.module_pass(opt_level=0, name="StopGradientAtFrozen")
class StopGradientAtFrozen:
    """Insert ``no_grad`` where values of frozen layers enter ``func_name``'s trained layers.

    Parameters
    ----------
    func_name : str
        The function to rewrite.
    trained : list[str]
        Names of the function parameters that will be differentiated.
    """

    def __init__(self, func_name: str, trained: list[str]) -> None:
        self.func_name, self.trained = func_name, set(trained)

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext
                         ) -> tvm.IRModule:
        func = mod[self.func_name]
        tainted, boundary = _trained_and_boundary(func, self.trained)
        rewritten = _Cutter(mod, tainted, boundary).visit_expr(func)
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        mod[self.func_name] = rewritten
        return mod
