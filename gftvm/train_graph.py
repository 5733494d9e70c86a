"""Turn an imported forward Relax module into a training module.

The result has two entry functions::

    predict(input, *params) -> logits
    train_step(input, targets, *params, *optim_state)
        -> (loss, (updated trainable params...), (new optim_state...))

(Flat arguments, so that TVM RPC, which cannot pass tuples, can call it too.)

``params`` are all model parameters in ONNX initializer order; only the trainable ones are
differentiated and updated. ``StopGradientAtFrozen`` keeps ``relax.transform.Gradient`` out of
the frozen layers, and dead-code elimination after inlining removes every backward op that
does not lead to a trained parameter: frozen layers get no gradient code, and the grad_x of
the first trained layer is never computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.training import loss as losses
from tvm.relax.training import optimizer as optimizers
from tvm.relax.training.utils import AppendLoss

from .analysis import saved_for_backward
from .errors import ConfigError, UnsupportedOpError
from .passes import conv_backward  # noqa: F401  (conv gradients as named calls)
from .passes.dead_taps import DeadTaps
from .passes.filtered_chain import FoldFilteredChain
from .passes.gradient_filter import GradientFilter
from .passes.stop_gradient import StopGradientAtFrozen


@dataclass
class OptimizerConfig:
    """Optimizer and hyper-parameters, with PyTorch's semantics (``torch.optim.SGD``/``Adam``:
    coupled L2 weight decay, no dampening, Adam bias correction)."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def build(self) -> optimizers.Optimizer:
        if self.name == "sgd" and self.momentum == 0.0:
            return optimizers.SGD(self.lr, self.weight_decay)
        if self.name == "sgd":
            return optimizers.MomentumSGD(self.lr, self.momentum, weight_decay=self.weight_decay)
        if self.name == "adam":
            return _Adam(self.lr, self.betas, self.eps, self.weight_decay)
        raise ConfigError(f"optimizer={self.name!r}: expected 'sgd' or 'adam'")

    def to_json(self) -> dict:
        if self.name == "adam":
            return {"name": "adam", "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                    "weight_decay": self.weight_decay}
        return {"name": "sgd", "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay}


class _Adam(optimizers.Adam):
    """TVM 0.27's Adam.init passes the parameters' DataType to numpy, which rejects it."""

    def _set_params_and_dtype(self, params: list[relax.Var]) -> None:
        super()._set_params_and_dtype(params)
        self.dtype = str(self.dtype)


@dataclass
class TrainModule:
    """The training module with its initial parameters and optimizer state, and what the
    forward keeps alive for the backward (from the differentiated function, before inlining)."""

    mod: tvm.IRModule
    params: list[np.ndarray]
    optim_state: list[np.ndarray]
    adjoint: relax.Function

    @property
    def saved_bytes(self) -> int:
        return sum(saved_for_backward(self.adjoint).values())


def build_train_module(forward: tvm.IRModule, trainable: list[str], batch_size: int,
                       optimizer: optimizers.Optimizer, filter_plan: dict[str, int] | None = None
                       ) -> TrainModule:
    """Build the training module. ``filter_plan`` maps conv weight names to the patch size of
    their gradient filter."""
    forward, param_values = relax.frontend.detach_params(forward)
    main = forward["main"]
    params = list(main.params[1:])
    init_params = [value.numpy() for value in param_values["main"]]

    mod = tvm.IRModule({gv: func for gv, func in forward.functions.items()
                        if gv.name_hint != "main"})
    mod["backbone"] = main.with_attr("global_symbol", "backbone")
    mod = relax.transform.DecomposeOpsForInference("backbone")(mod)
    logits_type = mod["backbone"].ret_ty
    targets_type = relax.TensorType((batch_size,), "int64")
    loss = losses.CrossEntropyLoss(reduction="mean")(logits_type, targets_type)
    mod = AppendLoss("backbone", loss, 1, "backbone_loss")(mod)

    loss_func = mod["backbone_loss"]
    by_name = {p.name: p for p in loss_func.params}
    required = [by_name[name] for name in trainable]
    mod = StopGradientAtFrozen("backbone_loss", trainable)(mod)
    try:
        mod = relax.transform.Gradient("backbone_loss", require_grads=required)(mod)
    except tvm.error.InternalError as err:
        raise UnsupportedOpError(f"Relax cannot differentiate the model: {err}") from err
    if filter_plan:
        mod = filter_gradients(mod, "backbone_loss_adjoint", filter_plan)
    optimizer.init(required)
    init_state = [value.numpy() for value in optimizer.state]

    adjoint = relax.transform.DeadCodeElimination(["backbone_loss_adjoint"])(
        mod)["backbone_loss_adjoint"]
    mod = add_train_step(mod, "backbone_loss_adjoint", optimizer.get_function(), params,
                         trainable, init_state, targets_type)
    mod["predict"] = mod["backbone"].with_attrs({"global_symbol": "predict", **data_inputs(1)})
    mod = keep_entries(mod, ["train_step", "predict"])
    return TrainModule(mod, init_params, init_state, adjoint)


def filter_gradients(mod: tvm.IRModule, adjoint_name: str, plan: dict[str, int]
                     ) -> tvm.IRModule:
    """Gradient filtering of the layers in ``plan`` (weight name -> patch size), with the
    reductions between filtered layers taken to low resolution."""
    mod = GradientFilter(adjoint_name, plan)(mod)
    return FoldFilteredChain(adjoint_name)(mod)


def data_inputs(num: int) -> dict[str, int]:
    """Function attributes saying that only the first ``num`` inputs (the batch, and for
    ``train_step`` its labels) change from call to call. TVM's VMShapeLower then checks only
    those at each call; the rest are the parameters and optimizer state, which the runtime's
    Session checks once, when it loads them (two VM calls per tensor saved: 5 % of a
    MobileNetV2 step)."""
    return {"num_input": num}


def add_train_step(mod: tvm.IRModule, adjoint_name: str, optimizer: relax.Function,
                   params: list[relax.Var], trainable: list[str], init_state: list[np.ndarray],
                   targets_type: relax.TensorType) -> tvm.IRModule:
    """train_step = optimizer(adjoint(input, *params, targets)), inlined later into one
    function. The adjoint returns (loss, (gradients of ``trainable``...))."""
    image = relax.Var("input", mod[adjoint_name].params[0].ty)
    targets = relax.Var("targets", targets_type)
    param_vars = [relax.Var(p.name, p.ty) for p in params]
    state = [relax.Var(_state_name(i), relax.TensorType(s.shape, str(s.dtype)))
             for i, s in enumerate(init_state)]
    by_name = {v.name: v for v in param_vars}

    bb = relax.BlockBuilder(mod)
    optimizer_gv = bb.add_func(optimizer, "optimizer")
    with bb.function("train_step", [image, targets, *param_vars, *state], data_inputs(2)):
        with bb.dataflow():
            adjoint = bb.emit(relax.Call(mod.get_global_var(adjoint_name),
                                         [image, *param_vars, targets]))
            loss = bb.emit(relax.TupleGetItem(adjoint, 0))
            grads = bb.emit(relax.TupleGetItem(adjoint, 1))
            trained = relax.Tuple([by_name[name] for name in trainable])
            updated = bb.emit(relax.Call(optimizer_gv, [trained, grads, relax.Tuple(state)]))
            out = bb.emit_output(relax.Tuple([loss, relax.TupleGetItem(updated, 0),
                                              relax.TupleGetItem(updated, 1)]))
        bb.emit_func_output(out)
    return bb.get()


def _state_name(index: int) -> str:
    return f"optim_state_{index}"


def donated_inputs(trainable: list[str], num_state: int) -> list[str]:
    """The ``train_step`` inputs a step replaces, which the runtime hands over to be updated in
    place: the trained parameters and the optimizer state."""
    return [*trainable, *(_state_name(i) for i in range(num_state))]


def keep_entries(mod: tvm.IRModule, entries: list[str]) -> tvm.IRModule:
    """Make every other Relax function private, inline it, drop what is unused, and drop the
    conv taps that only read padding (DeadTaps)."""
    functions = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function) and gv.name_hint not in entries:
            func = func.without_attr("global_symbol")
        functions[gv] = func
    mod = tvm.IRModule(functions, attrs=mod.attrs)
    mod = relax.transform.InlinePrivateFunctions()(mod)
    mod = relax.transform.CanonicalizeBindings()(mod)
    return DeadTaps()(relax.transform.DeadCodeElimination(entries)(mod))
