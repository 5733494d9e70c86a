"""Independent references for the tests: the same training steps in PyTorch autograd."""

from __future__ import annotations

import copy
import socket
import tempfile

import numpy as np
import torch
from torch import nn

import gftvm
from gftvm import models
from gftvm.reference import filter_convs


def prepared_model(name: str, seed: int = 0, image_size: int = 32) -> nn.Module:
    """A zoo model with seeded weights and BN statistics calibrated on random images, so that
    activations (and therefore gradients) are far from zero at every depth.

    A random network has many dead channels, whose calibrated variance is ~0, so their BN
    multiplies gradients by up to 1/sqrt(eps). The variance floor keeps the test model as well
    conditioned as a trained one; otherwise float rounding, in PyTorch as in gftvm, grows
    exponentially with depth over a few steps."""
    torch.manual_seed(seed)
    model = models.build(name)
    models.calibrate_batchnorm(model, torch.randn(16, 3, image_size, image_size))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.clamp_(min=0.1)
    return model


def export(model: nn.Module, path, image_size: int = 32):
    models.export_onnx(model, path, (1, 3, image_size, image_size))
    return path


def torch_optimizer(params: list[nn.Parameter], manifest_optimizer: dict) -> torch.optim.Optimizer:
    config = dict(manifest_optimizer)
    name = config.pop("name")
    if name == "adam":
        return torch.optim.Adam(params, lr=config["lr"], betas=tuple(config["betas"]),
                                eps=config["eps"], weight_decay=config["weight_decay"])
    return torch.optim.SGD(params, **config)


def torch_steps(model: nn.Module, trainable: list[str], optimizer: dict,
                batches: list[tuple[np.ndarray, np.ndarray]], batch_statistics: bool = False
                ) -> tuple[list[float], dict]:
    """Train ``trainable`` parameters of ``model`` on ``batches``, BN in eval mode (or on batch
    statistics, as ORT's training graphs do); return the losses and the final state_dict as
    numpy arrays."""
    model.train(batch_statistics)
    named = dict(model.named_parameters())
    for name, param in named.items():
        param.requires_grad_(name in trainable)
    opt = torch_optimizer([named[name] for name in trainable], optimizer)
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def random_batches(count: int, batch: int, image_size: int = 32, classes: int = 10,
                   seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(batch, 3, image_size, image_size)).astype(np.float32),
             rng.integers(0, classes, batch).astype(np.int64)) for _ in range(count)]


OPTIMIZERS = {
    "sgd": dict(optimizer="sgd", lr=5e-4, momentum=0.9, weight_decay=1e-4),
    # Without momentum, a larger step: the optimizer whose BatchNorm-scale updates of filtered
    # layers HoistStateUpdates moves down. This checks the values only; the order is checked
    # in tests/test_hoist_updates.py and tests/test_inplace_update.py.
    "sgd-plain": dict(optimizer="sgd", lr=0.1, weight_decay=1e-4),
    # Adam's step is lr * g / (|g| + eps): for a gradient within float rounding of zero it
    # turns rounding noise into a full step, in any two implementations. A large eps (and no
    # weight decay, whose g + wd*p can cancel) bounds that sensitivity to lr/eps.
    "adam": dict(optimizer="adam", lr=1e-4, eps=1e-2),
}
BATCH = 4
#: How the shared ``artifact_dir`` fixture compiles MCUNet.
ARTIFACT_OPTIONS = dict(trainable="last:4", batch_size=4, optimizer="sgd", lr=0.01, momentum=0.9)


def check_parity(model: nn.Module, path, trainable, optimizer: str, image_size: int = 32,
                 steps: int = 3, filter: gftvm.GradientFilter | None = None,
                 schedules=True, atol: float = 1e-5) -> gftvm.runtime.Session:
    """Compile ``path`` (exported from ``model``, with the tuning database ``schedules``), train
    ``steps`` steps, and check loss and parameters against PyTorch autograd (with the eager
    gradient filter when ``filter``); parameters within ``atol`` (and rtol 1e-4)."""
    # A directory of its own: a process cannot load a second library from one path.
    directory = tempfile.mkdtemp(prefix="art-", dir=path.parent)
    gftvm.compile(path, trainable=trainable, batch_size=BATCH, filter=filter,
                  schedules=schedules, **OPTIMIZERS[optimizer]).save(directory)
    session = gftvm.runtime.load(directory)
    model = copy.deepcopy(model)
    if filter is not None:
        plan = session.manifest["gradient_filter"]["plan"]
        filter_convs(model, {layer["weight"].removesuffix(".weight"): layer["patch"]
                             for layer in plan})
    initial = session.parameters()
    batches = random_batches(steps, BATCH, image_size)
    losses = [session.step(x, y) for x, y in batches]

    expected_losses, expected = torch_steps(model, session.manifest["trainable"],
                                            session.manifest["optimizer"], batches)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4, atol=1e-5)
    trained = set(session.manifest["trainable"])
    for name, value in session.parameters().items():
        if name in trained:
            np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=atol,
                                       err_msg=name)
            assert np.array_equal(value, initial[name]) == np.array_equal(
                expected[name], initial[name]), f"{name} updated in only one of the two"
        else:
            assert np.array_equal(value, initial[name]), f"frozen {name} changed"
    assert any(not np.array_equal(value, initial[name])
               for name, value in session.parameters().items())
    return session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
