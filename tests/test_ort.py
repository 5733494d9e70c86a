"""The onnxruntime-training frontend: gftvm-compiled artifacts against ORT's own training API
(step for step), the gradient filter on an ORT artifact against the eager reference,
checkpoints both ways, and errors."""

import copy

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnxruntime.training import api as ort_api
from torch import nn

import gftvm
from gftvm.analysis import conv_calls, saved_for_backward
from gftvm.filter import resolve_plan
from gftvm.frontend import ort
from gftvm.reference import filter_convs
from reference import BATCH, prepared_model, random_batches

onnxruntime.set_default_logger_severity(3)
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


def make_artifact(directory, name, optimizer):
    model = well_conditioned(prepared_model(name))
    ort.generate_artifacts(copy.deepcopy(model), directory, SHAPE, optimizer,
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
    """3 steps from the same checkpoint: losses and every parameter agree with ORT."""
    make_artifact(tmp_path / "ort", name, optimizer)
    batches = random_batches(3, BATCH)
    lr = LR[name, optimizer]
    losses, initial, session = gftvm_steps(tmp_path / "ort", lr, batches, tmp_path / "art")
    expected_losses, expected = ort_steps(tmp_path / "ort", lr, batches)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4, atol=1e-5)
    params = session.parameters()
    assert set(params) == set(expected)
    trained = set(session.manifest["trainable"])
    assert trained and trained < set(params)      # BN running statistics are frozen
    for name_, value in params.items():
        np.testing.assert_allclose(value, expected[name_], rtol=1e-4, atol=1e-5, err_msg=name_)
        if name_ not in trained:
            assert np.array_equal(value, initial[name_]), name_
    assert sum(not np.array_equal(params[n], initial[n]) for n in trained) > len(trained) // 2
    assert session.manifest["optimizer"]["name"] == optimizer


def test_predict_uses_running_statistics(tmp_path):
    """predict (from eval_model.onnx) = the PyTorch model in eval mode."""
    model = make_artifact(tmp_path / "ort", "mcunet", "sgd")
    gftvm.compile(tmp_path / "ort").save(tmp_path / "art")
    x, _ = random_batches(1, BATCH)[0]
    logits = gftvm.runtime.load(tmp_path / "art").predict(x)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
