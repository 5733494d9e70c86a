"""FoldFilteredChain: the structure it produces, its numbers on the chain alone, and compiled
train steps with and without it against the eager gradient-filter reference."""

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import gftvm
from gftvm import models, train_graph
from gftvm.passes.filtered_chain import FoldFilteredChain
from reference import check_parity, export

C, LOW, SIZE = 3, 4, 8  # channels, low-res and full-res map sizes; the pool takes 2x2 windows
CASES = {  # name: the upsample's block of every row (and column)
    "aligned": [0, 0, 1, 1, 2, 2, 3, 3],      # blocks of 2: the pool gives back a
    "gather": [0, 0, 0, 0, 1, 1, 1, 1],       # blocks of 4: a[0, 0, 1, 1] at low res
    "misaligned": [0, 1, 1, 2, 2, 3, 3, 3],   # a window straddles two blocks
}


def chain_before(index: list[int]) -> tvm.IRModule:
    """BatchNorm's backward (bias and scale gradients, input gradient) between the upsampled
    grad_x of one filtered conv and the patch pool of the next."""

    @I.ir_module
    class Before:
        @R.function
        def main(a: R.Tensor((2, C, LOW, LOW), "float32"),
                 gamma: R.Tensor((1, C, 1, 1), "float32"), std: R.Tensor((1, C, 1, 1), "float32"),
                 xhat: R.Tensor((2, C, SIZE, SIZE), "float32")):
            with R.dataflow():
                rows = R.take(a, R.const(np.array(index)), axis=2, mode="clip")
                up = R.take(rows, R.const(np.array(index)), axis=3, mode="clip")
                bias_grad = R.collapse_sum_to(up, R.shape([1, C, 1, 1]))
                scale_grad = R.collapse_sum_to(R.multiply(up, xhat), R.shape([1, C, 1, 1]))
                scaled = R.multiply(gamma, up)
                gy = R.divide(scaled, std)
                pooled = R.nn.avg_pool2d(gy, pool_size=[2, 2], strides=[2, 2], ceil_mode=True,
                                         count_include_pad=False)
                R.output(bias_grad, scale_grad, pooled)
            return (bias_grad, scale_grad, pooled)

    return Before


def chain_expected(case: str) -> tvm.IRModule:
    index = CASES[case]
    rows = np.bincount(index, minlength=LOW)
    count = np.outer(rows, rows).astype("float32")[None, None]
    pool_of_up = {
        "aligned": lambda a, up: a,
        "gather": lambda a, up: R.take(R.take(a, R.const(np.array([0, 0, 1, 1])), axis=2,
                                              mode="clip"),
                                       R.const(np.array([0, 0, 1, 1])), axis=3, mode="clip"),
        "misaligned": lambda a, up: R.nn.avg_pool2d(up, pool_size=[2, 2], strides=[2, 2],
                                                    ceil_mode=True, count_include_pad=False),
    }[case]

    @I.ir_module
    class Expected:
        @R.function
        def main(a: R.Tensor((2, C, LOW, LOW), "float32"),
                 gamma: R.Tensor((1, C, 1, 1), "float32"), std: R.Tensor((1, C, 1, 1), "float32"),
                 xhat: R.Tensor((2, C, SIZE, SIZE), "float32")):
            with R.dataflow():
                rows = R.take(a, R.const(np.array(index)), axis=2, mode="clip")
                up = R.take(rows, R.const(np.array(index)), axis=3, mode="clip")
                bias_grad = R.collapse_sum_to(R.multiply(a, R.const(count)), R.shape([1, C, 1, 1]))
                scale_grad = R.collapse_sum_to(R.multiply(up, xhat), R.shape([1, C, 1, 1]))
                pooled = R.divide(R.multiply(pool_of_up(a, up), gamma), std)
                R.output(bias_grad, scale_grad, pooled)
            return (bias_grad, scale_grad, pooled)

    return Expected


@pytest.mark.parametrize("case", CASES)
def test_structure(case):
    after = FoldFilteredChain("main")(chain_before(CASES[case]))
    tvm.ir.assert_structural_equal(after["main"], chain_expected(case)["main"])


@pytest.mark.parametrize("case", CASES)
def test_chain_numbers_against_numpy(case):
    index = CASES[case]
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, C, LOW, LOW)).astype("float32")
    gamma, std = (rng.uniform(0.5, 2.0, size=(1, C, 1, 1)).astype("float32") for _ in "ab")
    xhat = rng.normal(size=(2, C, SIZE, SIZE)).astype("float32")
    up = a[:, :, index][:, :, :, index]
    gy = gamma * up / std
    pooled = gy.reshape(2, C, SIZE // 2, 2, SIZE // 2, 2).mean((3, 5))
    expected = (up.sum((0, 2, 3), keepdims=True), (up * xhat).sum((0, 2, 3), keepdims=True),
                pooled)
    before = chain_before(index)
    for mod in (before, FoldFilteredChain("main")(before)):
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        got = vm["main"](*(tvm.runtime.tensor(t) for t in (a, gamma, std, xhat)))
        for name, g, e in zip(("bias_grad", "scale_grad", "pooled"), got, expected):
            np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-6, err_msg=name)


class Bottleneck(nn.Module):
    """conv-BN-ReLU, a linear 1x1 projection (conv-BN), then conv-BN-ReLU: the last two convs,
    filtered, meet through BatchNorm alone, as in MobileNetV2."""

    def __init__(self, stride: int, padding: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6))
        self.head = nn.Sequential(nn.Conv2d(6, 12, 3, stride, padding), nn.BatchNorm2d(12),
                                  nn.ReLU())
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.project(self.stem(x))).mean((2, 3)))


def prepared_bottleneck(stride: int, padding: int, image: int) -> nn.Module:
    torch.manual_seed(0)
    model = Bottleneck(stride, padding)
    models.calibrate_batchnorm(model, torch.randn(16, 3, image, image))
    return model


def no_fold(name):
    return tvm.transform.module_pass(lambda mod, ctx: mod, opt_level=0, name="NoFold")


@pytest.mark.parametrize("stride, padding, folds", [(1, 1, True), (2, 1, True), (1, 0, False)])
def test_train_step_with_and_without_the_fold(stride, padding, folds, tmp_path, monkeypatch):
    """Both steps match PyTorch with the eager reference filter, and each other to 1e-5; the
    pool of the projection's gy reads the head's upsample only where their blocks align
    (stride 1 and 2 with 'same' padding; not with padding 0, whose blocks are offset)."""
    image, grad_filter = 8, gftvm.GradientFilter(2, "last:2")
    model = prepared_bottleneck(stride, padding, image)
    path = export(model, tmp_path / "model.onnx", image)
    pools = lambda: gftvm.compiler.build_program(path, filter=grad_filter).built.mod[
        "train_step"].script().count("R.nn.avg_pool2d(")
    folded_pools = pools()
    (tmp_path / "folded").mkdir()
    folded = check_parity(model, export(model, tmp_path / "folded" / "m.onnx", image), "all",
                          "sgd", image_size=image, filter=grad_filter)
    monkeypatch.setattr(train_graph, "FoldFilteredChain", no_fold)
    plain_pools = pools()
    plain = check_parity(model, path, "all", "sgd", image_size=image, filter=grad_filter)
    # x̃ pools of both layers, one ḡ pool each; the fold removes the projection's ḡ pool
    assert (plain_pools, folded_pools) == (4, 3 if folds else 4)
    for name, value in folded.parameters().items():
        np.testing.assert_allclose(value, plain.parameters()[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
