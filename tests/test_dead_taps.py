"""DeadTaps: Before/Expected structure, the per-axis rewrite against a NumPy conv, compiled
convs against PyTorch, and a compiled train step with 1x1-map convs against autograd."""

import itertools

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import gftvm
from gftvm.compiler import build_program
from gftvm.passes.dead_taps import DeadTaps, live_taps, prune_conv_axis, prune_transpose_axis
from reference import check_parity, export, random_batches

F32 = "float32"


# -- structure -----------------------------------------------------------------------------------

@I.ir_module
class OneByOne:
    """ResNet-18's layer4 at 32x32: a 3x3 pad-1 conv on a 1x1 map, and its BP grad_x."""

    @R.function
    def main(x: R.Tensor((2, 4, 1, 1), F32), w: R.Tensor((8, 4, 3, 3), F32),
             gy: R.Tensor((2, 8, 1, 1), F32)):
        with R.dataflow():
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            gx = R.nn.conv2d_transpose(gy, w, padding=[1, 1, 1, 1], kernel_layout="IOHW")
            R.output(y, gx)
        return (y, gx)


@I.ir_module
class OneByOneExpected:
    @R.function
    def main(x: R.Tensor((2, 4, 1, 1), F32), w: R.Tensor((8, 4, 3, 3), F32),
             gy: R.Tensor((2, 8, 1, 1), F32)):
        with R.dataflow():
            w_live = R.strided_slice(w, axes=[2, 3], begin=[1, 1], end=[2, 2])
            y = R.nn.conv2d(x, w_live, padding=[0, 0, 0, 0])
            gx = R.nn.conv2d_transpose(gy, w_live, padding=[0, 0, 0, 0], kernel_layout="IOHW")
            R.output(y, gx)
        return (y, gx)


@I.ir_module
class Strided:
    """layer4.0.conv1: stride 2 from 2x2 to 1x1 reads taps 1..2 of 0..2; its grad_x needs
    output padding 1."""

    @R.function
    def main(x: R.Tensor((2, 4, 2, 2), F32), w: R.Tensor((8, 4, 3, 3), F32),
             gy: R.Tensor((2, 8, 1, 1), F32)):
        with R.dataflow():
            y = R.nn.conv2d(x, w, strides=[2, 2], padding=[1, 1, 1, 1])
            gx = R.nn.conv2d_transpose(gy, w, strides=[2, 2], padding=[1, 1, 1, 1],
                                       output_padding=[1, 1], kernel_layout="IOHW")
            R.output(y, gx)
        return (y, gx)


@I.ir_module
class StridedExpected:
    """The live 2x2 window covers the whole input: 1x1 convs with 4·4 channels."""

    @R.function
    def main(x: R.Tensor((2, 4, 2, 2), F32), w: R.Tensor((8, 4, 3, 3), F32),
             gy: R.Tensor((2, 8, 1, 1), F32)):
        with R.dataflow():
            w_live = R.strided_slice(w, axes=[2, 3], begin=[1, 1], end=[3, 3])
            w_flat = R.reshape(w_live, (8, 16, 1, 1))
            x_flat = R.reshape(x, (2, 16, 1, 1))
            y = R.nn.conv2d(x_flat, w_flat)
            w_flat2 = R.reshape(w_live, (8, 16, 1, 1))
            gx_flat = R.nn.conv2d_transpose(gy, w_flat2, kernel_layout="IOHW")
            gx = R.reshape(gx_flat, (2, 4, 2, 2))
            R.output(y, gx)
        return (y, gx)


@I.ir_module
class Dilated:
    """Dilation 2, pad 2 on a 2x2 map by 5 columns: only the centre row is live, and the
    columns keep their taps."""

    @R.function
    def main(x: R.Tensor((1, 2, 2, 5), F32), w: R.Tensor((2, 2, 3, 3), F32)):
        with R.dataflow():
            y = R.nn.conv2d(x, w, padding=[2, 2, 2, 2], dilation=[2, 2])
            R.output(y)
        return y


@I.ir_module
class DilatedExpected:
    @R.function
    def main(x: R.Tensor((1, 2, 2, 5), F32), w: R.Tensor((2, 2, 3, 3), F32)):
        with R.dataflow():
            w_live = R.strided_slice(w, axes=[2], begin=[1], end=[2])
            y = R.nn.conv2d(x, w_live, padding=[0, 2, 0, 2], dilation=[2, 2])
            R.output(y)
        return y


