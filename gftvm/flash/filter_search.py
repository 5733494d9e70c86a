"""Beyond FLASH: choose a gradient-filter plan under a train-step latency budget with SHGO.

Plans filter the last K trained conv layers with one patch size R ∈ {2, 4} (the paper's
"last-K" plans). Train-step cost is modelled per layer from the analytical MAC counts of
:func:`gftvm.filter.resolve_plan` and one fitted coefficient, milliseconds per MAC:

    step_ms(K, R) = ms_per_mac · (forward MACs + exact backward MACs
                                  − Σ_{last K layers} (backward MACs_BP − backward MACs_R)).

Filtering approximates the gradient, so the objective is the mildest plan that fits: fewest
filtered layers, then the smaller patch. SHGO minimises ``K + (R == 4) / 2`` over (K, r) relaxed
to [0, n] × [0, 1] (the saving interpolated linearly between integer K) under the budget; the
answer is the best feasible plan among the integers bracketing SHGO's point.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import shgo

from .. import trainable as trainable_policy
from ..analysis import conv_calls
from ..errors import ConfigError
from ..filter import GradientFilter, _macs, resolve_plan
from ..frontend import onnx as onnx_frontend
from .hardware import FEATURES, LatencyModel, features

PATCHES = (2, 4)


@dataclass
class LayerCosts:
    """Per trained conv (topological order): its node and backward MACs exact / at each R."""

    nodes: list[str]
    backward: np.ndarray      # (layers, 1 + len(PATCHES)): BP, then each patch
    forward_macs: int


@dataclass
class FilterChoice:
    layers: int
    patch: int
    modelled_ms: float


def layer_costs(model: onnx_frontend.ModelLike, trainable: trainable_policy.TrainableSpec,
                batch_size: int) -> LayerCosts:
    """MAC counts of every trained conv of ``model`` for exact and filtered backward."""
    proto = onnx_frontend.load_model(model)
    names = trainable_policy.resolve(proto, trainable)
    forward = onnx_frontend.import_model(proto, batch_size, "<filter search>")
    trained = set(names)
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in trained]
    if not convs:
        raise ConfigError("--filter auto: the trainable set has no conv layer to filter")
    plans = [resolve_plan(proto, GradientFilter(r, convs), names, forward) for r in PATCHES]
    by_node = [{layer.node: layer for layer in plan} for plan in plans]
    kept = [n for n in convs if n in by_node[0]]   # dilated convs keep the exact backward
    backward = np.array([[by_node[0][n].backward_macs_bp] +
                         [plan[n].backward_macs_gf for plan in by_node] for n in kept], float)
    forward_macs = sum(_macs(call) for call in conv_calls(forward["main"]).values())
    return LayerCosts(kept, backward, forward_macs)


def _step_ms(costs: LayerCosts, exact_backward: float, ms_per_mac: float, layers: float,
             patch_index: int) -> float:
    """Modelled step time filtering the last ``layers`` (may be fractional) at a patch."""
    saving = np.concatenate([[0.0], np.cumsum(
        (costs.backward[::-1, 0] - costs.backward[::-1, 1 + patch_index]))])
    saved = np.interp(layers, np.arange(len(saving)), saving)
    return ms_per_mac * (costs.forward_macs + exact_backward - saved)


def modelled_ms(costs: LayerCosts, ms_per_mac: float) -> float:
    """Modelled step time without filtering."""
    return ms_per_mac * (costs.forward_macs + float(costs.backward[:, 0].sum()))


def choose_filter(costs: LayerCosts, ms_per_mac: float, budget_ms: float
                  ) -> FilterChoice | None:
    """The mildest last-K plan whose modelled step fits ``budget_ms``; None if the exact step
    fits. Raises :class:`ConfigError` when even filtering every layer at R4 does not."""
    n = len(costs.nodes)
    exact = float(costs.backward[:, 0].sum())
    ms = lambda k, r: _step_ms(costs, exact, ms_per_mac, k, r)
    if ms(0, 0) <= budget_ms:
        return None
    strongest = ms(n, len(PATCHES) - 1)
    if strongest > budget_ms:
        raise ConfigError(f"--budget-ms {budget_ms}: even filtering all {n} trained conv "
                          f"layers at R{PATCHES[-1]} models {strongest:.2f} ms per step")
    # r is relaxed too: the saving interpolates between the two patches.
    relaxed = lambda z: (1 - z[1]) * ms(z[0], 0) + z[1] * ms(z[0], 1)
    result = shgo(lambda z: z[0] + z[1] / 2, [(0, n), (0, 1)], sampling_method="simplicial",
                  constraints=[{"type": "ineq", "fun": lambda z: budget_ms - relaxed(z)}],
                  minimizer_kwargs={"method": "SLSQP"})
    k0 = result.x[0] if result.x is not None else n
    candidates = [(k, r) for k, r in itertools.product(
        {int(np.floor(k0)), int(np.ceil(k0)), min(int(np.ceil(k0)) + 1, n)}, (0, 1))
        if ms(k, r) <= budget_ms] or [(n, len(PATCHES) - 1)]
    k, r = min(candidates, key=lambda c: (c[0] + c[1] / 2))
    return FilterChoice(k, PATCHES[r], ms(k, r))


def gradient_filter(costs: LayerCosts, choice: FilterChoice | None) -> GradientFilter | None:
    """The :class:`GradientFilter` of a choice (the last ``layers`` trained convs)."""
    if choice is None or choice.layers == 0:
        return None
    return GradientFilter(choice.patch, {node: choice.patch
                                         for node in costs.nodes[-choice.layers:]})



def step_ms_per_mac(latency: dict) -> float:
    """Milliseconds per MAC of a train step, from measured search-space networks (a
    ``tools/search.py measure`` result): the fitted MAC coefficient of the step latency, which
    is per *forward* MAC, divided by 3 (a step computes the forward, grad_w and grad_x)."""
    rows = [r for r in latency["rows"] if "step_ms" in r]
    if len(rows) < len(FEATURES):
        raise ConfigError(f"--filter auto needs >= {len(FEATURES)} measured train steps, got "
                          f"{len(rows)}")
    x = features(*[np.array([r[k] for r in rows]) for k in ("widths", "depths", "skips")],
                 latency["batch"])
    model = LatencyModel.fit(x, [r["step_ms"] for r in rows])
    return model.to_json()["macs"] / 3
