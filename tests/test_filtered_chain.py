"""FoldFilteredChain: the structure it produces, its numbers on the chain alone, and compiled
train steps with and without it against the eager gradient-filter reference."""

import re

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


def gather(index):
    return lambda a: R.take(R.take(a, R.const(np.array(index)), axis=2, mode="clip"),
                            R.const(np.array(index)), axis=3, mode="clip")


def tiles(step):
    full = (2, C, LOW * step, LOW * step)
    tiled = lambda a: R.reshape(R.broadcast_to(R.reshape(a, (2, C, LOW, 1, LOW, 1)),
                                               (2, C, LOW, step, LOW, step)), full)
    if full[2] == SIZE:
        return tiled
    return lambda a: R.strided_slice(tiled(a), axes=[2, 3], begin=[0, 0], end=[SIZE, SIZE])


CASES = {  # name: (the upsample's block of every row and column, the upsample)
    "aligned": ([0, 0, 1, 1, 2, 2, 3, 3], gather([0, 0, 1, 1, 2, 2, 3, 3])),
    "gather": ([0, 0, 0, 0, 1, 1, 1, 1], gather([0, 0, 0, 0, 1, 1, 1, 1])),  # blocks of 4
    "misaligned": ([0, 1, 1, 2, 2, 3, 3, 3], gather([0, 1, 1, 2, 2, 3, 3, 3])),
    "tiled": (list(np.arange(SIZE) // 2), tiles(2)),
    "tiled-cropped": (list(np.arange(SIZE) // 3), tiles(3)),  # misaligned; a[..., 3] unused
}
GATHER_PATCHES = R.const(np.array([0, 0, 1, 1]))  # the block of each 2x2 window, "gather"
POOLED = {  # name: the pool of the scaled upsample, as the pass writes it (aligned, tiled: a)
    "gather": lambda a, up, gamma, std: R.take(R.take(
        R.divide(R.multiply(a, gamma), std), GATHER_PATCHES, axis=2, mode="clip"),
        GATHER_PATCHES, axis=3, mode="clip"),
    "misaligned": lambda a, up, gamma, std: R.divide(R.multiply(R.nn.avg_pool2d(
        up, pool_size=[2, 2], strides=[2, 2], ceil_mode=True, count_include_pad=False),
        gamma), std),
}
POOLED["tiled-cropped"] = POOLED["misaligned"]


def chain_before(case: str) -> tvm.IRModule:
    """BatchNorm's backward (bias and scale gradients, input gradient) between the upsampled
    grad_x of one filtered conv and the patch pool of the next."""
    upsample = CASES[case][1]

    @I.ir_module
    class Before:
        @R.function
        def main(a: R.Tensor((2, C, LOW, LOW), "float32"),
                 gamma: R.Tensor((1, C, 1, 1), "float32"), std: R.Tensor((1, C, 1, 1), "float32"),
                 xhat: R.Tensor((2, C, SIZE, SIZE), "float32")):
            with R.dataflow():
                up = upsample(a)
                bias_grad = R.collapse_sum_to(up, R.shape([1, C, 1, 1]))
                scale_grad = R.collapse_sum_to(R.multiply(up, xhat), R.shape([1, C, 1, 1]))
                scaled = R.multiply(gamma, up)
                gy = R.divide(scaled, std)
                pooled = R.nn.avg_pool2d(gy, pool_size=[2, 2], strides=[2, 2], ceil_mode=True,
                                         count_include_pad=False)
                R.output(bias_grad, scale_grad, pooled)
            return (bias_grad, scale_grad, pooled)

    return Before


FOLDS_SCALE_GRAD = {"aligned", "tiled"}  # blocks are tiles from the corner, one per value


def chain_expected(case: str) -> tvm.IRModule:
    """Where the blocks are tiles, nothing reads the upsample any more; otherwise BatchNorm's
    scale gradient still does (and the pool, where it straddles blocks)."""
    index, upsample = CASES[case]
    rows = np.bincount(index, minlength=LOW)
    count = R.const(np.outer(rows, rows).astype("float32")[None, None])
    if case in FOLDS_SCALE_GRAD:
        return folded_expected(count)
    return partly_folded_expected(count, upsample, POOLED[case])


def folded_expected(count):
    @I.ir_module
    class Folded:
        @R.function
        def main(a: R.Tensor((2, C, LOW, LOW), "float32"),
                 gamma: R.Tensor((1, C, 1, 1), "float32"), std: R.Tensor((1, C, 1, 1), "float32"),
                 xhat: R.Tensor((2, C, SIZE, SIZE), "float32")):
            with R.dataflow():
                bias_grad = R.collapse_sum_to(R.multiply(a, count), R.shape([1, C, 1, 1]))
                block_sums = R.multiply(R.nn.avg_pool2d(xhat, pool_size=[2, 2], strides=[2, 2],
                                                        ceil_mode=True, count_include_pad=False),
                                        count)
                scale_grad = R.collapse_sum_to(R.multiply(a, block_sums), R.shape([1, C, 1, 1]))
                pooled = R.divide(R.multiply(a, gamma), std)
                R.output(bias_grad, scale_grad, pooled)
            return (bias_grad, scale_grad, pooled)

    return Folded


def partly_folded_expected(count, upsample, pooled_of):
    @I.ir_module
    class Partly:
        @R.function
        def main(a: R.Tensor((2, C, LOW, LOW), "float32"),
                 gamma: R.Tensor((1, C, 1, 1), "float32"), std: R.Tensor((1, C, 1, 1), "float32"),
                 xhat: R.Tensor((2, C, SIZE, SIZE), "float32")):
            with R.dataflow():
                up = upsample(a)
                bias_grad = R.collapse_sum_to(R.multiply(a, count), R.shape([1, C, 1, 1]))
                scale_grad = R.collapse_sum_to(R.multiply(up, xhat), R.shape([1, C, 1, 1]))
                pooled = pooled_of(a, up, gamma, std)
                R.output(bias_grad, scale_grad, pooled)
            return (bias_grad, scale_grad, pooled)

    return Partly


@pytest.mark.parametrize("case", CASES)
def test_structure(case):
    after = FoldFilteredChain("main")(chain_before(case))
    tvm.ir.assert_structural_equal(after["main"], chain_expected(case)["main"])


@pytest.mark.parametrize("case", CASES)
def test_chain_numbers_against_numpy(case):
    index = CASES[case][0]
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, C, LOW, LOW)).astype("float32")
    gamma, std = (rng.uniform(0.5, 2.0, size=(1, C, 1, 1)).astype("float32") for _ in "ab")
    xhat = rng.normal(size=(2, C, SIZE, SIZE)).astype("float32")
    up = a[:, :, index][:, :, :, index]
    gy = gamma * up / std
    pooled = gy.reshape(2, C, SIZE // 2, 2, SIZE // 2, 2).mean((3, 5))
    expected = (up.sum((0, 2, 3), keepdims=True), (up * xhat).sum((0, 2, 3), keepdims=True),
                pooled)
    before = chain_before(case)
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
    """Both steps match PyTorch with the eager reference filter, and each other to 1e-5. The
    head's grad_x, upsampled by tiling (a 6-D broadcast), is gone where the blocks align with
    the projection's patches (stride 1 and 2 with 'same' padding), and stays with padding 0,
    whose blocks are offset (a gather, take, then)."""
    image, grad_filter = 8, gftvm.GradientFilter(2, "last:2")
    model = prepared_bottleneck(stride, padding, image)
    path = export(model, tmp_path / "model.onnx", image)
    tiled = re.compile(r"R\.broadcast_to\([^)]*R\.shape\(\[(\d+, ){5}\d+\]\)")
    upsamples = lambda: len(tiled.findall(gftvm.compiler.build_program(
        path, filter=grad_filter).built.mod["train_step"].script()))
    folded_upsamples = upsamples()
    (tmp_path / "folded").mkdir()
    folded = check_parity(model, export(model, tmp_path / "folded" / "m.onnx", image), "all",
                          "sgd", image_size=image, filter=grad_filter)
    monkeypatch.setattr(train_graph, "FoldFilteredChain", no_fold)
    plain_upsamples = upsamples()
    plain = check_parity(model, path, "all", "sgd", image_size=image, filter=grad_filter)
    assert (plain_upsamples, folded_upsamples) == ((2, 1) if folds else (1, 1))
    for name, value in folded.parameters().items():
        np.testing.assert_allclose(value, plain.parameters()[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
