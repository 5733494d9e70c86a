"""The GradientFilter pass on single convs: numbers against the eager reference and an
independent conv_transpose check, and the structure of the rewritten IR."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from gftvm import reference
from gftvm.passes import conv_backward  # noqa: F401  (named conv gradients)
from gftvm.passes.gradient_filter import GradientFilter


def with_seed_gradient(x_shape, w_shape, stride, padding, groups):
    """main(x, w, g) whose loss is sum(conv(x, w) * g), so grad_y is exactly g."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    w = relax.Var("w", relax.TensorType(w_shape, "float32"))
    y_shape = tuple(int(d) for d in bb.normalize(
        relax.op.nn.conv2d(x, w, stride, padding, groups=groups)).ty.shape)
    g = relax.Var("g", relax.TensorType(y_shape, "float32"))
    with bb.function("main", [x, w, g]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, stride, padding, groups=groups))
            loss = bb.emit_output(relax.op.sum(relax.op.multiply(y, g)))
        bb.emit_func_output(loss)
    mod = bb.get()
    return relax.transform.Gradient("main", require_grads=[x, w])(mod), y_shape


def run_filtered(x, w, g, stride, padding, groups, patch):
    mod, _ = with_seed_gradient(x.shape, w.shape, stride, padding, groups)
    if patch:
        mod = GradientFilter("main_adjoint", {"w": patch})(mod)
    mod = relax.transform.InlinePrivateFunctions()(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    _, (gx, gw) = vm["main_adjoint"](*(tvm.runtime.tensor(a) for a in (x, w, g)))
    return gx.numpy(), gw.numpy()


def reference_gradients(x, w, g, stride, padding, groups, patch):
    conv = torch.nn.Conv2d(w.shape[1] * groups, w.shape[0], w.shape[2:], stride, padding,
                           groups=groups, bias=False)
    conv.weight.data = torch.from_numpy(w)
    xt = torch.from_numpy(x).requires_grad_()
    reference.filtered_conv2d(xt, conv, patch).backward(torch.from_numpy(g))
    return xt.grad.numpy(), conv.weight.grad.numpy()


CASES = {  # name: (x shape, w shape, stride, padding, groups, patch)
    "plain": ((2, 4, 8, 8), (6, 4, 3, 3), 1, 1, 1, 2),
    "strided": ((2, 4, 9, 9), (6, 4, 3, 3), 2, 1, 1, 2),
    "depthwise": ((2, 6, 8, 8), (6, 1, 3, 3), 1, 1, 6, 2),
    "depthwise-strided": ((1, 6, 12, 12), (12, 1, 3, 3), 2, 1, 6, 4),
    "grouped": ((2, 6, 8, 8), (4, 3, 3, 3), 1, 1, 2, 2),
    "pointwise": ((2, 5, 6, 6), (3, 5, 1, 1), 1, 0, 1, 2),
    "pad0": ((1, 3, 9, 9), (4, 3, 3, 3), 1, 0, 1, 2),
    "pad2": ((1, 3, 7, 7), (4, 3, 5, 5), 1, 2, 1, 2),
    "pad2-k3": ((1, 3, 6, 6), (4, 3, 3, 3), 1, 2, 1, 2),
    "7x7-R4": ((2, 4, 7, 7), (4, 4, 3, 3), 1, 1, 1, 4),
    "5x5-R2": ((2, 4, 5, 5), (4, 4, 3, 3), 1, 1, 1, 2),
    "global": ((2, 4, 3, 3), (4, 4, 3, 3), 1, 1, 1, 4),
    "stem-7x7-s2": ((1, 3, 16, 16), (8, 3, 7, 7), 2, 3, 1, 2),
}


def random_case(x_shape, w_shape, stride, padding, groups, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=x_shape).astype(np.float32)
    w = rng.normal(size=w_shape).astype(np.float32)
    _, y_shape = with_seed_gradient(x_shape, w_shape, stride, padding, groups)
    g = rng.normal(size=y_shape).astype(np.float32)
    return x, w, g


@pytest.mark.parametrize("case", CASES)
def test_pass_matches_reference(case):
    x_shape, w_shape, stride, padding, groups, patch = CASES[case]
    x, w, g = random_case(x_shape, w_shape, stride, padding, groups)
    got = run_filtered(x, w, g, stride, padding, groups, patch)
    expected = reference_gradients(x, w, g, stride, padding, groups, patch)
    for name, a, b in zip(("grad_x", "grad_w"), got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_without_filter_the_named_backward_is_exact():
    x_shape, w_shape, stride, padding, groups, _ = CASES["grouped"]
    x, w, g = random_case(x_shape, w_shape, stride, padding, groups)
    gx, gw = run_filtered(x, w, g, stride, padding, groups, patch=None)
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    torch.nn.functional.conv2d(xt, wt, None, stride, padding, 1, groups).backward(
        torch.from_numpy(g))
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw, wt.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("patch, kernel", [(2, 1), (4, 3), (8, 3), (8, 5)])
def test_grad_x_equals_exact_backward_of_patch_constant_gradient(patch, kernel):
    """Independent of the reference: stride 1, k×k 'same' conv. Where an input pixel's whole
    receptive window (output pixels within k//2 of it) lies inside one patch, the filtered
    grad_x equals PyTorch's exact conv_transpose of the patch-averaged (constant) gradient."""
    size, pad = 16, kernel // 2
    x, w, g = random_case((2, 4, size, size), (5, 4, kernel, kernel), 1, pad, 1)
    gx, _ = run_filtered(x, w, g, 1, pad, 1, patch)
    g_bar = torch.nn.functional.avg_pool2d(torch.from_numpy(g), patch, patch)
    constant = g_bar.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    exact = torch.nn.functional.conv_transpose2d(constant, torch.from_numpy(w), padding=pad)
    inside = np.array([pad <= i % patch < patch - pad for i in range(size)])
    mask = inside[:, None] & inside[None, :]
    assert mask.sum() >= size
    np.testing.assert_allclose(gx[:, :, mask], exact.numpy()[:, :, mask], rtol=1e-4, atol=1e-5)


# ---- structure ------------------------------------------------------------------------------

STRUCTURE_CASES = {  # name: (channels in, channels out, stride, groups); 2×C×8×8 input, R=2
    "plain": (4, 6, 1, 1), "strided": (4, 6, 2, 1), "depthwise": (6, 6, 1, 6),
    "grouped": (6, 4, 1, 2),
}


def expected_module(ci: int, co: int, s: int, g: int) -> tvm.IRModule:
    """The filtered adjoint of sum(conv2d(x, w) * g), written out for a 3×3, padding-1 conv
    on an 8×8 input with R=2: no crop or pad is needed, so x is pooled directly, and the
    blocks start at the corner, so grad_x is upsampled by broadcasting."""
    ho = 8 // s
    blocks = ho // 2
    per_stride = (lambda low: low) if s == 1 else (
        lambda low: R.multiply(low, R.const(1.0 / (s * s), "float32")))

    @I.ir_module
    class Expected:
        @R.function
        def main_adjoint(x: R.Tensor((2, ci, 8, 8), "float32"),
                         w: R.Tensor((co, ci // g, 3, 3), "float32"),
                         gy: R.Tensor((2, co, ho, ho), "float32")):
            with R.dataflow():
                gf_x_pool = R.nn.avg_pool2d(x, pool_size=[2 * s, 2 * s], strides=[2 * s, 2 * s])
                gf_x_sum = R.multiply(gf_x_pool, R.const(4.0, "float32"))
                y = R.nn.conv2d(x, w, strides=[s, s], padding=[1, 1, 1, 1], groups=g)
                lv = R.multiply(y, gy)
                loss = R.sum(lv)
                loss_adjoint = R.ones(R.shape([]), "float32")
                lv_adjoint = R.broadcast_to(loss_adjoint, R.shape([2, co, ho, ho]))
                y_adjoint = R.multiply(lv_adjoint, gy)
                gf_g_pool = R.nn.avg_pool2d(y_adjoint, pool_size=[2, 2], strides=[2, 2],
                                            ceil_mode=True, count_include_pad=False)
                gf_w_sum = R.sum(w, axis=[2, 3], keepdims=True)
                gf_gx_low = per_stride(R.nn.conv2d_transpose(gf_g_pool, gf_w_sum, groups=g))
                x_adjoint = R.reshape(R.broadcast_to(
                    R.reshape(gf_gx_low, (2, ci, blocks, 1, blocks, 1)),
                    (2, ci, blocks, 2 * s, blocks, 2 * s)), (2, ci, 8, 8))
                gf_gw_1x1 = R.einsum((R.reshape(gf_g_pool, (2, g, co // g, blocks, blocks)),
                                      R.reshape(gf_x_sum, (2, g, ci // g, blocks, blocks))),
                                     "ngopq,ngipq->goi")
                w_adjoint = R.broadcast_to(R.reshape(gf_gw_1x1, (co, ci // g, 1, 1)),
                                           (co, ci // g, 3, 3))
                x_adjoint_out = x_adjoint
                w_adjoint_out = w_adjoint
                R.output(loss, x_adjoint_out, w_adjoint_out)
            return (loss, (x_adjoint_out, w_adjoint_out))

    return Expected


@pytest.mark.parametrize("case", STRUCTURE_CASES)
def test_structure_of_a_filtered_conv(case):
    ci, co, s, g = STRUCTURE_CASES[case]
    before, _ = with_seed_gradient((2, ci, 8, 8), (co, ci // g, 3, 3), s, 1, g)
    after = GradientFilter("main_adjoint", {"w": 2})(before)
    tvm.ir.assert_structural_equal(after["main_adjoint"],
                                   expected_module(ci, co, s, g)["main_adjoint"])
