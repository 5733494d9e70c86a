"""Analytical per-layer cost features and hardware models fitted to measured latencies.

Per conv/linear layer ``l``: MACs, parameter bytes (weights and BN affine + statistics, fp32),
activation bytes (input read + output written, fp32) and one layer. Latency is modelled as

    latency = c_mac·ΣMACs + c_param·Σparam_bytes + c_act·Σact_bytes + c_layer·#layers + c_0,

linear in the coefficients, so a whole network's latency is the sum of its layers' and the
coefficients are fitted by non-negative least squares to latencies of whole gftvm-compiled
networks. :func:`features` gives the sums in closed form from (w, d, t) (vectorised, valid for
relaxed non-integer values, which the optimiser needs); :func:`layer_features` lists them per
layer from a PyTorch model, which the tests compare against the closed form.

Memory is modelled, not fitted: parameter bytes + the largest cell working set (every output of
the cell kept for later skips, plus the gathered skip channels). Energy is modelled only, from
per-operation energies of a 45 nm process (Horowitz, ISSCC 2014): 4.6 pJ per fp32 MAC,
160 pJ per DRAM byte; nothing here measures energy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls
from torch import nn

from .space import resolutions

FLOAT_BYTES = 4
FEATURES = ("macs", "param_bytes", "act_bytes", "layers", "const")
PJ_PER_MAC, PJ_PER_BYTE = 4.6, 160.0


def features(widths: np.ndarray, depths: np.ndarray, skips: np.ndarray, batch: int = 1,
             image_size: int = 32, num_classes: int = 10) -> np.ndarray:
    """Summed per-layer features (last axis: :data:`FEATURES`) of networks given by per-cell
    arrays of shape (..., cells)."""
    w, d, t = (np.asarray(v, float) for v in (widths, depths, skips))
    area = np.asarray(resolutions(w.shape[-1], image_size), float) ** 2
    cin_entry = np.concatenate([np.full(w.shape[:-1] + (1,), 3.0), w[..., :-1]], axis=-1)
    k2_entry = np.where(np.arange(w.shape[-1]) == 0, 9.0, 1.0)
    reads = d * w + (d - 1) * t                     # input channels summed over the layers
    macs = area * w * (k2_entry * cin_entry + 9 * reads)
    params = w * (k2_entry * cin_entry + 4) + w * (9 * reads + 4 * d)
    act = area * (cin_entry + w + reads + d * w)
    head = w[..., -1] * num_classes
    total = np.stack([
        batch * (macs.sum(-1) + head),
        FLOAT_BYTES * (params.sum(-1) + head + num_classes),
        FLOAT_BYTES * batch * (act.sum(-1) + w[..., -1] + num_classes),
        w.shape[-1] + d.sum(-1) + 1,
        np.ones(w.shape[:-1])], axis=-1)
    return total


def layer_features(model: nn.Module, input_shape: tuple[int, ...]) -> np.ndarray:
    """Per-layer features (rows: conv/linear layers in execution order) of a PyTorch model,
    from its modules and the shapes of one forward pass."""
    import torch

    rows, hooks, bn_params = [], [], {}

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        weight = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        per_out = module.weight[0].numel()
        rows.append([output.numel() * per_out, FLOAT_BYTES * (weight + bn_params[module]),
                     FLOAT_BYTES * (inputs[0].numel() + output.numel()), 1, 0])

    modules = list(model.modules())
    for module, following in zip(modules, modules[1:] + [None]):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            # A BatchNorm right after a conv holds its scale, shift, mean and variance.
            bn_params[module] = 4 * following.num_features if isinstance(
                following, nn.BatchNorm2d) else 0
            hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        model.eval()(torch.zeros(input_shape))
    for hook in hooks:
        hook.remove()
    return np.asarray(rows, float)


def cell_working_bytes(widths: np.ndarray, depths: np.ndarray, skips: np.ndarray,
                       batch: int = 1, image_size: int = 32) -> np.ndarray:
    """Activation bytes live while each cell runs (last axis: cells): its entry and layer
    outputs, kept for later skips, plus the gathered skip channels."""
    w, d, t = (np.asarray(v, float) for v in (widths, depths, skips))
    area = np.asarray(resolutions(w.shape[-1], image_size), float) ** 2
    return FLOAT_BYTES * batch * area * (w * (d + 1) + t)


def memory_bytes(widths: np.ndarray, depths: np.ndarray, skips: np.ndarray, batch: int = 1,
                 image_size: int = 32, param_bytes: np.ndarray | None = None) -> np.ndarray:
    """Modelled peak memory of inference: all parameters + the largest cell working set
    (``param_bytes``: the features' parameter bytes, when already computed)."""
    if param_bytes is None:
        param_bytes = features(widths, depths, skips, batch, image_size)[..., 1]
    return param_bytes + cell_working_bytes(widths, depths, skips, batch, image_size).max(-1)


def energy_mj(feature_rows: np.ndarray) -> np.ndarray:
    """Modelled energy (mJ): MACs and DRAM traffic (parameter + activation bytes)."""
    f = np.asarray(feature_rows, float)
    return (PJ_PER_MAC * f[..., 0] + PJ_PER_BYTE * (f[..., 1] + f[..., 2])) * 1e-9


@dataclass
class LatencyModel:
    """Latency in ms = features · coefficients (non-negative, fitted by NNLS)."""

    coefficients: np.ndarray

    @classmethod
    def fit(cls, feature_rows: np.ndarray, latency_ms: np.ndarray) -> LatencyModel:
        """NNLS on relative errors (each row divided by its latency: small and large networks
        count alike, as in the MAPE), features scaled to unit columns (they span ~10 orders
        of magnitude)."""
        a = np.asarray(feature_rows, float)
        y = np.asarray(latency_ms, float)
        scale = np.abs(a).max(axis=0)
        scale[scale == 0] = 1.0
        solution, _ = nnls(a / scale / y[:, None], np.ones_like(y))
        return cls(solution / scale)

    def predict(self, feature_rows: np.ndarray) -> np.ndarray:
        return np.asarray(feature_rows, float) @ self.coefficients

    def to_json(self) -> dict:
        return dict(zip(FEATURES, map(float, self.coefficients)))


def mape(predicted: np.ndarray, measured: np.ndarray) -> float:
    """Mean absolute percentage error."""
    measured = np.asarray(measured, float)
    return float(np.mean(np.abs(np.asarray(predicted) - measured) / measured) * 100)
