"""Winograd: which convs it rewrites (Before/Expected), and their numbers against PyTorch."""

import textwrap

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.script import ir as I, relax as R, tirx as T

from gftvm import targets, tuning
from gftvm.compiler import build_program
from gftvm.passes import winograd
from gftvm.passes.default_schedule import vector_lanes
from gftvm.passes.winograd import Winograd
from reference import check_parity, export, prepared_model

#: Two cores, as CI has: the block plan depends on the core count.
HOST = tvm.target.Target({**targets.get("host").tvm_target().export(), "num-cores": 2})


def conv_module(x_shape, w_shape, **attrs) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    w = relax.Var("w", relax.TensorType(w_shape, "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, w, **attrs))
        bb.emit_func_output(out)
    return bb.get()


def rewrite(mod: tvm.IRModule) -> tvm.IRModule:
    with HOST:
        return Winograd()(mod)


@pytest.fixture
def every_size(monkeypatch):
    """Rewrite small convs too (the pass leaves convs with little work per weight, or few
    channels per tile row, alone)."""
    monkeypatch.setattr(winograd, "MIN_MACS_PER_WEIGHT", 1)
    monkeypatch.setattr(winograd, "MIN_PRODUCTS_PER_TRANSFORM", 1)


def test_rewrite(every_size):
    # 2 images of 7x9: 2 x 3 tiles each, the last tile row and column partly padding.
    rows, tv = winograd.block_plan(2, 5, 12, 2, 3, vector_lanes(HOST), 2)
    kernels = (winograd.weight_kernel(12, 5, vector_lanes(HOST)) + "\n"
               + winograd.conv_kernel(2, 5, 12, 2, 3, rows, tv))
    expected = tvm.script.from_source("\n".join([
        "@I.ir_module",
        "class Expected:",
        textwrap.indent(kernels, "    "),
        textwrap.indent(textwrap.dedent("""
        @R.function
        def main(x: R.Tensor((2, 5, 7, 9), "float32"), w: R.Tensor((12, 5, 3, 3), "float32")):
            cls = Expected
            with R.dataflow():
                p = R.nn.pad(x, [0, 0, 0, 0, 1, 2, 1, 6])
                r = R.reshape(p, (2, 5, 10, 4, 4))
                d = R.permute_dims(r, [0, 1, 2, 4, 3])
                u = R.call_tir(cls.winograd_weight, (w,), R.Tensor((36, 12, 5), "float32"))
                y = R.call_tir(cls.winograd_conv, (d, u), R.Tensor((2, 12, 8, 12), "float32"))
                gv = R.strided_slice(y, [2, 3], [0, 0], [7, 9])
                R.output(gv)
            return gv
        """), "    ")]), extra_vars={"I": I, "R": R, "T": T})
    tvm.ir.assert_structural_equal(rewrite(conv_module((2, 5, 7, 9), (12, 5, 3, 3), padding=1)),
                                   expected)


@pytest.mark.parametrize("attrs, w_shape", [
    ({"padding": 1, "strides": 2}, (8, 4, 3, 3)),
    ({"padding": 1, "dilation": 2}, (8, 4, 3, 3)),
    ({"padding": 0}, (8, 4, 3, 3)),
    ({"padding": 1, "groups": 2}, (8, 2, 3, 3)),
    ({"padding": 0}, (8, 4, 1, 1)),
    ({"padding": 1, "data_layout": "NHWC", "kernel_layout": "OHWI"}, (8, 3, 3, 4)),
])
def test_other_convs_stay_direct(every_size, attrs, w_shape):
    x_shape = (1, 16, 16, 4) if attrs.get("data_layout") == "NHWC" else (1, 4, 16, 16)
    before = conv_module(x_shape, w_shape, **attrs)
    tvm.ir.assert_structural_equal(rewrite(before), before)


def test_little_work_per_weight_stays_direct():
    # ResNet-18's layer4 on 32x32 inputs: 1x1 maps, 8 multiply-adds per weight element.
    before = conv_module((8, 64, 1, 1), (64, 64, 3, 3), padding=1)
    tvm.ir.assert_structural_equal(rewrite(before), before)


@pytest.mark.parametrize("x_shape, rewritten", [
    ((32, 64, 8, 8), False),     # ResNet-18's layer1 at 32x32, batch 32: 2 tiles per row
    ((8, 64, 16, 16), False),
    ((32, 256, 8, 8), True),     # more channels pay for the narrow rows
    ((8, 128, 16, 16), True),
    ((8, 64, 32, 32), True),
])
def test_few_channels_per_tile_row_stay_direct(x_shape, rewritten):
    before = conv_module(x_shape, (x_shape[1],) * 2 + (3, 3), padding=1)
    assert any("winograd" in gvar.name_hint for gvar in rewrite(before).functions) == rewritten


@pytest.mark.parametrize("x_shape, k", [
    ((2, 5, 7, 9), 12),     # partial tiles, a register tile of 4 channels
    ((8, 16, 8, 8), 16),    # one block per image
    ((3, 8, 20, 12), 24),   # several tile rows per block
    ((1, 3, 1, 2), 8),      # a map smaller than a tile
    ((2, 40, 8, 8), 16),    # weight transform in several vectors of channels
])
def test_matches_torch(every_size, x_shape, k):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype("float32")
    w = rng.standard_normal((k, x_shape[1], 3, 3)).astype("float32")
    after = rewrite(conv_module(x.shape, w.shape, padding=1))
    assert "winograd_conv" in [gv.name_hint for gv in after.functions]
    executable, _ = tuning.compile_module(after, HOST, None)
    y = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x),
                                                            tvm.runtime.tensor(w)).numpy()
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                     padding=1).numpy()
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_tuning_leaves_the_written_kernels_out(every_size):
    mod = conv_module((8, 16, 16, 16), (16, 16, 3, 3), padding=1)
    assert any("winograd" in gvar.name_hint for gvar in tuning.lower(mod, HOST).functions)
    names = [task.task_name for task in tuning.extract_tasks([mod], HOST)]
    assert names and not [name for name in names if "winograd" in name]


def test_written_kernels_do_not_count_as_tuned(every_size):
    """The manifest's tuned_kernels counts records applied, not Winograd's written kernels."""
    mod = conv_module((8, 16, 16, 16), (16, 16, 3, 3), padding=1)
    assert any("winograd" in gvar.name_hint for gvar in tuning.lower(mod, HOST).functions)
    _, tuned = tuning.compile_module(mod, HOST, ms.database.MemoryDatabase())
    assert tuned == 0


def test_train_step_matches_pytorch(tmp_path):
    # ResNet-18 at 128x128, batch 4: layer1's convs (32x32 maps) pass both thresholds.
    model = prepared_model("resnet18", image_size=128)
    path = export(model, tmp_path / "model.onnx", image_size=128)
    program = build_program(path, "all", batch_size=4)
    kernels = [gv.name_hint for gv in tuning.lower(program.built.mod, HOST).functions]
    assert "winograd_conv" in kernels
    # Winograd's rounding: after two steps a few of conv1's weights differ from PyTorch's by
    # 1.2e-5 (direct convs stay within the parity tests' 1e-5).
    check_parity(model, path, "all", "sgd", image_size=128, steps=2, atol=3e-5)
