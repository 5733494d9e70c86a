"""Forward ONNX model -> Relax module whose ops all have registered gradients.

TVM's ONNX importer lowers ``Clip`` and ``Pad`` through ``emit_te``, i.e. to opaque ``call_tir``
calls that ``relax.transform.Gradient`` refuses. While importing, gftvm swaps in converters
that emit differentiable Relax ops instead:

- ``Clip(x, lo, hi)`` -> ``minimum(maximum(x, lo), hi)`` (both have registered gradients),
- ``Pad(mode="constant")`` -> ``relax.nn.pad``, whose gradient (a slice) gftvm registers
  in :mod:`gftvm.frontend.gradients`,
- nearest ``Resize`` by integer factors -> ``relax.repeat`` along H and W (gradient registered
  there too: a sum over the repeats).

Every other op keeps TVM's converter. Before importing, every node that lies on a path from a
trainable parameter to the output is checked against :data:`DIFFERENTIABLE_OPS`, so an op
that cannot be differentiated is reported by op type and node name, not deep inside TVM.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx
from tvm.relax.frontend.onnx import onnx_frontend

from ..errors import ModelError, UnsupportedOpError
from . import gradients  # noqa: F401  (registers the gradients the converters rely on)

#: ONNX ops that gftvm can import *and* differentiate (on a path from a trained parameter).
DIFFERENTIABLE_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Clip", "Concat", "Conv", "Div", "Flatten",
    "Gemm", "GlobalAveragePool", "Identity", "MatMul", "MaxPool", "Mul", "Pad", "ReduceMean",
    "Relu", "Reshape", "Resize", "Sigmoid", "Split", "Sub", "Transpose",
})

_NEAREST_AS_REPEAT = {(b"asymmetric", b"floor"), (b"half_pixel", b"round_prefer_floor"),
                      (b"half_pixel", b"round_prefer_ceil"),
                      (b"pytorch_half_pixel", b"round_prefer_floor"),
                      (b"pytorch_half_pixel", b"round_prefer_ceil")}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _unsupported_variant(node: onnx.NodeProto) -> str | None:
    """Why a node of a differentiable op type still cannot be differentiated, if it cannot."""
    attrs = _attrs(node)
    if node.op_type == "Pad" and attrs.get("mode", b"constant") != b"constant":
        return f"mode={attrs['mode'].decode()} (only constant padding)"
    if node.op_type == "Resize":
        mode = attrs.get("mode", b"nearest")
        coords = (attrs.get("coordinate_transformation_mode", b"half_pixel"),
                  attrs.get("nearest_mode", b"round_prefer_floor"))
        if mode != b"nearest" or coords not in _NEAREST_AS_REPEAT:
            return (f"mode={mode.decode()}, coordinate_transformation_mode={coords[0].decode()}"
                    f" (only nearest upsampling by integer factors)")
    return None

ModelLike = str | os.PathLike | onnx.ModelProto

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16})


def load_model(model: ModelLike) -> onnx.ModelProto:
    """Read and validate an ONNX model, raising :class:`ModelError` naming the file."""
    if isinstance(model, onnx.ModelProto):
        proto, where = model, "<onnx.ModelProto>"
    else:
        where = os.fspath(model)
        try:
            proto = onnx.load(where)
        except FileNotFoundError as err:
            raise ModelError(f"ONNX model file not found: {where}") from err
        except Exception as err:  # protobuf raises DecodeError and friends
            raise ModelError(f"cannot parse ONNX model {where}: {err}") from err
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise ModelError(f"invalid ONNX model {where}: {err}") from err
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [inp for inp in proto.graph.input if inp.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"{where}: gftvm expects exactly one image input, got "
                         f"{[inp.name for inp in inputs]}")
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value for d in tensor.shape.dim]
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 or min(dims[1:]) < 1:
        raise ModelError(f"{where}: input '{inputs[0].name}' must be a float32 NCHW image with "
                         f"static C, H, W; got elem_type {tensor.elem_type}, shape {dims}")
    if len(proto.graph.output) != 1:
        raise ModelError(f"{where}: gftvm expects one output (the logits), got "
                         f"{[out.name for out in proto.graph.output]}")
    return proto


def dependents(proto: onnx.ModelProto, names: set[str]) -> set[str]:
    """``names`` and every tensor computed from one of them."""
    result = set(names)
    for node in proto.graph.node:
        if result.intersection(node.input):
            result.update(node.output)
    return result


def check_differentiable(proto: onnx.ModelProto, trainable: set[str], where: str) -> None:
    """Raise :class:`UnsupportedOpError` for the first node on a trained path that gftvm
    cannot differentiate. Nodes fed only by frozen tensors need no gradient and may be anything
    the importer accepts."""
    trained = dependents(proto, trainable)
    for node in proto.graph.node:
        if not trained.intersection(node.input):
            continue
        op = f"op {node.domain or 'ai.onnx'}::{node.op_type} (node '{node.name}')"
        if node.op_type not in DIFFERENTIABLE_OPS or node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(
                f"{where}: {op} lies between trainable parameters and the loss, and gftvm "
                f"cannot differentiate it. Differentiable ops: "
                f"{', '.join(sorted(DIFFERENTIABLE_OPS))}")
        reason = _unsupported_variant(node)
        if reason:
            raise UnsupportedOpError(f"{where}: {op} lies between trainable parameters and the "
                                     f"loss, and gftvm cannot differentiate it with {reason}")


class _Clip(onnx_frontend.Clip):
    """Clip as maximum/minimum Relax ops, which the Gradient pass can differentiate."""

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = x.ty.dtype
        if "min" in attr:
            x = relax.op.maximum(x, relax.const(attr["min"], dtype))
        if "max" in attr:
            x = relax.op.minimum(x, relax.const(attr["max"], dtype))
        return x

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        x = inputs[0]
        if inputs[1] is not None:
            x = relax.op.maximum(x, inputs[1])
        if len(inputs) > 2 and inputs[2] is not None:
            x = relax.op.minimum(x, inputs[2])
        return x


class _Pad(onnx_frontend.Pad):
    """Constant-mode Pad as ``relax.nn.pad``; other modes keep TVM's (non-differentiable) form."""

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        if attr.get("mode", b"constant") != b"constant" or (len(inputs) > 3
                                                             and inputs[3] is not None):
            return super()._impl_v11(bb, inputs, attr, params)
        pads = onnx_frontend.get_constant(inputs[1], params)
        if not isinstance(pads, tvm.ir.GenericConst):
            raise UnsupportedOpError("Pad with pads computed at run time is not supported")
        pads = pads.value.numpy().tolist()
        rank = len(pads) // 2
        pad_width = [int(p) for axis in range(rank) for p in (pads[axis], pads[axis + rank])]
        value = 0.0
        if len(inputs) > 2 and inputs[2] is not None:
            value = onnx_frontend.get_constant(inputs[2], params).value.numpy().item()
        return relax.op.nn.pad(inputs[0], pad_width, "constant", value)

    _impl_v13 = _impl_v18 = _impl_v19 = _impl_v11


