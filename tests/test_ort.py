"""The onnxruntime-training frontend: gftvm-compiled artifacts against ORT's own training API
(step for step), the gradient filter on an ORT artifact against the eager reference,
checkpoints both ways, and errors."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import tvm
from onnxruntime.training import api as ort_api
from reference import BATCH, prepared_model, random_batches, torch_steps
from torch import nn

import gftvm
from gftvm.analysis import conv_calls, planned_storage_bytes, saved_for_backward
from gftvm.filter import resolve_plan
from gftvm.frontend import ort
from gftvm.reference import filter_convs

onnxruntime.set_default_logger_severity(3)
TOOLS = Path(__file__).parents[1] / "tools"
SHAPE = (BATCH, 3, 32, 32)
ADAMW = dict(betas=(0.9, 0.999), eps=1e-2, weight_decay=0.01)  # eps: see reference.OPTIMIZERS
LR = {("mcunet", "sgd"): 1e-3, ("mcunet", "adamw"): 1e-3, ("mobilenetv2-0.35", "sgd"): 0.01,
      ("resnet18", "sgd"): 0.01}
BN_EPS = 0.1


def well_conditioned(model: nn.Module) -> nn.Module:
    """ORT trains BatchNorm on batch statistics. At 32x32 the zoo models end in 1x1 maps, so
    with batch 4 a BN layer normalises 4 values per channel, and channels whose 4 values nearly
    coincide scale their gradient by up to 1/sqrt(eps): with eps=1e-5 the step is chaotic
    (PyTorch float32 and float64 differ by percents after 2-3 steps; gradients reach ~300).
    With eps=0.1 the float32 step is reproducible, so two implementations can be compared."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = BN_EPS
    return model


def make_artifact(directory, name, optimizer, frozen=()):
    model = well_conditioned(prepared_model(name))
    ort.generate_artifacts(copy.deepcopy(model), directory, SHAPE, optimizer, frozen,
                           **(ADAMW if optimizer == "adamw" else {}))
    return model


