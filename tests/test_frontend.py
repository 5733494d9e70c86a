"""Frontend and compiler: bad models, differentiability checks, trainable sets, pruning."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import gftvm
from gftvm import trainable
from gftvm.frontend import onnx as onnx_frontend
from gftvm.train_graph import OptimizerConfig, build_train_module


def test_malformed_and_truncated_onnx(mcunet_onnx, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(gftvm.ModelError, match="garbage.onnx"):
        gftvm.compile(garbage)
    truncated = tmp_path / "truncated.onnx"
    data = mcunet_onnx.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(gftvm.ModelError, match="truncated.onnx"):
        gftvm.compile(truncated)
    with pytest.raises(gftvm.ModelError, match="not found"):
        gftvm.compile(tmp_path / "missing.onnx")


def floor_model() -> onnx.ModelProto:
    """conv -> Floor -> pool -> Gemm: Floor has no gradient."""
    rng = np.random.default_rng(0)
    init = lambda name, *shape: numpy_helper.from_array(
        rng.normal(size=shape).astype(np.float32), name)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "conv.weight"], ["c"], name="conv0", pads=[1] * 4),
         helper.make_node("Floor", ["c"], ["f"], name="floor0"),
         helper.make_node("GlobalAveragePool", ["f"], ["p"], name="pool0"),
         helper.make_node("Flatten", ["p"], ["flat"], name="flatten0"),
         helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc",
                          transB=1)],
        "floor", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10])],
        [init("conv.weight", 4, 3, 3, 3), init("fc.weight", 10, 4), init("fc.bias", 10)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_non_differentiable_op_is_named():
    with pytest.raises(gftvm.UnsupportedOpError, match=r"ai\.onnx::Floor \(node 'floor0'\)"):
        gftvm.compile(floor_model(), trainable="all", batch_size=2)


def test_non_differentiable_op_before_the_trained_layers_is_fine():
    artifact = gftvm.compile(floor_model(), trainable=["fc.weight", "fc.bias"], batch_size=2)
    assert artifact.manifest["trainable"] == ["fc.weight", "fc.bias"]


def test_unknown_onnx_op_is_named():
    model = floor_model()
    model.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(gftvm.ModelError, match="(?s)NoSuchOp.*floor0"):
        gftvm.compile(model, trainable=["fc.weight", "fc.bias"], batch_size=2)


@pytest.mark.parametrize("spec, message", [
    ("last:0", "positive integer"), ("last:x", "positive integer"), ("last:99", "only 30 Conv"),
    ("some", "expected 'all'"), (["nope"], r"\['nope'\] are not learnable"),
    (["features.0.1.running_mean"], "not learnable"),
])
def test_bad_trainable_specs(mcunet_onnx, spec, message):
    with pytest.raises(gftvm.ConfigError, match=message):
        gftvm.compile(mcunet_onnx, trainable=spec)


def test_bad_options(mcunet_onnx):
    with pytest.raises(gftvm.ConfigError, match="optimizer='rmsprop'"):
        gftvm.compile(mcunet_onnx, optimizer="rmsprop")
    with pytest.raises(gftvm.ConfigError, match="target='tpu'"):
        gftvm.compile(mcunet_onnx, target="tpu")


def test_last_k_selects_conv_layers_and_everything_after(mcunet_onnx):
    proto = onnx.load(mcunet_onnx)
    names = trainable.resolve(proto, "last:2")
    # The last two convs of MCUNet are the depthwise and projection convs of the last block,
    # each with its BatchNorm, then the classifier.
    assert names == ["features.10.conv.1.0.weight", "features.10.conv.1.1.weight",
                     "features.10.conv.1.1.bias", "features.10.conv.2.weight",
                     "features.10.conv.3.weight", "features.10.conv.3.bias",
                     "classifier.weight", "classifier.bias"]
    everything = trainable.resolve(proto, "all")
    assert not any("running" in name for name in everything)
    assert len(everything) == 30 + 2 * 30 + 2


@pytest.mark.parametrize("count", [1, 2, 4])
def test_frozen_layers_get_no_gradient_code(mcunet_onnx, count):
    """Only trained convs get a weight gradient, and only those after the first trained one
    need an input gradient (conv2d_transpose); frozen layers keep their forward convs only."""
    proto = onnx.load(mcunet_onnx)
    names = trainable.resolve(proto, f"last:{count}")
    forward = onnx_frontend.import_model(proto, 2, "mcunet")
    built = build_train_module(forward, names, 2, OptimizerConfig().build())
    text = built.mod["train_step"].script()
    assert text.count("R.nn.conv2d_transpose(") == count - 1
    # forward convs (30) + one weight-gradient conv per trained layer
    assert text.count("R.nn.conv2d(") == 30 + count


def test_model_input_must_be_a_float_image():
    model = floor_model()
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    with pytest.raises(gftvm.ModelError, match="'input' must be a float32 NCHW image"):
        gftvm.compile(model, batch_size=2)