class _Resize(onnx_frontend.Resize):
    """Nearest Resize by integer factors on H and W as ``repeat``; others keep TVM's form."""

    @classmethod
    def _impl_v18(cls, bb, inputs, attr, params):
        factors = _integer_factors(inputs, params)
        coords = (attr.get("coordinate_transformation_mode", b"half_pixel"),
                  attr.get("nearest_mode", b"round_prefer_floor"))
        if (attr.get("mode", b"nearest") != b"nearest" or coords not in _NEAREST_AS_REPEAT
                or factors is None):
            return super()._impl_v18(bb, inputs, attr, params)
        x = inputs[0]
        for axis, factor in zip((2, 3), factors):
            if factor > 1:
                x = relax.op.repeat(x, factor, axis)
        return x

    _impl_v11 = _impl_v13 = _impl_v18


def _integer_factors(inputs, params) -> tuple[int, int] | None:
    """The H and W upscale factors of a Resize if they are constant integers (N, C kept)."""
    shape = [int(d) for d in inputs[0].ty.shape]
    scales = onnx_frontend.get_constant(inputs[2], params) if len(inputs) > 2 and inputs[2] \
        is not None else None
    sizes = onnx_frontend.get_constant(inputs[3], params) if len(inputs) > 3 and inputs[3] \
        is not None else None
    if isinstance(scales, tvm.ir.GenericConst) and scales.value.numpy().size == 4:
        factors = scales.value.numpy().tolist()
    elif isinstance(sizes, tvm.ir.GenericConst):
        factors = [out / dim for out, dim in zip(sizes.value.numpy().tolist(), shape)]
    else:
        return None
    if factors[:2] != [1, 1] or any(f != int(f) or f < 1 for f in factors[2:]):
        return None
    return int(factors[2]), int(factors[3])


_CONVERTER_OVERRIDES = {"Clip": _Clip, "Pad": _Pad, "Resize": _Resize}


@contextlib.contextmanager
def _differentiable_converters() -> Iterator[None]:
    original = onnx_frontend._get_convert_map
    onnx_frontend._get_convert_map = lambda: {**original(), **_CONVERTER_OVERRIDES}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def import_model(proto: onnx.ModelProto, batch_size: int, where: str) -> tvm.IRModule:
    """Import ``proto`` with parameters as function inputs (ONNX initializer order) and the
    image input's batch dimension fixed to ``batch_size``."""
    image = image_input(proto)
    shape = [batch_size] + [d.dim_value for d in image.type.tensor_type.shape.dim[1:]]
    proto = _constants_as_nodes(proto)
    try:
        with _differentiable_converters():
            mod = from_onnx(proto, shape_dict={image.name: shape}, keep_params_in_input=True,
                            sanitize_input_names=False)
    except (UnsupportedOpError, tvm.error.OpNotImplemented) as err:
        raise UnsupportedOpError(f"{where}: {err}") from err
    except Exception as err:
        raise ModelError(f"{where}: the ONNX importer failed: {err}") from err
    return mod


def _constants_as_nodes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Turn non-float initializers (pads, shapes, axes) into Constant nodes, so the importer
    sees them as constants instead of function inputs; float initializers stay parameters."""
    proto = copy.deepcopy(proto)
    constants = [init for init in proto.graph.initializer if init.data_type not in FLOAT_TYPES]
    if not constants:
        return proto
    nodes = [onnx.helper.make_node("Constant", [], [init.name], value=init) for init in constants]
    kept = [init for init in proto.graph.initializer if init.data_type in FLOAT_TYPES]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    old = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes + old)
    return proto


def image_input(proto: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The graph input that is not an initializer."""
    names = {init.name for init in proto.graph.initializer}
    return next(inp for inp in proto.graph.input if inp.name not in names)