@I.ir_module
class AllLive:
    """3x3 pad 1 on 4x4 (and stride 2 on 3x3): every tap reads real input."""

    @R.function
    def main(x: R.Tensor((2, 4, 4, 4), F32), w: R.Tensor((4, 4, 3, 3), F32),
             z: R.Tensor((2, 4, 3, 3), F32)):
        with R.dataflow():
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
            v = R.nn.conv2d(z, w, strides=[2, 2], padding=[1, 1, 1, 1])
            R.output(y, v)
        return (y, v)


@pytest.mark.parametrize("before, expected", [(OneByOne, OneByOneExpected),
                                              (Strided, StridedExpected),
                                              (Dilated, DilatedExpected),
                                              (AllLive, AllLive)],
                         ids=["1x1", "strided", "dilated", "all-live"])
def test_structure(before, expected):
    tvm.ir.assert_structural_equal(DeadTaps()(before), expected)


# -- the rewrite of one axis, against a NumPy conv ----------------------------------------------

def conv1d(x: np.ndarray, w: np.ndarray, stride: int, padding: tuple[int, int],
           dilation: int) -> np.ndarray:
    padded = np.concatenate([np.zeros(padding[0]), x, np.zeros(padding[1])])
    span = (len(w) - 1) * dilation
    return np.array([sum(padded[o + k * dilation] * w[k] for k in range(len(w)))
                     for o in range(0, len(padded) - span, stride)])


def conv1d_transpose(g: np.ndarray, w: np.ndarray, stride: int, padding: tuple[int, int],
                     output_padding: int, dilation: int) -> np.ndarray:
    full = np.zeros((len(g) - 1) * stride + (len(w) - 1) * dilation + 1 + output_padding)
    for o, k in itertools.product(range(len(g)), range(len(w))):
        full[o * stride + k * dilation] += g[o] * w[k]
    return full[padding[0]:len(full) - padding[1]]


GEOMETRIES = list(itertools.product([1, 3, 5], [1, 2, 3, 5], [1, 2, 3], [0, 1, 2, 4], [0, 1, 2],
                                    [1, 2]))


def test_live_taps():
    assert live_taps(3, 1, 1, 1, 1, 1) == [1]
    assert live_taps(3, 1, 2, 2, 1, 1) == [1, 2]
    assert live_taps(3, 4, 4, 1, 1, 1) == [0, 1, 2]


def test_conv_axis_matches_numpy():
    """Every (kernel, input, stride, pad, extra end pad, dilation) with a valid output: the
    pruned axis computes the same output, and prunes whenever a tap is dead and the
    dilation is 1."""
    rng = np.random.default_rng(0)
    pruned = 0
    for kernel, size, stride, pad, extra, dilation in GEOMETRIES:
        padding = (pad, pad + extra)
        if size + sum(padding) < (kernel - 1) * dilation + 1:
            continue
        x, w = rng.normal(size=size), rng.normal(size=kernel)
        y = conv1d(x, w, stride, padding, dilation)
        live = live_taps(kernel, len(y), size, stride, pad, dilation)
        prune = prune_conv_axis(kernel, size, len(y), stride, padding, dilation)
        if prune is None:
            assert dilation > 1 or not live or (live[0], live[-1]) == (0, kernel - 1)
            continue
        pruned += 1
        assert prune.begin == live[0] and prune.end == live[-1] + 1
        got = conv1d(x, w[prune.begin:prune.end], stride, prune.padding, dilation)
        np.testing.assert_allclose(got, y, atol=1e-12, err_msg=str(prune))
    assert pruned > 50


