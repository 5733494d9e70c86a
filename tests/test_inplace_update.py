"""InPlaceStateUpdate: results written over donated inputs only where that is exact."""

import numpy as np
import pytest
import tvm
from tvm import relax, te, topi
from tvm.script import ir as I, relax as R, tirx as T

import gftvm
from gftvm.data import synthetic
from gftvm.passes.inplace_update import InPlaceStateUpdate
from gftvm.runtime import read_manifest
from gftvm.state import read_state

from reference import ARTIFACT_OPTIONS


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def sgd(g: T.Buffer((4,), "float32"), w: T.Buffer((4,), "float32"),
            out: T.Buffer((4,), "float32")):
        for i in range(4):
            with T.sblock("update"):
                v = T.axis.spatial(4, i)
                out[v] = w[v] - T.float32(0.5) * g[v]

    @R.function
    def train_step(g: R.Tensor((4,), "float32"), w: R.Tensor((4,), "float32")
                   ) -> R.Tensor((4,), "float32"):
        cls = Before
        with R.dataflow():
            w_new = R.call_tir(cls.sgd, (g, w), out_ty=R.Tensor((4,), "float32"))
            R.output(w_new)
        return w_new


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def sgd(g: T.Buffer((4,), "float32"), w: T.Buffer((4,), "float32"),
            out: T.Buffer((4,), "float32")):
        for i in range(4):
            with T.sblock("update"):
                v = T.axis.spatial(4, i)
                out[v] = w[v] - T.float32(0.5) * g[v]

    @T.prim_func(private=True, s_tir=True)
    def sgd_inplace1(g: T.Buffer((4,), "float32"), w: T.Buffer((4,), "float32")):
        for i in range(4):
            with T.sblock("update"):
                v = T.axis.spatial(4, i)
                w[v] = w[v] - T.float32(0.5) * g[v]

    @R.function
    def train_step(g: R.Tensor((4,), "float32"), w: R.Tensor((4,), "float32")
                   ) -> R.Tensor((4,), "float32"):
        cls = Expected
        with R.dataflow():
            w_new = R.call_tir_inplace(cls.sgd_inplace1, (g, w), inplace_indices=[1],
                                       out_ty=R.Tensor((4,), "float32"))
            R.output(w_new)
        return w_new


def test_update_writes_over_the_donated_weight():
    after = InPlaceStateUpdate("train_step", ["w"])(Before)
    tvm.ir.assert_structural_equal(after, Expected)
    vm = relax.VirtualMachine(tvm.compile(after, "llvm"), tvm.cpu())
    g, w = (tvm.runtime.tensor(np.arange(4, dtype="float32") + k) for k in (1, 0))
    w_new = vm["train_step"](g, w)
    assert w_new.same_as(w)
    np.testing.assert_array_equal(w.numpy(), np.arange(4) - 0.5 * (np.arange(4) + 1))


def sgd(g: te.Tensor, w: te.Tensor) -> te.Tensor:
    return te.compute(w.shape, lambda i: w[i] - 0.5 * g[i], "sgd")


def step(kernel=sgd, twice=False, read_after=False, view_read_after=False, return_old=False
         ) -> tvm.IRModule:
    """train_step(g, w) = kernel(g, w), with the old w used as the flags say."""
    bb = relax.BlockBuilder()
    g = relax.Var("g", relax.TensorType((4,), "float32"))
    w = relax.Var("w", relax.TensorType((4,), "float32"))
    with bb.function("train_step", [g, w]):
        with bb.dataflow():
            view = bb.emit_te(topi.reshape, w, (2, 2)) if view_read_after else None
            outputs = [bb.emit_te(kernel, w if twice else g, w)]
            if read_after:
                outputs.append(bb.emit_te(topi.sum, w))
            if view is not None:
                outputs.append(bb.emit_te(topi.sum, view))
            out = bb.emit_output(relax.Tuple(outputs))
        bb.emit_func_output(relax.Tuple([out, w]) if return_old else out)
    return bb.get()


