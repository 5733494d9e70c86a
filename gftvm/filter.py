"""Gradient-filter configuration and the per-layer plan it resolves to.

``GradientFilter(patch=2, layers="last:4")`` filters the last 4 Conv nodes (topological
order); ``layers`` may also be a list of ONNX Conv node names, or a dict ``{node: patch}``.
The semantics are those of :mod:`gftvm.passes.gradient_filter`; see docs/gradient_filter.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import onnx
import tvm
from tvm import relax

from .analysis import conv_calls
from .errors import ConfigError
from .frontend.onnx import dependents

FLOAT_BYTES = 4


@dataclass(frozen=True)
class GradientFilter:
    """Which conv layers get gradient filtering, with which patch size R."""

    patch: int = 2
    layers: str | Sequence[str] | Mapping[str, int] = "last:4"

    def to_json(self) -> dict:
        layers = self.layers if isinstance(self.layers, str) else (
            dict(self.layers) if isinstance(self.layers, Mapping) else list(self.layers))
        return {"patch": self.patch, "layers": layers}


@dataclass
class LayerPlan:
    """One filtered conv: its shapes, patch, and the costs it saves (per train step)."""

    node: str
    weight: str
    input_shape: list[int]
    output_shape: list[int]
    kernel: list[int]
    stride: list[int]
    groups: int
    patch: int
    computes_grad_input: bool
    saved_bytes_bp: int
    saved_bytes_gf: int
    backward_macs_bp: int
    backward_macs_gf: int

    def row(self) -> str:
        shape = "x".join(map(str, self.input_shape[1:]))
        return (f"{shape:>14} R{self.patch:<2} {self.saved_bytes_bp:>11,} "
                f"{self.saved_bytes_gf:>10,} {self.backward_macs_bp:>14,} "
                f"{self.backward_macs_gf:>12,}  {self.node}")


PLAN_HEADER = (f"{'input CxHxW':>14} {'R':3} {'saved BP B':>11} {'saved GF B':>10} "
               f"{'bwd MACs BP':>14} {'bwd MACs GF':>12}  layer")


def _selected(proto: onnx.ModelProto, config: GradientFilter) -> dict[str, int]:
    convs = [node.name for node in proto.graph.node if node.op_type == "Conv"]
    layers = config.layers
    if isinstance(layers, str):
        count = int(layers.removeprefix("last:")) if layers.startswith("last:") and \
            layers.removeprefix("last:").isdigit() else 0
        if count < 1 or count > len(convs):
            raise ConfigError(f"GradientFilter layers={layers!r}: expected 'last:K' with "
                              f"1 <= K <= {len(convs)} (the model's Conv layers)")
        chosen = {name: config.patch for name in convs[-count:]}
    elif isinstance(layers, Mapping):
        chosen = dict(layers)
    else:
        chosen = {name: config.patch for name in layers}
    unknown = [name for name in chosen if name not in convs]
    if unknown:
        raise ConfigError(f"GradientFilter layers {unknown} are not Conv nodes of the model")
    bad = {name: r for name, r in chosen.items() if not isinstance(r, int) or r < 1}
    if bad:
        raise ConfigError(f"GradientFilter patch sizes must be positive integers: {bad}")
    return chosen


def resolve_plan(proto: onnx.ModelProto, config: GradientFilter, trainable: list[str],
                 forward: tvm.IRModule) -> list[LayerPlan]:
    """The per-layer plan, with shapes taken from the imported Relax forward function."""
    chosen = _selected(proto, config)
    nodes = {node.name: node for node in proto.graph.node}
    convs = conv_calls(forward["main"])
    trained = set(trainable)
    upstream_trained = _convs_after_trained(proto, trained)
    plan = []
    for name, patch in chosen.items():
        weight = nodes[name].input[1]
        if weight not in trained:
            raise ConfigError(f"GradientFilter layer {name!r} is not trained (its weight "
                              f"{weight!r} is frozen)")
        call = convs[weight]
        if any(int(d) != 1 for d in call.attrs.dilation):
            warnings.warn(f"GradientFilter: {name!r} is dilated; it keeps its exact backward")
            continue
        x_shape, y_shape, w_shape = _shapes(call)
        blocks = math.ceil(y_shape[2] / patch) * math.ceil(y_shape[3] / patch)
        low_macs = y_shape[0] * y_shape[1] * blocks * w_shape[1]
        grad_input = name in upstream_trained
        plan.append(LayerPlan(
            node=name, weight=weight, input_shape=x_shape, output_shape=y_shape,
            kernel=w_shape[2:], stride=[int(s) for s in call.attrs.strides],
            groups=int(call.attrs.groups), patch=patch, computes_grad_input=grad_input,
            saved_bytes_bp=math.prod(x_shape) * FLOAT_BYTES,
            saved_bytes_gf=x_shape[0] * x_shape[1] * blocks * FLOAT_BYTES,
            backward_macs_bp=_macs(call) * (1 + grad_input),
            backward_macs_gf=low_macs * (1 + grad_input)))
    return plan


def conv_backward_macs(proto: onnx.ModelProto, trainable: list[str], forward: tvm.IRModule,
                       plan: list[LayerPlan]) -> int:
    """MACs of all conv backward work in one train step: grad_w of every trained conv, grad_x
    of every conv after the first trained one; filtered layers count their filtered cost."""
    filtered = {layer.weight: layer.backward_macs_gf for layer in plan}
    trained = set(trainable)
    upstream_trained = _convs_after_trained(proto, trained)
    convs = conv_calls(forward["main"])
    total = 0
    for node in proto.graph.node:
        weight = node.input[1] if node.op_type == "Conv" else None
        if weight in filtered:
            total += filtered[weight]
        elif weight is not None:
            total += _macs(convs[weight]) * ((weight in trained) + (node.name in upstream_trained))
    return total


def _shapes(call: relax.Call) -> tuple[list[int], list[int], list[int]]:
    """Input, output and weight shapes of a conv2d call."""
    return ([int(d) for d in call.args[0].ty.shape], [int(d) for d in call.ty.shape],
            [int(d) for d in call.args[1].ty.shape])


def _macs(call: relax.Call) -> int:
    """Multiply-accumulates of a conv2d call (its forward, = each of its two gradients)."""
    _, y_shape, w_shape = _shapes(call)
    return math.prod(y_shape) * math.prod(w_shape[1:])


def plan_json(plan: list[LayerPlan]) -> list[dict]:
    return [asdict(layer) for layer in plan]


def _convs_after_trained(proto: onnx.ModelProto, trained: set[str]) -> set[str]:
    """Conv nodes whose input depends on a trained parameter (they need grad_x)."""
    depends = dependents(proto, trained)
    return {node.name for node in proto.graph.node
            if node.op_type == "Conv" and node.input[0] in depends}