def test_transpose_axis_matches_numpy():
    """conv2d_transpose as BP's grad_x builds it for the same geometries."""
    rng = np.random.default_rng(1)
    pruned = 0
    for kernel, size, stride, pad, extra, dilation in GEOMETRIES:
        padding = (pad, pad + extra)
        if size + sum(padding) < (kernel - 1) * dilation + 1 or max(padding) > (
                kernel - 1) * dilation:
            continue
        size_out = (size + sum(padding) - (kernel - 1) * dilation - 1) // stride + 1
        output_padding = size - ((size_out - 1) * stride - sum(padding)
                                 + (kernel - 1) * dilation + 1)
        if output_padding >= stride:
            continue
        g, w = rng.normal(size=size_out), rng.normal(size=kernel)
        gx = conv1d_transpose(g, w, stride, padding, output_padding, dilation)
        assert len(gx) == size
        prune = prune_transpose_axis(kernel, size_out, size, stride, padding, dilation)
        if prune is None:
            continue
        pruned += 1
        got = conv1d_transpose(g, w[prune.begin:prune.end], stride, prune.padding,
                               prune.output_padding, dilation)
        np.testing.assert_allclose(got, gx, atol=1e-12, err_msg=str(prune))
    assert pruned > 30


# -- compiled convs against PyTorch --------------------------------------------------------------

#: x shape, w shape, stride, padding, dilation, groups
CONVS = {
    "1x1": ((2, 4, 1, 1), (8, 4, 3, 3), 1, 1, 1, 1),
    "strided": ((2, 4, 2, 2), (8, 4, 3, 3), 2, 1, 1, 1),
    "depthwise": ((2, 8, 1, 1), (8, 1, 3, 3), 1, 1, 1, 8),
    "dilated": ((1, 2, 2, 5), (2, 2, 3, 3), 1, 2, 2, 1),
    "grouped-5x5": ((2, 4, 1, 3), (6, 2, 5, 5), 1, 2, 1, 2),
}


def conv_and_grad_input(name: str, case: tuple) -> tuple[relax.Function, list[int]]:
    """y = conv2d(x, w) and its BP grad_x = conv2d_transpose(gy, w), as conv_backward emits
    it, and that grad_x's output padding."""
    x_shape, w_shape, stride, pad, dilation, groups = case
    x, w = relax.Var("x", relax.TensorType(x_shape, F32)), relax.Var("w", relax.TensorType(
        w_shape, F32))
    conv = relax.op.nn.conv2d(x, w, stride, pad, dilation, groups)
    y_shape = [int(d) for d in relax.BlockBuilder().normalize(conv).ty.shape]
    gy = relax.Var("gy", relax.TensorType(y_shape, F32))
    output_padding = [x_shape[2 + a] - ((y_shape[2 + a] - 1) * stride - 2 * pad
                                        + dilation * (w_shape[2 + a] - 1) + 1) for a in (0, 1)]
    bb = relax.BlockBuilder()
    with bb.function(name, [x, w, gy]):
        with bb.dataflow():
            y = bb.emit(conv)
            gx = bb.emit(relax.op.nn.conv2d_transpose(gy, w, stride, pad, output_padding,
                                                      dilation, groups, kernel_layout="IOHW"))
            out = bb.emit_output(relax.Tuple([y, gx]))
        bb.emit_func_output(out)
    return bb.get()[name], output_padding


def test_compiled_convs_match_pytorch():
    functions, output_paddings = {}, {}
    for name, case in CONVS.items():
        functions[name], output_paddings[name] = conv_and_grad_input(name, case)
    after = DeadTaps()(tvm.IRModule({relax.GlobalVar(n): f for n, f in functions.items()}))
    vm = relax.VirtualMachine(tvm.compile(after, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    rng = np.random.default_rng(2)
    for name, (x_shape, w_shape, stride, pad, dilation, groups) in CONVS.items():
        sliced = [b.value.ty.shape for b in after[name].body.blocks[0].bindings
                  if isinstance(b.value, relax.Call) and b.value.op.name == "relax.strided_slice"]
        assert len(sliced) == 1, name
        x, w = (rng.normal(size=s).astype(F32) for s in (x_shape, w_shape))
        y = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), None, stride,
                                       pad, dilation, groups)
        gy = rng.normal(size=y.shape).astype(F32)
        gx = torch.nn.functional.conv_transpose2d(torch.from_numpy(gy), torch.from_numpy(w),
                                                  None, stride, pad, output_paddings[name],
                                                  groups, dilation)
        got_y, got_gx = vm[name](*(tvm.runtime.tensor(a) for a in (x, w, gy)))
        np.testing.assert_allclose(got_y.numpy(), y.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got_gx.numpy(), gx.numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=name)


# -- a compiled train step whose last convs run on 1x1 maps --------------------------------------

