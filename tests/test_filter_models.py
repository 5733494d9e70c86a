"""Compiled gradient-filtered train steps: against the eager reference, and what they save."""

import onnx
import pytest
import torch
from torch import nn

import gftvm
from gftvm import trainable as trainable_policy
from gftvm.analysis import conv_calls, planned_storage_bytes, saved_for_backward
from gftvm.filter import resolve_plan
from gftvm.frontend import onnx as onnx_frontend
from gftvm.train_graph import OptimizerConfig, build_train_module
from reference import check_parity, export, prepared_model

IMAGE = 64  # the last stages of the zoo models are then 2x2, where R=2 and R=4 differ


@pytest.mark.parametrize("layers", ["last:2", "last:4"])
@pytest.mark.parametrize("patch", [2, 4])
@pytest.mark.parametrize("name", ["mobilenetv2-0.35", "resnet18", "mcunet"])
def test_filtered_step_matches_reference(name, patch, layers, tmp_path):
    model = prepared_model(name, image_size=IMAGE)
    path = export(model, tmp_path / "model.onnx", IMAGE)
    session = check_parity(model, path, layers, "sgd", image_size=IMAGE,
                           filter=gftvm.GradientFilter(patch, layers))
    plan = session.manifest["gradient_filter"]["plan"]
    assert len(plan) == int(layers[-1]) and all(layer["patch"] == patch for layer in plan)


def test_filtered_step_with_plain_sgd_matches_reference(tmp_path):
    model = prepared_model("mcunet", image_size=IMAGE)
    path = export(model, tmp_path / "model.onnx", IMAGE)
    check_parity(model, path, "last:4", "sgd-plain", image_size=IMAGE,
                 filter=gftvm.GradientFilter(2, "last:4"))


