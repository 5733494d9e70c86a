"""Compiled train steps match PyTorch autograd doing the same steps."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import gftvm
from reference import check_parity, export, prepared_model


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("trainable", ["all", "last:4"])
@pytest.mark.parametrize("name", ["mobilenetv2-0.35", "resnet18", "mcunet"])
def test_zoo_matches_pytorch(name, trainable, optimizer, tmp_path):
    model = prepared_model(name)
    path = export(model, tmp_path / "model.onnx")
    session = check_parity(model, path, trainable, optimizer)
    if trainable == "last:4":
        assert len(session.manifest["trainable"]) < len(session.manifest["params"])


def pad_clip_model(path) -> nn.Module:
    """ONNX Pad -> Conv -> Clip -> GlobalAveragePool -> Gemm, written by hand (TVM's importer
    lowers Pad and Clip to call_tir, which Relax cannot differentiate), and the same net in
    PyTorch with the same weights."""
    torch.manual_seed(0)
    conv, fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 10)
    tensor = lambda name, value: numpy_helper.from_array(value.detach().numpy(), name)
    graph = helper.make_graph(
        [helper.make_node("Pad", ["input", "pads"], ["padded"], mode="constant"),
         helper.make_node("Conv", ["padded", "conv.weight", "conv.bias"], ["conv"]),
         helper.make_node("Clip", ["conv", "lo", "hi"], ["clipped"]),
         helper.make_node("GlobalAveragePool", ["clipped"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1)],
        "pad_clip",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 9, 9])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10])],
        [tensor("conv.weight", conv.weight), tensor("conv.bias", conv.bias),
         tensor("fc.weight", fc.weight), tensor("fc.bias", fc.bias),
         numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 1, 2], np.int64), "pads"),
         numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
         numpy_helper.from_array(np.array(0.7, np.float32), "hi")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

    class PadClipNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = conv, fc

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.clamp(self.conv(nn.functional.pad(x, (1, 2, 0, 1))), -0.5, 0.7)
            return self.fc(x.mean((2, 3)))

    return PadClipNet()


def test_pad_and_clip_are_differentiated(tmp_path):
    path = tmp_path / "model.onnx"
    model = pad_clip_model(path)
    session = check_parity(model, path, ["conv.weight", "conv.bias", "fc.weight", "fc.bias"],
                           "sgd", image_size=9)
    assert "lo" not in session.manifest["trainable"]


class Upsample(nn.Module):
    """Nearest upsampling by 2 (an ONNX Resize), which TVM lowers to call_tir."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(self.conv1(x), scale_factor=2, mode="nearest")
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def test_nearest_resize_is_differentiated(tmp_path):
    torch.manual_seed(0)
    model = Upsample()
    check_parity(model, export(model, tmp_path / "model.onnx", 5), "all", "sgd", image_size=5)


def test_bilinear_resize_on_a_trained_path_is_named(tmp_path):
    torch.manual_seed(0)
    model = Upsample()
    model.forward = lambda x: model.fc(nn.functional.interpolate(
        model.conv1(x), scale_factor=2, mode="bilinear").mean((2, 3)))
    path = export(model, tmp_path / "model.onnx", 5)
    with pytest.raises(gftvm.UnsupportedOpError, match=r"Resize.*mode=linear"):
        gftvm.compile(path, trainable="all", batch_size=2)