def ort_steps(directory, lr, batches, checkpoint=None):
    """Train with ORT's training API; return the losses and the final parameters."""
    state = ort_api.CheckpointState.load_checkpoint(str(checkpoint or directory / "checkpoint"))
    module = ort_api.Module(str(directory / "training_model.onnx"), state,
                            str(directory / "eval_model.onnx"))
    optimizer = ort_api.Optimizer(str(directory / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(lr)
    module.train()
    losses = []
    for x, y in batches:
        losses.append(float(module(x, y)))
        optimizer.step()
        module.lazy_reset_grad()
    return losses, {name: np.array(p.data) for name, p in state.parameters}


def gftvm_steps(directory, lr, batches, out, **options):
    gftvm.compile(directory, lr=lr, **options).save(out)
    session = gftvm.runtime.load(out)
    initial = session.parameters()
    return [session.step(x, y) for x, y in batches], initial, session


@pytest.mark.parametrize("name, optimizer", [("mobilenetv2-0.35", "sgd"), ("resnet18", "sgd"),
                                             ("mcunet", "sgd"), ("mcunet", "adamw")])
def test_matches_ort_training(name, optimizer, tmp_path):
    """3 steps from the same checkpoint: losses and every parameter agree with ORT. The AdamW
    artifact also freezes the first five blocks (no gradient, no update in either)."""
    frozen = [n for n, _ in prepared_model(name).named_parameters()
              if optimizer == "adamw" and n.startswith("features.") and int(n.split(".")[1]) < 5]
    make_artifact(tmp_path / "ort", name, optimizer, frozen)
    batches = random_batches(3, BATCH)
    lr = LR[name, optimizer]
    # AdamW normalises each gradient entry, so an entry near zero takes its sign from
    # rounding: summed in another order (the default schedule's rfactor), one weight of
    # features.6.conv.1.0 (ORT's update -1.1e-5, a third of the median) moved +5.8e-6 instead.
    # TVM's naive loops sum in ORT's order (every parameter within 1e-10 of rtol 1e-4), so the
    # translation is compared there; test_default_schedule checks the default schedules
    # against the naive loops, test_parity against PyTorch.
    losses, initial, session = gftvm_steps(tmp_path / "ort", lr, batches, tmp_path / "art",
                                           default_schedule=optimizer != "adamw")
    expected_losses, expected = ort_steps(tmp_path / "ort", lr, batches)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4, atol=1e-5)
    params = session.parameters()
    assert set(params) == set(expected)
    trained = set(session.manifest["trainable"])
    assert trained and trained < set(params)      # BN running statistics are frozen
    assert not trained & set(frozen) and bool(frozen) == (optimizer == "adamw")
    for name_, value in params.items():
        np.testing.assert_allclose(value, expected[name_], rtol=1e-4, atol=1e-5, err_msg=name_)
        if name_ not in trained:
            assert np.array_equal(value, initial[name_]), name_
    assert sum(not np.array_equal(params[n], initial[n]) for n in trained) > len(trained) // 2
    assert session.manifest["optimizer"]["name"] == optimizer


@pytest.fixture(scope="module")
def mcunet_ort(tmp_path_factory):
    """An MCUNet SGD artifact, with the PyTorch model it was exported from."""
    directory = tmp_path_factory.mktemp("mcunet_ort")
    return directory, make_artifact(directory, "mcunet", "sgd")


@pytest.fixture(scope="module")
def mcunet_compiled(mcunet_ort, tmp_path_factory):
    """Compiled with the CLI, as a user does."""
    directory = tmp_path_factory.mktemp("mcunet_art")
    out = subprocess.run([sys.executable, str(TOOLS / "compile.py"), "--from-ort",
                          str(mcunet_ort[0]), "--lr", str(LR["mcunet", "sgd"]), "-o",
                          str(directory)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "trainable  ort: 92 tensors" in out.stdout and "'name': 'sgd'" in out.stdout
    return directory


def test_predict_uses_running_statistics(mcunet_ort, mcunet_compiled):
    """predict (from eval_model.onnx) = the PyTorch model in eval mode: the artifact keeps
    the model's BN statistics, frozen (momentum 1)."""
    training = onnx.load(mcunet_ort[0] / "training_model.onnx")
    momentum = {a.f for n in training.graph.node if n.op_type == "BatchNormInternal"
                for a in n.attribute if a.name == "momentum"}
    assert momentum == {1.0}
    x, _ = random_batches(1, BATCH)[0]
    logits = gftvm.runtime.load(mcunet_compiled).predict(x)
    with torch.no_grad():
        expected = copy.deepcopy(mcunet_ort[1]).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_gradient_filter_matches_eager_reference(mcunet_ort, tmp_path):
    """The ORT artifact compiled with the filter = PyTorch (BN on batch statistics, plain SGD)
    with the eager gradient filter on the same layers; and it differs from exact training."""
    directory, model = mcunet_ort
    lr, batches = LR["mcunet", "sgd"], random_batches(3, BATCH)
    losses, _, session = gftvm_steps(directory, lr, batches, tmp_path / "art",
                                     filter=gftvm.GradientFilter(patch=2, layers="last:2"))
    plan = session.manifest["gradient_filter"]["plan"]
    assert len(plan) == 2
    reference = filter_convs(copy.deepcopy(model), {
        layer["weight"].removesuffix(".weight"): layer["patch"] for layer in plan})
    expected_losses, expected = torch_steps(
        reference, [name for name, _ in reference.named_parameters()],
        {"name": "sgd", "lr": lr}, batches, batch_statistics=True)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4, atol=1e-5)
    params = session.parameters()
    for name in session.manifest["trainable"]:
        np.testing.assert_allclose(params[name], expected[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    _, exact = ort_steps(directory, lr, batches)
    filtered = {layer["weight"] for layer in plan}
    # (at 32x32 the last two layers see 1x1 maps: the pointwise one filters exactly)
    assert any(not np.allclose(params[w], exact[w], rtol=1e-4, atol=1e-5) for w in filtered)


def test_filtered_layers_save_only_the_pooled_input(tmp_path):
    """Read from the differentiated function: filtered convs of the ORT graph no longer keep
    their full-resolution input for the backward, only the pooled one (64x64 input, so that
    the filtered layers' maps are larger than the patch)."""
    model = well_conditioned(prepared_model("mcunet", image_size=64))
    ort.generate_artifacts(model, tmp_path, (2, 3, 64, 64))
    art = ort.load_artifact(tmp_path)
    adjoint = ort.adjoint_module(art, 2)
    trainable = ort.signature(art).trainable
    plan = resolve_plan(art.training, gftvm.GradientFilter(2, "last:16"), trainable,
                        tvm.IRModule({"main": adjoint[ort.ADJOINT]}))
    optimizer = ort.optimizer_of(art, 0.01)
    exact = ort.build_train_module(art, adjoint, optimizer)
    filtered = ort.build_train_module(art, adjoint, optimizer,
                                      {layer.weight: layer.patch for layer in plan})
    saved_bp, saved_gf = saved_for_backward(exact.adjoint), saved_for_backward(filtered.adjoint)
    inputs_bp = {w: call.args[0] for w, call in conv_calls(exact.adjoint).items()}
    inputs_gf = {w: call.args[0] for w, call in conv_calls(filtered.adjoint).items()}
    shapes_gf = [[int(d) for d in var.ty.shape] for var in saved_gf]
    assert len(plan) == 16
    for layer in plan:
        assert inputs_bp[layer.weight] in saved_bp, layer.node
        assert inputs_gf[layer.weight] not in saved_gf, layer.node
        n, c, h, w = layer.input_shape
        blocks = [-(-d // layer.patch) for d in layer.output_shape[2:]]
        assert blocks[0] < h and [n, c, *blocks] in shapes_gf, layer.node
    freed = sum(layer.saved_bytes_bp - layer.saved_bytes_gf for layer in plan)
    assert freed > 0 and sum(saved_gf.values()) <= sum(saved_bp.values()) - freed
    text = filtered.mod["train_step"].script()
    assert "conv2d_grad" not in text and "gf_x_sum" in text
    # The filter's own small tensors cost storage too: with these 16 layers the static memory
    # plan shrinks (with the last 4 alone, 27 KB freed, it grows by 1.4%).
    assert planned_storage_bytes(filtered.mod) < planned_storage_bytes(exact.mod)


def test_checkpoint_round_trip(mcunet_ort, mcunet_compiled, tmp_path):
    """gftvm -> ORT -> gftvm keeps every parameter bit-identical, through the CLI; ORT loads
    the checkpoint gftvm wrote and trains from it."""
    session = gftvm.runtime.load(mcunet_compiled)
    for x, y in random_batches(2, BATCH, seed=1):
        session.step(x, y)
    session.save_checkpoint(tmp_path / "gftvm.npz")
    trained = session.parameters()
    assert run_tool("to-ort", tmp_path / "gftvm.npz", mcunet_ort[0], tmp_path / "ort_ckpt") == 0
    assert run_tool("from-ort", tmp_path / "ort_ckpt", mcunet_compiled, tmp_path / "back.npz") == 0
    fresh = gftvm.runtime.load(mcunet_compiled)
    fresh.load_checkpoint(tmp_path / "back.npz")
    for name, value in fresh.parameters().items():
        assert value.dtype == trained[name].dtype and np.array_equal(value, trained[name]), name
    assert ort.read_checkpoint(tmp_path / "ort_ckpt").keys() == trained.keys()
    batches = random_batches(1, BATCH, seed=2)
    losses, _ = ort_steps(mcunet_ort[0], LR["mcunet", "sgd"], batches, tmp_path / "ort_ckpt")
    assert np.isclose(losses[0], fresh.step(*batches[0]), rtol=1e-4)


def run_tool(*args) -> int:
    return subprocess.run([sys.executable, str(TOOLS / "ort_checkpoint.py"),
                           *map(str, args)]).returncode


class AvgPoolNet(nn.Module):
    """AveragePool (and ORT's AveragePoolGrad) have no gftvm converter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.avg_pool2d(self.conv(x), 2).flatten(1))


def test_artifacts_are_made_without_ort_info_lines(tmp_path, capfd):
    """ORT-training's graph builder would write its INFO lines to stderr; they are dropped."""
    ort.generate_artifacts(AvgPoolNet(), tmp_path, (2, 3, 8, 8))
    assert "[I:onnxruntime:" not in capfd.readouterr().err
    assert (tmp_path / "training_model.onnx").exists()


def test_info_lines_dropped_keep_other_stderr_lines_and_errors(capfd):
    """Only ORT's INFO lines go: other lines written to stderr in the block come out after
    it, also when the block raises, and stderr works as before afterwards."""
    with pytest.raises(RuntimeError, match="boom"):
        with ort.ort_info_lines_dropped():
            os.write(2, b"2026-12-07 [I:onnxruntime:Default, x.cc:1 Apply] info\n")
            os.write(2, b"2026-12-07 [W:onnxruntime:Default, x.cc:2 Run] warning\n")
            print("from python", file=sys.stderr)
            raise RuntimeError("boom")
    os.write(2, b"after\n")
    lines = capfd.readouterr().err.splitlines()
    assert sorted(lines[:-1]) == ["2026-12-07 [W:onnxruntime:Default, x.cc:2 Run] warning",
                                  "from python"]
    assert lines[-1] == "after"


def test_unsupported_op_names_op_node_and_model(tmp_path):
    ort.generate_artifacts(AvgPoolNet(), tmp_path, (2, 3, 8, 8))
    node = next(n.name for n in onnx.load(tmp_path / "training_model.onnx").graph.node
                if n.op_type == "AveragePool")
    with pytest.raises(gftvm.UnsupportedOpError) as err:
        gftvm.compile(tmp_path)
    message = str(err.value)
    assert "ai.onnx::AveragePool" in message and f"'{node}'" in message
    assert str(tmp_path / "training_model.onnx") in message and "Supported:" in message


def test_unsupported_optimizer_names_its_ops(tmp_path):
    ort.generate_artifacts(AvgPoolNet(), tmp_path, (2, 3, 8, 8))
    proto = onnx.load(tmp_path / "optimizer_model.onnx")
    proto.graph.node[0].op_type = "LambOptimizer"
    onnx.save(proto, tmp_path / "optimizer_model.onnx")
    with pytest.raises(gftvm.UnsupportedOpError, match=r"com.microsoft::LambOptimizer .*"
                       r"optimizer_model.onnx|optimizer_model.onnx.*com.microsoft::LambOptimizer"):
        gftvm.compile(tmp_path)


@pytest.mark.parametrize("file, error", [("training_model.onnx", gftvm.ModelError),
                                         ("optimizer_model.onnx", gftvm.ModelError),
                                         ("checkpoint", gftvm.CheckpointError)])
def test_truncated_artifact(mcunet_ort, file, error, tmp_path):
    import shutil

    shutil.copytree(mcunet_ort[0], tmp_path / "ort")
    path = tmp_path / "ort" / file
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(error, match=f"{path}.*truncated"):
        gftvm.compile(tmp_path / "ort")


def test_options_of_the_forward_path_are_refused(mcunet_ort):
    training_model = mcunet_ort[0] / "training_model.onnx"
    assert ort.is_artifact(training_model) and ort.is_artifact(mcunet_ort[0])
    with pytest.raises(gftvm.ConfigError, match=r"\['momentum'\] do not apply"):
        gftvm.compile(training_model, momentum=0.9)
    with pytest.raises(gftvm.ConfigError, match="fixed batch of 4"):
        gftvm.compile(mcunet_ort[0], batch_size=8)


class MatMulNet(nn.Module):
    """MatMul, Sub, Div, ReduceMean, ReLU and the shape ops of their ORT gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.weight = nn.Parameter(torch.randn(4, 10) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return torch.matmul(h, self.weight) - h.sum(1, keepdim=True) / 4


def test_matmul_net_matches_ort(tmp_path):
    torch.manual_seed(0)
    ort.generate_artifacts(MatMulNet(), tmp_path / "ort", (2, 3, 8, 8))
    ops = {n.op_type for n in onnx.load(tmp_path / "ort" / "training_model.onnx").graph.node}
    assert {"MatMul", "Sub", "Div", "ReduceMean", "Neg", "Unsqueeze", "Size"} <= ops
    batches = random_batches(3, 2, image_size=8)
    losses, _, session = gftvm_steps(tmp_path / "ort", 0.05, batches, tmp_path / "art")
    expected_losses, expected = ort_steps(tmp_path / "ort", 0.05, batches)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4, atol=1e-5)
    for name, value in session.parameters().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_refused_variant_names_node_and_model(mcunet_ort, tmp_path):
    import shutil

    shutil.copytree(mcunet_ort[0], tmp_path / "ort")
    path = tmp_path / "ort" / "training_model.onnx"
    proto = onnx.load(path)
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    for attribute in conv.attribute:
        if attribute.name == "auto_pad":
            attribute.s = b"SAME_UPPER"
    onnx.save(proto, path)
    with pytest.raises(gftvm.UnsupportedOpError, match=f"{path}: node '{conv.name}' .*auto_pad"):
        gftvm.compile(tmp_path / "ort")
