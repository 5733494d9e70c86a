"""InPlaceStateUpdate: write the new parameters and optimizer state over the old ones.

``train_step`` is functional: it takes the parameters and the optimizer state and returns their
updated values. Compiled as is, every step allocates a second copy of the trained parameters and
of the optimizer state while the first is alive (2 x 31.5 MiB for ResNet-18 ``last:4``). The
runtime's Session replaces its tensors with the returned ones, so the caller *donates* them, as
PyTorch's and onnxruntime's optimizers update in place. On the lowered, scheduled module, this
pass turns each kernel call that is the last use of a donated input into a call that writes its
result into that input::

    w_new = R.call_tir(fused_multiply_subtract, (m_new, w), out_ty=R.Tensor((64, 64, 3, 3)))
        # no later binding reads w
->
    w_new = R.call_tir_inplace(fused_multiply_subtract_inplace1, (m_new, w),
                               inplace_indices=[1], out_ty=R.Tensor((64, 64, 3, 3)))

where the kernel's output buffer is replaced by that argument's buffer. It applies only where the
result is exact: the output has the input's shape and dtype, the input is passed once, nothing
after the call reads the input or a view of it (a reshape kernel becomes a view), and in the
kernel one block writes the output, that block is no reduction, and it is the only block that
reads the input, at the element it writes. Each element is then read just before the same block
iteration overwrites it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx

_NEVER_DEAD = math.inf   # last use of an input that the function returns


def _bindings(func: relax.Function) -> list[relax.Binding]:
    return [b for block in func.body.blocks for b in block.bindings]


def _tir_call(value: relax.Expr) -> tuple[relax.GlobalVar, list[relax.Expr]] | None:
    if isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir")):
        return value.args[0], list(value.args[1].fields)
    return None


def _view_roots(mod: tvm.IRModule, bindings: list[relax.Binding], inputs: set[relax.Var]
                ) -> dict[relax.Var, set[relax.Var]]:
    """For each var bound to (a view of) some of ``inputs``, which ones: the result of anything
    but a kernel that computes a new tensor may share its operands' memory."""
    roots = {var: {var} for var in inputs}
    for binding in bindings:
        used = set().union(*(roots.get(v, set()) for v in relax.analysis.free_vars(binding.value)))
        call = _tir_call(binding.value)
        if used and (call is None or relax.analysis.has_reshape_pattern(mod[call[0]])):
            roots[binding.var] = used
    return roots


def _last_uses(mod: tvm.IRModule, func: relax.Function, donated: set[relax.Var]
               ) -> dict[relax.Var, float]:
    """Binding index of each donated input's last use, counting uses of its views."""
    bindings = _bindings(func)
    roots = _view_roots(mod, bindings, donated)
    last: dict[relax.Var, float] = {}
    for index, binding in enumerate(bindings):
        for var in relax.analysis.free_vars(binding.value):
            for root in roots.get(var, ()):
                last[root] = index
    for var in relax.analysis.free_vars(func.body.body):
        for root in roots.get(var, ()):
            last[root] = _NEVER_DEAD
    return last


def _blocks(sch: s_tir.Schedule) -> list[s_tir.SBlock]:
    found, pending = [], list(sch.get_child_blocks(sch.get_sblock("root")))
    while pending:
        block = pending.pop()
        found.append(sch.get(block))
        pending += sch.get_child_blocks(block)
    return found


def _same_region(a: tvm.ir.TensorRegion, b: tvm.ir.TensorRegion) -> bool:
    return all(tvm_ffi.structural_equal(x.min, y.min) and int(x.extent) == 1 == int(y.extent)
               for x, y in zip(a.region, b.region))


def can_write_over(func: tirx.PrimFunc, source: int, output: int) -> bool:
    """Whether ``func`` computes the same if its ``output`` buffer is its ``source`` buffer
    (parameter indices): one non-reduction block writes the output and is the only block
    reading the source, at the written element."""
    src, out = func.params[source], func.params[output]
    if (str(src.dtype) != str(out.dtype) or len(src.shape) != len(out.shape)
            or not all(int(a) == int(b) for a, b in zip(src.shape, out.shape))):
        return False
    blocks = _blocks(s_tir.Schedule(func))
    writers = [b for b in blocks if any(w.source.same_as(out) for w in b.writes)]
    readers = [b for b in blocks if any(r.source.same_as(src) for r in b.reads)]
    if len(writers) != 1 or any(r is not writers[0] for r in readers):
        return False
    block = writers[0]
    if any(v.iter_type != tirx.IterVar.DataPar for v in block.iter_vars):
        return False
    written = [w for w in block.writes if w.source.same_as(out)]
    return len(written) == 1 and all(_same_region(r, written[0]) for r in block.reads
                                     if r.source.same_as(src))


@tvm.transform.module_pass(opt_level=0, name="InPlaceStateUpdate")
class InPlaceStateUpdate:
    """Write kernel results over the donated inputs of ``func_name`` where they die.

    Parameters
    ----------
    func_name : str
        The Relax function to rewrite (``train_step``).
    donated : Iterable[str]
        Names of its parameters the caller gives up: the trained parameters and the optimizer
        state.
    """

    def __init__(self, func_name: str, donated: Iterable[str]) -> None:
        self.func_name, self.donated = func_name, set(donated)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        func = mod[self.func_name]
        donated = {p for p in func.params if p.name in self.donated}
        last = _last_uses(mod, func, donated)
        targets = {}
        for index, binding in enumerate(_bindings(func)):
            call = _tir_call(binding.value)
            if call is None or not isinstance(binding.value.ty_args[0], relax.TensorType):
                continue
            gvar, args = call
            if len(mod[gvar].params) != len(args) + 1:
                continue
            for position, arg in enumerate(args):
                if (arg in donated and last[arg] == index and args.count(arg) == 1
                        and can_write_over(mod[gvar], position, len(args))):
                    targets[binding.var] = position
                    break
        rewriter = _InPlace(mod, targets)
        rewriter.builder_.update_func(mod.get_global_var(self.func_name),
                                      rewriter.visit_expr(func))
        return rewriter.builder_.get()


@relax.expr_functor.mutator
class _InPlace(relax.expr_functor.PyExprMutator):
    """Rebinds each var in ``targets`` to an in-place call writing over argument
    ``targets[var]``."""

    def __init__(self, mod: tvm.IRModule, targets: dict[relax.Var, int]) -> None:
        super().__init__(mod)
        self.mod, self.targets, self.kernels = mod, targets, {}

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if binding.var in self.targets:
            gvar, args = _tir_call(value)
            value = relax.op.call_tir_inplace(self._kernel(gvar, self.targets[binding.var]),
                                              relax.Tuple(args), [self.targets[binding.var]],
                                              value.ty_args[0])
        super().visit_var_binding_(relax.VarBinding(binding.var, value))

    def _kernel(self, gvar: relax.GlobalVar, position: int) -> relax.GlobalVar:
        """``gvar``'s kernel with its output buffer replaced by argument ``position``'s."""
        if (gvar, position) not in self.kernels:
            func = self.mod[gvar]
            self.kernels[gvar, position] = self.builder_.add_func(
                s_tir.renew_defs(func.specialize({func.params[-1]: func.params[position]})),
                f"{gvar.name_hint}_inplace{position}")
        return self.kernels[gvar, position]
