"""HoistStateUpdates: updates move next to their last other use, and no further."""

import numpy as np
import pytest
import tvm
from tvm import relax, te, topi

from gftvm.passes.hoist_updates import HoistStateUpdates

F32 = "float32"


def momentum(g: te.Tensor, m: te.Tensor) -> te.Tensor:
    return te.compute(m.shape, lambda i: 0.9 * m[i] + g[i], "momentum")


def update(m: te.Tensor, w: te.Tensor) -> te.Tensor:
    return te.compute(w.shape, lambda i: w[i] - 0.5 * m[i], "update")


def other_work(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda i: x[i] * x[i], "other_work")


def step(order: list[str]) -> tvm.IRModule:
    """train_step(g, m, w, x) -> (work, read, w_new, m_new), with its bindings emitted in
    ``order``: "momentum", "read" (of w, through a reshape view: the view is emitted first),
    "work" (unrelated to w), "update" (of w, from the new momentum) and optionally "use" (of
    the new w, also returned)."""
    bb = relax.BlockBuilder()
    g, m, w = (relax.Var(n, relax.TensorType((4,), F32)) for n in "gmw")
    x = relax.Var("x", relax.TensorType((4,), F32))
    with bb.function("train_step", [g, m, w, x]):
        with bb.dataflow():
            values = {}
            emit = {
                "momentum": lambda: bb.emit_te(momentum, g, m, primfunc_name_hint="momentum"),
                "read": lambda: bb.emit_te(
                    topi.sum, bb.emit_te(topi.reshape, w, (2, 2), primfunc_name_hint="view"),
                    primfunc_name_hint="read"),
                "work": lambda: bb.emit_te(other_work, x, primfunc_name_hint="other_work"),
                "update": lambda: bb.emit_te(update, values["momentum"], w,
                                             primfunc_name_hint="update"),
                "use": lambda: bb.emit_te(other_work, values["update"],
                                          primfunc_name_hint="use"),
            }
            for name in order:
                values[name] = emit[name]()
            out = bb.emit_output(relax.Tuple([values[n] for n in
                                              ("work", "read", "update", "momentum", "use")
                                              if n in values]))
        bb.emit_func_output(out)
    return bb.get()


def test_update_moves_after_the_last_read_of_the_view():
    before = step(["momentum", "read", "work", "update"])
    after = HoistStateUpdates("train_step", ["m", "w"])(before)
    tvm.ir.assert_structural_equal(after, step(["momentum", "read", "update", "work"]))
    vm_before, vm_after = (relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
                           for mod in (before, after))
    args = [np.arange(4, dtype=F32) + k for k in range(4)]
    for got, want in zip(vm_after["train_step"](*map(tvm.runtime.tensor, args)),
                         vm_before["train_step"](*map(tvm.runtime.tensor, args))):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("order, donated", [
    (["momentum", "work", "read", "update"], ["m", "w"]),   # w is read (through a view) late
    (["momentum", "read", "work", "update"], ["m"]),        # w is not donated
    (["momentum", "update", "use", "read", "work"], ["m", "w"]),  # the new w is used early
], ids=["read-late", "not-donated", "used-before-the-read"])
def test_update_stays(order, donated):
    before = step(order)
    tvm.ir.assert_structural_equal(HoistStateUpdates("train_step", donated)(before), before)


def test_update_moves_down_after_a_later_read_of_the_view():
    """Relax's FuseOps can emit an update before another reader of the parameter's view."""
    before = step(["momentum", "update", "read", "work"])
    after = HoistStateUpdates("train_step", ["m", "w"])(before)
    tvm.ir.assert_structural_equal(after, step(["momentum", "read", "update", "work"]))
