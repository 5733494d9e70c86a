"""Which ONNX initializers a compiled train step updates.

``trainable`` is one of
- ``"all"``: every parameter;
- ``"last:K"``: the last K Conv layers in topological order, plus every parameterised node after
  the last of them (the classifier). A Conv layer is the Conv node together with the
  BatchNormalization that directly consumes its output, as in PyTorch's Conv-BN pairs;
- a list of initializer names.

BatchNormalization running statistics are never trainable: gftvm runs BatchNorm in inference
mode everywhere (the paper's fine-tuning setting), so trained BN layers learn their scale and
shift while their running mean and variance stay fixed.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx

from .errors import ConfigError
from .frontend.onnx import FLOAT_TYPES

TrainableSpec = str | Sequence[str]


#: Op inputs that are state or attributes, never learned (BN statistics, clip bounds, pads).
_FIXED_INPUTS = {"BatchNormalization": slice(3, 5), "Clip": slice(1, 3), "Pad": slice(1, 4)}


def parameters(proto: onnx.ModelProto) -> list[str]:
    """Names of the initializers that are learnable, in initializer order."""
    fixed = {name for node in proto.graph.node if node.op_type in _FIXED_INPUTS
             for name in node.input[_FIXED_INPUTS[node.op_type]]}
    return [init.name for init in proto.graph.initializer
            if init.data_type in FLOAT_TYPES and init.name not in fixed]


def resolve(proto: onnx.ModelProto, spec: TrainableSpec) -> list[str]:
    """The trainable initializer names for ``spec``, in initializer order."""
    params = parameters(proto)
    if isinstance(spec, str) and spec == "all":
        chosen = set(params)
    elif isinstance(spec, str) and spec.startswith("last:"):
        chosen = _last_conv_layers(proto, _parse_count(spec), set(params))
    elif isinstance(spec, str):
        raise ConfigError(f"trainable={spec!r}: expected 'all', 'last:K' or a list of names")
    else:
        unknown = [name for name in spec if name not in params]
        if unknown:
            raise ConfigError(f"trainable names {unknown} are not learnable initializers of the "
                              f"model (BatchNorm statistics, Clip bounds and pads never are)")
        chosen = set(spec)
    if not chosen:
        raise ConfigError(f"trainable={spec!r} selects no parameter")
    return [name for name in params if name in chosen]


def _parse_count(spec: str) -> int:
    try:
        count = int(spec.removeprefix("last:"))
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"trainable={spec!r}: K in 'last:K' must be a positive integer")
    return count


def _last_conv_layers(proto: onnx.ModelProto, count: int, params: set[str]) -> set[str]:
    nodes = list(proto.graph.node)
    convs = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    if count > len(convs):
        raise ConfigError(f"trainable='last:{count}' but the model has only {len(convs)} Conv "
                          f"layers")
    chosen: set[str] = set()
    for index in convs[-count:]:
        conv = nodes[index]
        chosen.update(name for name in conv.input if name in params)
        chosen.update(name for node in nodes if node.op_type == "BatchNormalization"
                      and node.input[0] == conv.output[0]
                      for name in node.input if name in params)
    for node in nodes[convs[-1] + 1:]:
        chosen.update(name for name in node.input if name in params)
    return chosen
