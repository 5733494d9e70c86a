"""ONNX graphs of onnxruntime-training artifacts -> Relax, one converter per op.

A training_model.onnx holds forward, loss and backward as explicit nodes (standard ONNX ops plus
``com.microsoft`` gradient ops), so it is translated node by node into one Relax dataflow block:
no ``relax.transform.Gradient`` is involved. Shapes are static: ``Shape`` and every shape
operand (Reshape/Expand targets, ReduceSum axes, Scale factors) are folded at translation time.

``ConvGrad`` becomes the named calls of :mod:`gftvm.passes.conv_backward`
(``conv2d_grad_input``/``conv2d_grad_weight``), the same form the forward-ONNX path produces,
so :class:`gftvm.passes.gradient_filter.GradientFilter` applies unchanged. ``MaxPoolGrad`` reads
the pooling's input instead of its indices (the mask output is bound to that input, and only
MaxPoolGrad may read it) through ``max_pool2d_backward``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper
from tvm import relax

from ..errors import ModelError, UnsupportedOpError
from ..passes.conv_backward import backward_function

Value = relax.Expr | np.ndarray
Converter = Callable[["GraphTranslator", onnx.NodeProto, list], list]

_CONVERTERS: dict[tuple[str, str], Converter] = {}


def converter(*ops: str, domain: str = "") -> Callable[[Converter], Converter]:
    def register(func: Converter) -> Converter:
        for op in ops:
            _CONVERTERS[domain, op] = func
        return func
    return register


def supported_ops() -> list[str]:
    """``domain::op`` of every op with a converter."""
    return sorted(f"{domain or 'ai.onnx'}::{op}" for domain, op in _CONVERTERS)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _shape(expr: relax.Expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


class GraphTranslator:
    """Translates the nodes of one ONNX graph into a BlockBuilder, tensor by tensor."""

    def __init__(self, bb: relax.BlockBuilder, graph: onnx.GraphProto, where: str) -> None:
        self.bb, self.where = bb, where
        self.values: dict[str, Value] = {
            init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self.pool_inputs: dict[str, tuple[relax.Expr, dict]] = {}   # MaxPool mask -> (x, attrs)
        self.conv_grads: dict[tuple, tuple[relax.GlobalVar, relax.GlobalVar]] = {}

    def bind(self, name: str, value: Value) -> None:
        self.values[name] = value

    def tensor(self, name: str) -> relax.Expr:
        return _as_expr(self.values[name])

    def constant(self, name: str, node: onnx.NodeProto) -> np.ndarray:
        value = self.values[name]
        if not isinstance(value, np.ndarray):
            raise UnsupportedOpError(f"{self.where}: node '{node.name}' ({node.op_type}) needs "
                                     f"'{name}' to be a constant")
        return value

    def emit(self, expr: relax.Expr, name: str = "") -> relax.Var:
        return self.bb.emit(expr, name.replace("/", "_").replace(":", "_").strip("_"))

    def translate(self, node: onnx.NodeProto) -> None:
        convert = _CONVERTERS.get((node.domain if node.domain != "ai.onnx" else "",
                                   node.op_type))
        if convert is None:
            raise UnsupportedOpError(
                f"{self.where}: op {node.domain or 'ai.onnx'}::{node.op_type} (node "
                f"'{node.name}') has no gftvm converter. Supported: {', '.join(supported_ops())}")
        inputs = [self.values.get(name) if name else None for name in node.input]
        masks = set(node.input) & self.pool_inputs.keys()
        if masks and node.op_type != "MaxPoolGrad":
            raise UnsupportedOpError(f"{self.where}: node '{node.name}' ({node.op_type}) reads "
                                     f"the MaxPool indices {sorted(masks)}; only MaxPoolGrad may")
        missing = [name for name, value in zip(node.input, inputs) if name and value is None]
        if missing:
            raise ModelError(f"{self.where}: node '{node.name}' reads undefined tensors {missing}")
        try:
            outputs = convert(self, node, inputs)
        except UnsupportedOpError as err:  # a variant the converter refuses: name the model
            if str(err).startswith(self.where):
                raise
            raise UnsupportedOpError(f"{self.where}: {err}") from err
        for name, value in zip(node.output, outputs):
            if name and value is not None:
                if isinstance(value, relax.Expr) and not isinstance(value, relax.Var):
                    value = self.emit(value, name)
                self.bind(name, value)


def _as_expr(value: Value) -> relax.Expr:
    return relax.const(value, str(value.dtype)) if isinstance(value, np.ndarray) else value


def _binary(op: Callable, fold: Callable) -> Converter:
    def convert(t: GraphTranslator, node: onnx.NodeProto, inputs: list) -> list:
        if all(isinstance(v, np.ndarray) for v in inputs):
            return [np.asarray(fold(*inputs))]
        return [op(*map(_as_expr, inputs))]
    return convert


for _op, _relax, _np in [("Add", relax.op.add, np.add), ("Sub", relax.op.subtract, np.subtract),
                         ("Mul", relax.op.multiply, np.multiply),
                         ("Div", relax.op.divide, np.divide),
                         ("LessOrEqual", relax.op.less_equal, np.less_equal),
                         ("GreaterOrEqual", relax.op.greater_equal, np.greater_equal),
                         ("And", relax.op.logical_and, np.logical_and)]:
    converter(_op)(_binary(_relax, _np))


@converter("Identity")
def _identity(t, node, inputs):
    return [inputs[0]]


@converter("Constant")
def _constant(t, node, inputs):
    return [numpy_helper.to_array(_attrs(node)["value"])]


@converter("Cast")
def _cast(t, node, inputs):
    dtype = onnx.helper.tensor_dtype_to_np_dtype(_attrs(node)["to"])
    if isinstance(inputs[0], np.ndarray):
        return [inputs[0].astype(dtype)]
    return [relax.op.astype(inputs[0], str(dtype))]


@converter("Sum")
def _sum(t, node, inputs):
    total = _as_expr(inputs[0])
    for value in inputs[1:]:
        total = relax.op.add(total, _as_expr(value))
    return [total]


@converter("Relu")
def _relu(t, node, inputs):
    return [relax.op.nn.relu(inputs[0])]


@converter("ReluGrad", domain="com.microsoft")
def _relu_grad(t, node, inputs):
    gy, y = inputs
    zero = relax.const(0.0, "float32")
    return [relax.op.where(relax.op.greater(y, zero), gy, zero)]


@converter("Clip")
def _clip(t, node, inputs):
    x = inputs[0]
    if len(inputs) > 1 and inputs[1] is not None:
        x = relax.op.maximum(x, _as_expr(inputs[1]))
    if len(inputs) > 2 and inputs[2] is not None:
        x = relax.op.minimum(x, _as_expr(inputs[2]))
    return [x]


@converter("Shape")
def _shape_op(t, node, inputs):
    attrs = _attrs(node)
    dims = _shape(inputs[0])
    return [np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], "int64")]


@converter("Size")
def _size(t, node, inputs):
    return [np.array(int(np.prod(_shape(inputs[0]))), "int64")]


@converter("Neg")
def _neg(t, node, inputs):
    return [relax.op.negative(inputs[0])]


@converter("Unsqueeze")
def _unsqueeze(t, node, inputs):
    axes = t.constant(node.input[1], node).tolist() if len(inputs) > 1 \
        else _attrs(node)["axes"]
    return [relax.op.expand_dims(_as_expr(inputs[0]), axes)]


@converter("Reshape")
def _reshape(t, node, inputs):
    x, target = inputs[0], t.constant(node.input[1], node).tolist()
    dims = _shape(x)
    if not _attrs(node).get("allowzero", 0):
        target = [dims[i] if d == 0 else d for i, d in enumerate(target)]
    if -1 in target:
        known = int(np.prod([d for d in target if d != -1]))
        target[target.index(-1)] = int(np.prod(dims)) // known
    return [relax.op.reshape(x, target)]


@converter("Flatten")
def _flatten(t, node, inputs):
    dims = _shape(inputs[0])
    axis = _attrs(node).get("axis", 1) % len(dims)
    return [relax.op.reshape(inputs[0], [int(np.prod(dims[:axis])), int(np.prod(dims[axis:]))])]


@converter("Expand")
def _expand(t, node, inputs):
    x = _as_expr(inputs[0])
    target = np.broadcast_shapes(tuple(_shape(x)), tuple(t.constant(node.input[1], node)))
    return [relax.op.broadcast_to(x, target)]


@converter("ReduceSum", "ReduceMean")
def _reduce(t, node, inputs):
    attrs = _attrs(node)
    axes = t.constant(node.input[1], node).tolist() if len(inputs) > 1 and inputs[1] is not None \
        else attrs.get("axes")
    if not axes and attrs.get("noop_with_empty_axes", 0):
        return [inputs[0]]
    reduce = relax.op.sum if node.op_type == "ReduceSum" else relax.op.mean
    return [reduce(inputs[0], axes or None, keepdims=bool(attrs.get("keepdims", 1)))]


@converter("Scale", domain="com.microsoft")
def _scale(t, node, inputs):
    factor = float(t.constant(node.input[1], node).reshape(()))
    if _attrs(node).get("scale_down", 0):
        factor = 1.0 / factor
    return [relax.op.multiply(inputs[0], relax.const(factor, "float32"))]


@converter("GlobalAveragePool")
def _global_average_pool(t, node, inputs):
    return [relax.op.mean(inputs[0], [2, 3], keepdims=True)]


def _gemm_operand(x: relax.Expr, transpose: int) -> relax.Expr:
    return relax.op.permute_dims(x, [1, 0]) if transpose else x


@converter("Gemm")
def _gemm(t, node, inputs):
    attrs = _attrs(node)
    a = _gemm_operand(_as_expr(inputs[0]), attrs.get("transA", 0))
    b = _gemm_operand(_as_expr(inputs[1]), attrs.get("transB", 0))
    y = relax.op.matmul(a, b)
    if attrs.get("alpha", 1.0) != 1.0:
        y = relax.op.multiply(y, relax.const(attrs["alpha"], "float32"))
    if len(inputs) > 2 and inputs[2] is not None:
        c = _as_expr(inputs[2])
        if attrs.get("beta", 1.0) != 1.0:
            c = relax.op.multiply(c, relax.const(attrs["beta"], "float32"))
        y = relax.op.add(y, c)
    return [y]


@converter("MatMul")
def _matmul(t, node, inputs):
    return [relax.op.matmul(_as_expr(inputs[0]), _as_expr(inputs[1]))]


def _conv_attrs(node: onnx.NodeProto, kernel: list[int]) -> dict:
    attrs = _attrs(node)
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): auto_pad="
                                 f"{attrs['auto_pad'].decode()} (explicit pads only)")
    if len(kernel) != 2:
        raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): only 2-D is supported")
    return {"strides": attrs.get("strides", [1, 1]), "padding": attrs.get("pads", [0, 0, 0, 0]),
            "dilation": attrs.get("dilations", [1, 1]), "groups": attrs.get("group", 1)}


@converter("Conv")
def _conv(t, node, inputs):
    x, w = inputs[0], _as_expr(inputs[1])
    y = t.emit(relax.op.nn.conv2d(x, w, **_conv_attrs(node, _shape(w)[2:])), node.output[0])
    if len(inputs) > 2 and inputs[2] is not None:
        y = relax.op.add(y, _channel(_as_expr(inputs[2])))
    return [y]


@converter("ConvGrad", domain="com.microsoft")
def _conv_grad(t, node, inputs):
    """dX and dW as the named conv-backward calls, dB as the sum of dY."""
    gy, x, w = inputs
    conv = t.bb.normalize(relax.op.nn.conv2d(x, w, **_conv_attrs(node, _shape(w)[2:])))
    key = (str(conv.attrs), str(x.ty), str(w.ty))
    if key not in t.conv_grads:
        t.conv_grads[key] = tuple(
            t.bb.add_func(backward_function(kind, conv, gy.ty), f"conv2d_grad_{kind}")
            for kind in ("input", "weight"))
    grad_input, grad_weight = t.conv_grads[key]
    wanted = list(node.output) + [""] * (3 - len(node.output))
    return [relax.Call(grad_input, [gy, w]) if wanted[0] else None,
            relax.Call(grad_weight, [x, gy, w]) if wanted[1] else None,
            relax.op.sum(gy, [0, 2, 3]) if wanted[2] else None]


def _channel(v: relax.Expr) -> relax.Expr:
    """(C,) -> (1, C, 1, 1)."""
    return relax.op.expand_dims(v, [0, 2, 3])


@converter("BatchNormalization")
def _batch_norm(t, node, inputs):
    attrs = _attrs(node)
    if attrs.get("training_mode", 0):
        return _batch_norm_training(t, node, inputs)
    x, scale, bias, mean, var = map(_as_expr, inputs)
    eps = relax.const(attrs.get("epsilon", 1e-5), "float32")
    inv_std = relax.op.rsqrt(relax.op.add(var, eps))
    y = relax.op.multiply(relax.op.subtract(x, _channel(mean)),
                          _channel(relax.op.multiply(inv_std, scale)))
    return [relax.op.add(y, _channel(bias))]


@converter("BatchNormInternal", domain="com.microsoft")
def _batch_norm_training(t, node, inputs):
    """Batch statistics (biased variance). Running statistics stay frozen: with BN momentum
    below 1 ORT would update them in place every step (they only matter to ``predict``), and
    gftvm warns that it does not."""
    attrs = _attrs(node)
    if not attrs.get("training_mode", 1):
        return _batch_norm(t, node, inputs)
    if attrs.get("momentum", 0.9) != 1.0:
        warnings.warn(f"{t.where}: node '{node.name}' has BN momentum {attrs.get('momentum', 0.9)}"
                      f": ORT updates its running statistics every step, gftvm keeps them frozen "
                      f"(momentum 1; gftvm.frontend.ort.generate_artifacts exports so)")
    x, scale, bias = inputs[0], _as_expr(inputs[1]), _as_expr(inputs[2])
    mean = t.emit(relax.op.mean(x, [0, 2, 3]), node.name + "_mean")
    centred = t.emit(relax.op.subtract(x, _channel(mean)), node.name + "_centred")
    var = relax.op.mean(relax.op.multiply(centred, centred), [0, 2, 3])
    inv_std = t.emit(relax.op.rsqrt(relax.op.add(var, relax.const(attrs["epsilon"], "float32"))),
                     node.name + "_inv_std")
    y = relax.op.add(relax.op.multiply(centred, _channel(relax.op.multiply(inv_std, scale))),
                     _channel(bias))
    return [y, None, None, mean, inv_std]


@converter("BatchNormalizationGrad", domain="com.microsoft")
def _batch_norm_grad(t, node, inputs):
    """dX = scale·inv_std/M · (M·dY - Σ dY - x̂ Σ dY·x̂), x̂ = (X - mean)·inv_std, M = N·H·W."""
    gy, x, scale, mean, inv_std = inputs
    n, _, h, w = _shape(x)
    x_hat = t.emit(relax.op.multiply(relax.op.subtract(x, _channel(mean)), _channel(inv_std)),
                   node.name + "_x_hat")
    g_bias = t.emit(relax.op.sum(gy, [0, 2, 3]), node.name + "_dbias")
    g_scale = t.emit(relax.op.sum(relax.op.multiply(gy, x_hat), [0, 2, 3]), node.name + "_dscale")
    count = relax.const(float(n * h * w), "float32")
    inner = relax.op.subtract(relax.op.subtract(relax.op.multiply(gy, count), _channel(g_bias)),
                              relax.op.multiply(x_hat, _channel(g_scale)))
    factor = relax.op.divide(relax.op.multiply(_as_expr(scale), inv_std), count)
    return [relax.op.multiply(inner, _channel(factor)), g_scale, g_bias]


def _pool_attrs(node: onnx.NodeProto) -> dict:
    attrs = _attrs(node)
    kernel = attrs["kernel_shape"]
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID") or len(kernel) != 2:
        raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): only 2-D pooling with "
                                 f"explicit pads is supported")
    return {"pool_size": kernel, "strides": attrs.get("strides", [1, 1]),
            "padding": attrs.get("pads", [0, 0, 0, 0]),
            "dilation": attrs.get("dilations", [1, 1]),
            "ceil_mode": bool(attrs.get("ceil_mode", 0))}


@converter("MaxPool")
def _max_pool(t, node, inputs):
    attrs = _pool_attrs(node)
    if len(node.output) > 1 and node.output[1]:
        t.pool_inputs[node.output[1]] = (inputs[0], attrs)
    return [relax.op.nn.max_pool2d(inputs[0], **attrs), inputs[0]]   # (the mask: see above)


@converter("MaxPoolGrad")
def _max_pool_grad(t, node, inputs):
    x, attrs = t.pool_inputs[node.input[1]]
    return [relax.op.grad.max_pool2d_backward(inputs[0], x, **attrs)]


def _one_hot(labels: relax.Expr, classes: int) -> relax.Expr:
    return relax.op.astype(relax.op.equal(relax.op.expand_dims(labels, 1),
                                          relax.const(np.arange(classes, dtype="int64"))),
                           "float32")


def _check_loss(node: onnx.NodeProto, inputs: list, first_extra: int) -> None:
    attrs = _attrs(node)
    if attrs.get("reduction", b"mean") != b"mean" or "ignore_index" in attrs or (
            len(inputs) > first_extra and inputs[first_extra] is not None):
        raise UnsupportedOpError(f"node '{node.name}' ({node.op_type}): only reduction=mean "
                                 f"without weights or ignore_index is supported")


@converter("SoftmaxCrossEntropyLoss")
def _softmax_cross_entropy(t, node, inputs):
    _check_loss(node, inputs, 2)
    logits, labels = inputs[:2]
    log_prob = t.emit(relax.op.nn.log_softmax(logits, axis=1), node.output[-1])
    n, classes = _shape(logits)
    picked = relax.op.sum(relax.op.multiply(log_prob, _one_hot(labels, classes)))
    return [relax.op.multiply(picked, relax.const(-1.0 / n, "float32")), log_prob]


@converter("SoftmaxCrossEntropyLossGrad", domain="com.microsoft")
def _softmax_cross_entropy_grad(t, node, inputs):
    _check_loss(node, inputs, 3)
    g_loss, log_prob, labels = inputs[:3]
    n, classes = _shape(log_prob)
    diff = relax.op.subtract(relax.op.exp(log_prob), _one_hot(labels, classes))
    return [relax.op.multiply(diff, relax.op.divide(_as_expr(g_loss),
                                                    relax.const(float(n), "float32")))]


@converter("InPlaceAccumulatorV2", domain="com.microsoft")
def _accumulate(t, node, inputs):
    """buffer + value, or value when ``overwrite`` (ORT's ``lazy_reset_grad``) is true. gftvm
    binds overwrite to true (a reset after every step), so the gradient is this step's."""
    buffer, value = inputs[:2]
    overwrite = t.constant(node.input[2], node) if len(inputs) > 2 and inputs[2] is not None \
        else np.array([False])
    result = value if overwrite.all() else relax.op.add(_as_expr(buffer), value)
    return [result, result]
