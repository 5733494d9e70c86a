"""Structural tests of gftvm's Relax passes (Before/Expected, as in TVM's own tests)."""

import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from gftvm.passes.stop_gradient import StopGradientAtFrozen


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((2, 4), "float32"), w0: R.Tensor((4, 4), "float32"),
             w1: R.Tensor((4, 4), "float32"), w2: R.Tensor((4, 4), "float32")):
        with R.dataflow():
            a = R.matmul(x, w0)
            b = R.floor(a)
            c = R.matmul(b, w1)
            d = R.add(c, b)
            e = R.matmul(d, w2)
            R.output(e)
        return e


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((2, 4), "float32"), w0: R.Tensor((4, 4), "float32"),
             w1: R.Tensor((4, 4), "float32"), w2: R.Tensor((4, 4), "float32")):
        with R.dataflow():
            a = R.matmul(x, w0)
            b = R.floor(a)
            b_ng = R.grad.no_grad(b)
            c = R.matmul(b_ng, w1)
            b_ng2 = R.grad.no_grad(b)
            d = R.add(c, b_ng2)
            w2_ng = R.grad.no_grad(w2)
            e = R.matmul(d, w2_ng)
            R.output(e)
        return e


def test_stop_gradient_at_frozen():
    after = StopGradientAtFrozen("main", ["w1"])(Before)
    tvm.ir.assert_structural_equal(after, Expected)


def test_stop_gradient_is_identity_when_everything_is_trained():
    after = StopGradientAtFrozen("main", ["x", "w0", "w1", "w2"])(Before)
    tvm.ir.assert_structural_equal(after, Before)