class SmallNet(nn.Module):
    """Three 3x3 convs (one strided, one grouped) on a small odd-sized input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.conv3(x).mean((2, 3)))


@pytest.mark.parametrize("size, patch", [(7, 4), (5, 2)])
def test_odd_map_sizes(size, patch, tmp_path):
    torch.manual_seed(0)
    model = SmallNet()
    path = export(model, tmp_path / "model.onnx", size)
    session = check_parity(model, path, "all", "sgd", image_size=size,
                           filter=gftvm.GradientFilter(patch, "last:3"))
    assert [layer["input_shape"][2] for layer in session.manifest["gradient_filter"]["plan"]] \
        == [size, size, size]


def build(path, layers, patch):
    proto = onnx.load(path)
    names = trainable_policy.resolve(proto, layers)
    forward = onnx_frontend.import_model(proto, 2, str(path))
    plan = resolve_plan(proto, gftvm.GradientFilter(patch, layers), names, forward) \
        if patch else []
    built = build_train_module(forward, names, 2, OptimizerConfig().build(),
                               {layer.weight: layer.patch for layer in plan})
    return built, plan


@pytest.mark.parametrize("name", ["mobilenetv2-0.35", "mcunet"])
def test_filtered_layers_save_only_the_pooled_input(name, tmp_path):
    """Read from the differentiated function itself: for every filtered layer the forward no
    longer keeps x for the backward, and keeps a tensor of the pooled shape instead."""
    path = export(prepared_model(name, image_size=IMAGE), tmp_path / "model.onnx", IMAGE)
    exact, _ = build(path, "last:4", None)
    filtered, plan = build(path, "last:4", 2)
    saved_bp, saved_gf = saved_for_backward(exact.adjoint), saved_for_backward(filtered.adjoint)
    inputs_bp = {w: call.args[0] for w, call in conv_calls(exact.adjoint).items()}
    inputs_gf = {w: call.args[0] for w, call in conv_calls(filtered.adjoint).items()}
    shapes_gf = [[int(d) for d in var.ty.shape] for var in saved_gf]
    for layer in plan:
        assert inputs_bp[layer.weight] in saved_bp, layer.node
        assert inputs_gf[layer.weight] not in saved_gf, layer.node
        n, c, h, w = layer.input_shape
        blocks = [-(-d // layer.patch) for d in layer.output_shape[2:]]
        assert [n, c, *blocks] in shapes_gf, layer.node
    freed = sum(layer.saved_bytes_bp - layer.saved_bytes_gf for layer in plan)
    assert sum(saved_gf.values()) <= sum(saved_bp.values()) - freed
    # And in the compiled step's static memory plan, the filtered step reserves less.
    assert planned_storage_bytes(filtered.mod) < planned_storage_bytes(exact.mod)


def test_first_trained_filtered_layer_computes_no_grad_input(tmp_path):
    path = export(prepared_model("mcunet", image_size=IMAGE), tmp_path / "model.onnx", IMAGE)
    filtered, plan = build(path, "last:2", 2)
    text = filtered.mod["train_step"].script()
    assert [layer.computes_grad_input for layer in plan] == [False, True]
    assert text.count("R.nn.conv2d_transpose(") == 1   # only the second layer's low-res grad_x
    assert "conv2d_grad" not in text


def test_filter_configuration_errors(tmp_path):
    model = prepared_model("mcunet")
    path = export(model, tmp_path / "model.onnx")
    with pytest.raises(gftvm.ConfigError, match="not Conv nodes"):
        gftvm.compile(path, trainable="all", filter=gftvm.GradientFilter(2, ["nope"]))
    with pytest.raises(gftvm.ConfigError, match="is not trained"):
        gftvm.compile(path, trainable="last:1", filter=gftvm.GradientFilter(2, "last:2"))
    with pytest.raises(gftvm.ConfigError, match="positive integers"):
        gftvm.compile(path, trainable="all", filter=gftvm.GradientFilter(0, "last:2"))


def test_dilated_conv_keeps_exact_backward(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 10))
    path = export(model, tmp_path / "model.onnx", 8)
    with pytest.warns(UserWarning, match="dilated; it keeps its exact backward"):
        artifact = gftvm.compile(path, trainable="all", batch_size=2,
                                 filter=gftvm.GradientFilter(2, "last:1"))
    assert artifact.manifest["gradient_filter"]["plan"] == []


def test_conv_backward_macs_in_the_manifest(tmp_path):
    """Counted by hand for SmallNet at 8x8, batch 2, all trained: per conv, forward MACs are
    N·Co·Ho·Wo·(Ci/g)·k²; grad_w costs that for every conv, grad_x for conv2 and conv3."""
    torch.manual_seed(0)
    path = export(SmallNet(), tmp_path / "model.onnx", 8)
    conv1, conv2, conv3 = 2 * 8 * 64 * 3 * 9, 2 * 8 * 64 * 4 * 9, 2 * 16 * 16 * 8 * 9
    exact = gftvm.compile(path, trainable="all", batch_size=2)
    assert exact.manifest["conv_backward_macs"] == conv1 + 2 * conv2 + 2 * conv3
    filtered = gftvm.compile(path, trainable="all", batch_size=2,
                             filter=gftvm.GradientFilter(4, "last:1"))
    low = 2 * 16 * 1 * 8   # conv3 at R=4: its 4x4 output becomes one patch
    assert filtered.manifest["conv_backward_macs"] == conv1 + 2 * conv2 + 2 * low


def test_layers_by_name_and_by_dict(tmp_path):
    torch.manual_seed(0)
    path = export(SmallNet(), tmp_path / "model.onnx", 8)
    convs = [node.name for node in onnx.load(path).graph.node if node.op_type == "Conv"]
    by_list = gftvm.compile(path, trainable="all", batch_size=2,
                            filter=gftvm.GradientFilter(2, [convs[1]]))
    by_dict = gftvm.compile(path, trainable="all", batch_size=2,
                            filter=gftvm.GradientFilter(2, {convs[0]: 4, convs[2]: 2}))
    plan = lambda art: [(l["node"], l["patch"]) for l in art.manifest["gradient_filter"]["plan"]]
    assert plan(by_list) == [(convs[1], 2)]
    assert plan(by_dict) == [(convs[0], 4), (convs[2], 2)]
    assert by_dict.manifest["gradient_filter"]["layers"] == {convs[0]: 4, convs[2]: 2}
