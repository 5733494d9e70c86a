"""The optimizer of an onnxruntime-training artifact (optimizer_model.onnx) as a Relax function.

The function has the convention of ``tvm.relax.training.optimizer``::

    optimizer((params...), (grads...), (state...)) -> ((new params...), (new state...))

- ``com.microsoft::SGDOptimizerV2``: p -= lr·g. No state.
- ``com.microsoft::AdamWOptimizer`` with ``adam_mode=1`` (what onnxblock's AdamW emits, the
  Hugging Face AdamW): with t the step count after this step,
  m = β1·m + (1-β1)·g, v = β2·v + (1-β2)·g², p -= lr·√(1-β2^t)/(1-β1^t) · m / (√v + ε)
  (without the factor if ``correct_bias=0``), then p -= lr·wd·p.
  State: (t as int64 of shape (1,), m..., v...), like ORT's step count and momentums.

The learning rate is not part of the artifact (ORT sets it at run time); it is a compile option.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from tvm import relax

from ..errors import ModelError, UnsupportedOpError

SGD, ADAMW = "SGDOptimizerV2", "AdamWOptimizer"


@dataclass
class OrtOptimizer:
    """The optimizer node's kind and hyper-parameters, plus the run-time learning rate."""

    name: str
    lr: float
    attrs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        if self.name == "sgd":
            return {"name": "sgd", "lr": self.lr, "momentum": 0.0, "weight_decay": 0.0}
        return {"name": "adamw", "lr": self.lr,
                "betas": [self.attrs["alpha"], self.attrs["beta"]],
                "eps": self.attrs["epsilon"], "weight_decay": self.attrs["weight_decay"],
                "correct_bias": bool(self.attrs["correct_bias"])}

    def initial_state(self, params: list[np.ndarray]) -> list[np.ndarray]:
        if self.name == "sgd":
            return []
        zeros = [np.zeros_like(p) for p in params]
        return [np.zeros(1, "int64"), *zeros, *[z.copy() for z in zeros]]

    def function(self, params: list[relax.Var]) -> relax.Function:
        """The Relax update for ``params`` (their types; the function has its own vars)."""
        types = [p.ty for p in params]
        state_types = [relax.TensorType((1,), "int64")] + types * 2 if self.name == "adamw" \
            else []
        tuples = [relax.Var(name, relax.TupleType(tys)) for name, tys in
                  [("params", types), ("gradients", types), ("optim_state", state_types)]]
        bb = relax.BlockBuilder()
        with bb.function("optimizer", tuples):
            with bb.dataflow():
                p_vars, g_vars, s_vars = ([bb.emit(relax.TupleGetItem(t, i))
                                           for i in range(len(t.ty.fields))] for t in tuples)
                if self.name == "sgd":
                    new_params, new_state = self._sgd(bb, p_vars, g_vars), []
                else:
                    new_params, new_state = self._adamw(bb, p_vars, g_vars, s_vars)
                out = bb.emit_output(relax.Tuple([relax.Tuple(new_params),
                                                  relax.Tuple(new_state)]))
            bb.emit_func_output(out)
        return bb.get()["optimizer"]

    def _sgd(self, bb, params, grads) -> list[relax.Expr]:
        lr = relax.const(self.lr, "float32")
        return [bb.emit(relax.op.subtract(p, relax.op.multiply(lr, g)))
                for p, g in zip(params, grads)]

    def _adamw(self, bb, params, grads, state) -> tuple[list, list]:
        beta1, beta2 = self.attrs["alpha"], self.attrs["beta"]
        f32 = lambda v: relax.const(v, "float32")
        step = bb.emit(relax.op.add(state[0], relax.const(np.ones(1, "int64"), "int64")))
        count = len(params)
        lr = f32(self.lr)
        if self.attrs["correct_bias"]:  # (as ORT: the corrections in double, then float)
            t = relax.op.astype(step, "float64")
            power = lambda b: relax.op.power(relax.const(b, "float64"), t)
            one = relax.const(1.0, "float64")
            size = relax.op.divide(relax.op.sqrt(relax.op.subtract(one, power(beta2))),
                                   relax.op.subtract(one, power(beta1)))
            lr = bb.emit(relax.op.multiply(lr, relax.op.astype(size, "float32")))
        new_params, new_m, new_v = [], [], []
        for p, g, m, v in zip(params, grads, state[1:1 + count], state[1 + count:]):
            m = bb.emit(relax.op.add(relax.op.multiply(f32(beta1), m),
                                     relax.op.multiply(f32(1.0 - beta1), g)))
            v = bb.emit(relax.op.add(relax.op.multiply(f32(beta2), v),
                                     relax.op.multiply(f32(1.0 - beta2),
                                                       relax.op.multiply(g, g))))
            denom = relax.op.add(relax.op.sqrt(v), f32(self.attrs["epsilon"]))
            p = bb.emit(relax.op.subtract(p, relax.op.multiply(lr, relax.op.divide(m, denom))))
            if self.attrs["weight_decay"] > 0:
                p = bb.emit(relax.op.subtract(p, relax.op.multiply(
                    f32(self.lr * self.attrs["weight_decay"]), p)))
            new_params.append(p)
            new_m.append(m)
            new_v.append(v)
        return new_params, [step, *new_m, *new_v]


def read_optimizer(proto: onnx.ModelProto, lr: float, where: str) -> OrtOptimizer:
    """The optimizer of optimizer_model.onnx (one SGD or AdamW node)."""
    nodes = list(proto.graph.node)
    if len(nodes) != 1:
        ops = [f"{n.domain}::{n.op_type}" for n in nodes]
        raise UnsupportedOpError(f"{where}: expected one optimizer node, got {ops} (gradient "
                                 f"clipping and custom optimizer blocks are not supported)")
    node = nodes[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.domain == "com.microsoft" and node.op_type == SGD:
        return OrtOptimizer("sgd", lr)
    if node.domain == "com.microsoft" and node.op_type == ADAMW:
        attrs = {"alpha": 0.9, "beta": 0.999, "epsilon": 1e-8, "weight_decay": 0.0,
                 "adam_mode": 0, "correct_bias": 1, **attrs}
        if attrs["adam_mode"] != 1:
            raise UnsupportedOpError(f"{where}: node '{node.name}' {node.op_type} with "
                                     f"adam_mode={attrs['adam_mode']} (only adam_mode=1, "
                                     f"onnxblock's AdamW, is supported)")
        return OrtOptimizer("adamw", lr, attrs)
    if not node.op_type:
        raise ModelError(f"{where}: the optimizer node has no op type")
    raise UnsupportedOpError(f"{where}: op {node.domain or 'ai.onnx'}::{node.op_type} (node "
                             f"'{node.name}') is not a supported optimizer "
                             f"(com.microsoft::{SGD}, com.microsoft::{ADAMW})")