def reversed_sgd(g: te.Tensor, w: te.Tensor) -> te.Tensor:
    return te.compute(w.shape, lambda i: w[3 - i] - 0.5 * g[i], "reversed")


def reduction(g: te.Tensor, w: te.Tensor) -> te.Tensor:
    k = te.reduce_axis((0, 4), "k")
    return te.compute(w.shape, lambda i: te.sum(w[i] * g[k], axis=k), "outer_sum")


def two_blocks(g: te.Tensor, w: te.Tensor) -> te.Tensor:
    doubled = te.compute(w.shape, lambda i: w[i] * 2.0, "doubled")
    return te.compute(w.shape, lambda i: doubled[3 - i] + w[i], "mixed")


@pytest.mark.parametrize("mod, donated", [
    (step(read_after=True), ["w"]),            # w is read after the update
    (step(view_read_after=True), ["w"]),       # ... through a reshape (a view at run time)
    (step(return_old=True), ["w"]),            # the caller gets the old w back
    (step(twice=True), ["w"]),                 # passed twice: the other read is not checked
    (step(), []),                              # not donated
    (step(reversed_sgd), ["w"]),               # reads w[3 - i] while writing out[i]
    (step(reduction), ["w"]),                  # out[i] is zeroed before w[i] is read
    (step(two_blocks), ["w"]),                 # another block reads w (not proven safe)
], ids=["read-after", "view-read-after", "returned", "twice", "not-donated", "other-element",
        "reduction", "other-block"])
def test_left_functional_unless_proven_exact(mod, donated):
    tvm.ir.assert_structural_equal(InPlaceStateUpdate("train_step", donated)(mod), mod)


@pytest.fixture(scope="module")
def filtered_artifact_dir(mcunet_onnx, tmp_path_factory):
    """MCUNet last:4 with the gradient filter (R2), plain SGD with weight decay: FuseOps put the
    BatchNorm scales' updates before the filter's last read of them (HoistStateUpdates)."""
    directory = tmp_path_factory.mktemp("filtered")
    options = {**ARTIFACT_OPTIONS, "momentum": 0.0, "weight_decay": 1e-4}
    gftvm.compile(mcunet_onnx, **options,
                  filter=gftvm.GradientFilter(patch=2, layers="last:4")).save(directory)
    return directory


@pytest.mark.parametrize("artifact", ["artifact_dir", "filtered_artifact_dir"])
def test_compiled_step_updates_parameters_and_state_in_place(artifact, request):
    """MCUNet last:4, SGD with momentum, or filtered with weight decay: train_step returns the
    very tensors it was given for every trained parameter and every state tensor, and leaves
    the frozen ones alone (the PyTorch-parity tests check the updated values against
    autograd)."""
    artifact_dir = request.getfixturevalue(artifact)
    manifest = read_manifest(artifact_dir)
    library = tvm.runtime.load_module(str(artifact_dir / manifest["files"]["library"]["path"]))
    state = read_state(str(artifact_dir / manifest["files"]["state"]["path"]))
    names = [p["name"] for p in manifest["params"]]
    x, y = synthetic(4, image_size=manifest["input"]["shape"][2])
    params = [tvm.runtime.tensor(state.params[n]) for n in names]
    optim = [tvm.runtime.tensor(s) for s in state.optim]
    vm = relax.VirtualMachine(library, tvm.cpu())
    _, updated, new_state = vm["train_step"](tvm.runtime.tensor(x), tvm.runtime.tensor(y),
                                             *params, *optim)
    trained = [params[names.index(n)] for n in manifest["trainable"]]
    assert all(new.same_as(old) for new, old in zip(updated, trained))
    assert all(new.same_as(old) for new, old in zip(new_state, optim))
    for name, param in zip(names, params):
        if name not in manifest["trainable"]:
            np.testing.assert_array_equal(param.numpy(), state.params[name], err_msg=name)