class ShrinkingNet(nn.Module):
    """8x8 input, three stride-2 convs down to 1x1, then a dense and a depthwise 3x3 conv on
    the 1x1 map (ResNet-18's layer4 and MobileNetV2's last depthwise conv at 32x32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv5 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            x = torch.relu(conv(x))
        return self.fc(x.flatten(1))


def weight_reads(func: relax.Function) -> list[tuple[str, str, tuple[int, ...]]]:
    """(op, parameter, shape read) for every conv of ``func`` whose kernel is a parameter,
    directly or through a strided_slice (and a reshape)."""
    values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    params = set(func.params)
    reads = []
    for value in values.values():
        if not (isinstance(value, relax.Call) and value.op.name in (
                "relax.nn.conv2d", "relax.nn.conv2d_transpose")):
            continue
        kernel = value.args[1]
        source = values.get(kernel)
        if isinstance(source, relax.Call) and source.op.name == "relax.reshape":
            source = values.get(source.args[0])
        if isinstance(source, relax.Call) and source.op.name == "relax.strided_slice":
            source = source.args[0]
        if kernel in params or source in params:
            name = kernel.name if kernel in params else source.name
            reads.append((value.op.name, name, tuple(int(d) for d in kernel.ty.shape)))
    return reads


@pytest.fixture(scope="module")
def shrinking_net(tmp_path_factory):
    torch.manual_seed(0)
    model = ShrinkingNet()
    return model, export(model, tmp_path_factory.mktemp("deadtaps") / "model.onnx", 8)


def test_train_step_reads_only_live_taps(shrinking_net):
    _, path = shrinking_net
    program = build_program(path, batch_size=2)
    mod = program.mod
    reads = set(weight_reads(mod["train_step"]))
    assert {("relax.nn.conv2d", "conv3.weight", (16, 64, 1, 1)),
            ("relax.nn.conv2d", "conv4.weight", (16, 16, 1, 1)),
            ("relax.nn.conv2d", "conv5.weight", (16, 1, 1, 1)),
            ("relax.nn.conv2d_transpose", "conv3.weight", (16, 64, 1, 1)),
            ("relax.nn.conv2d_transpose", "conv4.weight", (16, 16, 1, 1)),
            ("relax.nn.conv2d_transpose", "conv5.weight", (16, 1, 1, 1))} <= reads
    assert ("relax.nn.conv2d", "conv2.weight", (16, 8, 3, 3)) in reads
    assert set(weight_reads(mod["predict"])) == {
        r for r in reads if r[0] == "relax.nn.conv2d"}
    # the weight gradients keep the full kernel: the updated parameters have its shape
    updated = dict(zip(program.info["trainable"], mod["train_step"].ret_ty.fields[1].fields))
    assert tuple(int(d) for d in updated["conv4.weight"].shape) == (16, 16, 3, 3)
    assert tuple(int(d) for d in updated["conv5.weight"].shape) == (16, 1, 3, 3)


def test_pruned_bp_step_matches_autograd(shrinking_net):
    model, path = shrinking_net
    check_parity(model, path, "all", "sgd", image_size=8, schedules=False)


def test_pruned_gf_step_matches_reference(shrinking_net):
    model, path = shrinking_net
    check_parity(model, path, "all", "sgd", image_size=8, schedules=False,
                 filter=gftvm.GradientFilter(2, "last:3"))


def test_dead_taps_of_bp_weight_gradients_are_exact_zeros(shrinking_net, tmp_path):
    """Plain SGD: w -= lr·grad leaves a tap bit-exact iff its gradient is exactly zero."""
    _, path = shrinking_net
    gftvm.compile(path, batch_size=2, optimizer="sgd", lr=0.5, schedules=False).save(
        tmp_path / "art")
    session = gftvm.runtime.load(tmp_path / "art")
    before = session.parameters()
    session.step(*random_batches(1, 2, 8)[0])
    after = session.parameters()
    dead = np.ones((3, 3), bool)
    dead[1, 1] = False
    for name in ("conv4.weight", "conv5.weight"):
        assert after[name].shape == before[name].shape
        assert np.array_equal(after[name][..., dead], before[name][..., dead]), name
        assert not np.allclose(after[name][..., 1, 1], before[name][..., 1, 1]), name
