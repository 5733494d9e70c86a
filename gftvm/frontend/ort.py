"""onnxruntime-training artifacts -> the training module gftvm compiles.

An artifact directory (``onnxruntime.training.artifacts.generate_artifacts``) holds
``training_model.onnx`` (forward, loss and the backward as explicit ``com.microsoft`` gradient
ops), ``eval_model.onnx``, ``optimizer_model.onnx`` and ``checkpoint`` (the parameters).
gftvm lowers it into the same entry functions as the forward-ONNX path (see
:mod:`gftvm.train_graph`)::

    train_step(input, targets, *params, *optim_state) -> (loss, (trained...), (state...))
    predict(input, *params)                            -> logits   (from eval_model.onnx)

Conventions honoured: parameters are the graph inputs that the checkpoint holds (in graph
order); the trained ones are those with a ``<name>_grad.accumulation.out`` output, frozen ones
have none. Each train step is ORT's ``module(x, y); optimizer.step(); module.lazy_reset_grad()``:
the accumulation buffers are reset (``lazy_reset_grad`` true), so they are not state.

The checkpoint is read and written with ``onnxruntime.training.api.CheckpointState`` (compile
time only; the device runtime does not need onnxruntime).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import tvm
from tvm import relax

from ..errors import CheckpointError, ConfigError, ModelError
from ..runtime import read_manifest
from ..state import TrainState, read_state, write_state
from ..train_graph import (TrainModule, add_train_step, data_inputs, filter_gradients,
                           keep_entries)
from . import ort_ops
from .ort_optimizer import OrtOptimizer, read_optimizer

TRAINING, EVAL, OPTIMIZER, CHECKPOINT = ("training_model.onnx", "eval_model.onnx",
                                         "optimizer_model.onnx", "checkpoint")
GRAD_SUFFIX = "_grad.accumulation.out"
BUFFER_SUFFIX = "_grad.accumulation.buffer"
RESET = "lazy_reset_grad"
ADJOINT = "ort_loss_adjoint"
#: The highest ONNX IR version onnxruntime(-training) 1.19.2 loads.
ORT_IR_VERSION = 10


def is_artifact(model: object) -> bool:
    """Whether ``model`` names an ORT artifact: its directory or its training_model.onnx."""
    if not isinstance(model, (str, os.PathLike)):
        return False
    path = os.fspath(model)
    return os.path.basename(path) == TRAINING or os.path.isfile(os.path.join(path, TRAINING))


def artifact_directory(model: str | os.PathLike) -> str:
    path = os.fspath(model)
    return os.path.dirname(path) or "." if os.path.basename(path) == TRAINING else path


@dataclass
class OrtArtifact:
    """The parsed files of an artifact directory."""

    directory: str
    training: onnx.ModelProto
    eval: onnx.ModelProto
    optimizer: onnx.ModelProto
    params: dict[str, np.ndarray]

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)


def _load_onnx(path: str) -> onnx.ModelProto:
    if not os.path.isfile(path):
        raise ModelError(f"ORT artifact file missing: {path}")
    try:
        return onnx.load(path)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ModelError(f"cannot parse {path} (truncated or not ONNX): {err}") from err


def load_artifact(model: str | os.PathLike) -> OrtArtifact:
    """Read the four files of an artifact, with errors naming the file at fault."""
    directory = artifact_directory(model)
    return OrtArtifact(directory, *(_load_onnx(os.path.join(directory, name))
                                    for name in (TRAINING, EVAL, OPTIMIZER)),
                       read_checkpoint(os.path.join(directory, CHECKPOINT)))


# -- checkpoints ---------------------------------------------------------------------------------

def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The parameters of an ORT checkpoint, by name."""
    from onnxruntime.training.api import CheckpointState

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"ORT checkpoint missing: {path}")
    try:
        state = CheckpointState.load_checkpoint(path)
        return {name: np.array(param.data) for name, param in state.parameters}
    except RuntimeError as err:
        raise CheckpointError(f"cannot read ORT checkpoint {path} (truncated or not a "
                              f"checkpoint): {err}") from err


def write_checkpoint(params: dict[str, np.ndarray], artifact: str | os.PathLike,
                     path: str | os.PathLike) -> None:
    """Write ``params`` as an ORT checkpoint at ``path``, laid out like the checkpoint of the
    ORT ``artifact`` directory. Every parameter of that checkpoint must be given."""
    from onnxruntime.training.api import CheckpointState, Module

    directory = artifact_directory(artifact)
    template = os.path.join(directory, CHECKPOINT)
    state = CheckpointState.load_checkpoint(template)
    expected = {name: param.data for name, param in state.parameters}
    wrong = sorted(n for n in expected.keys() | params.keys() if n not in params or n not in
                   expected or params[n].shape != expected[n].shape
                   or params[n].dtype != expected[n].dtype)
    if wrong:
        raise CheckpointError(f"parameters do not match the ORT checkpoint {template}: {wrong[:5]}")
    # ORT copies into a checkpoint's parameters only while a Module holds them on a device.
    module = Module(os.path.join(directory, TRAINING), state, os.path.join(directory, EVAL))
    for name, value in params.items():
        state.parameters[name] = np.ascontiguousarray(value)
    CheckpointState.save_checkpoint(state, os.fspath(path))
    del module


def to_ort_checkpoint(checkpoint: str | os.PathLike, artifact: str | os.PathLike,
                      path: str | os.PathLike) -> None:
    """A gftvm checkpoint or state file (.npz) -> an ORT checkpoint at ``path`` for the ORT
    ``artifact`` directory (parameters only)."""
    try:
        params = read_state(checkpoint).params
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    write_checkpoint(params, artifact, path)


def from_ort_checkpoint(checkpoint: str | os.PathLike, artifact: str | os.PathLike,
                        path: str | os.PathLike) -> None:
    """An ORT checkpoint -> a gftvm checkpoint (.npz) for the compiled ``artifact``, which
    ``Session.load_checkpoint`` accepts: its parameters, and a fresh optimizer state (ORT's
    optimizer state is not carried over)."""
    manifest = read_manifest(os.fspath(artifact))
    initial = read_state(os.path.join(artifact, manifest["files"]["state"]["path"]))
    params = read_checkpoint(checkpoint)
    expected = {p["name"] for p in manifest["params"]}
    if set(params) != expected:
        raise CheckpointError(f"ORT checkpoint {checkpoint} does not hold the parameters of "
                              f"{artifact}: {sorted(set(params) ^ expected)[:5]}")
    meta = {"library_sha256": manifest["files"]["library"]["sha256"], "steps": 0}
    write_state(path, TrainState(params, initial.optim, meta))


def generate_artifacts(model, directory: str | os.PathLike,
                       input_shape: tuple[int, int, int, int], optimizer: str = "sgd",
                       frozen: list[str] | tuple[str, ...] = (), **adamw: float) -> None:
    """Export a PyTorch image classifier and make onnxruntime-training artifacts in
    ``directory`` that ORT 1.19.2 loads (CrossEntropyLoss; ``optimizer`` "sgd" or "adamw" with
    onnxblock's AdamW arguments ``adamw``: betas, eps, weight_decay, bias_correction).

    The export is in training mode (``do_constant_folding=False``, TorchScript exporter), so
    BatchNorm trains on batch statistics. Its running statistics are frozen: not trained, and
    BN momentum 1 (ORT would otherwise update them in place every step, which gftvm does not
    do). ``frozen`` names more parameters to freeze."""
    import copy
    import warnings

    import onnxruntime
    import torch
    from onnxruntime.training import artifacts, onnxblock

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    model = copy.deepcopy(model).train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0   # tracing runs the model: keep the statistics; ONNX momentum 1
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the exporter warns about BN's in-place updates
            torch.onnx.export(model, (torch.zeros(input_shape),), path, dynamo=False,
                              input_names=["input"], output_names=["logits"], opset_version=17,
                              training=torch.onnx.TrainingMode.TRAINING,
                              do_constant_folding=False)
        proto = onnx.load(path)
    names = [init.name for init in proto.graph.initializer
             if init.data_type == onnx.TensorProto.FLOAT]
    statistics = [n for n in names if n.endswith(("running_mean", "running_var"))]
    unknown = sorted(set(frozen) - set(names))
    if unknown:
        raise ConfigError(f"frozen={unknown}: not float parameters of the exported model")
    frozen = [n for n in names if n in set(frozen) | set(statistics)]
    optimizers = {"sgd": lambda: artifacts.OptimType.SGD,
                  "adamw": lambda: onnxblock.optim.AdamW(**adamw)}
    if optimizer not in optimizers or (adamw and optimizer != "adamw"):
        raise ConfigError(f"optimizer={optimizer!r} with {adamw}: expected 'sgd', or 'adamw' "
                          f"with onnxblock.optim.AdamW arguments")
    onnxruntime.set_default_logger_severity(3)
    with ort_info_lines_dropped():
        artifacts.generate_artifacts(proto, requires_grad=[n for n in names if n not in frozen],
                                     frozen_params=frozen,
                                     loss=artifacts.LossType.CrossEntropyLoss,
                                     optimizer=optimizers[optimizer](),
                                     artifact_directory=directory)
    fix_for_ort(directory)


@contextlib.contextmanager
def ort_info_lines_dropped() -> Iterator[None]:
    """Drop ORT's INFO lines from the process's stderr (file descriptor 2) while the block
    runs, and pass every other line on when it ends. ORT-training 1.19.2's gradient-graph
    builder logs each graph transformer it applies (about 45 lines per artifact) whatever
    ``onnxruntime.set_default_logger_severity`` says."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if "[I:onnxruntime:" not in line:
                    sys.stderr.write(line)
            sys.stderr.flush()


def fix_for_ort(directory: str | os.PathLike) -> None:
    """Make a generated artifact loadable by ORT 1.19.2: ONNX IR version at most 10 (onnx 1.23
    writes 14), and inference-mode BatchNormalization in eval_model.onnx with the single output
    ONNX allows (``generate_artifacts`` keeps the training-mode outputs)."""
    for name in (TRAINING, EVAL, OPTIMIZER):
        path = os.path.join(directory, name)
        proto = onnx.load(path)
        proto.ir_version = min(proto.ir_version, ORT_IR_VERSION)
        for node in proto.graph.node:
            training = any(a.name == "training_mode" and a.i for a in node.attribute)
            if node.op_type == "BatchNormalization" and not training:
                del node.output[1:]
        onnx.save(proto, path)


# -- the training module -------------------------------------------------------------------------

def _tensor_type(info: onnx.ValueInfoProto, batch_size: int) -> relax.TensorType:
    tensor = info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else batch_size for d in tensor.shape.dim]
    return relax.TensorType(dims, str(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)))


def _ancestors(graph: onnx.GraphProto, outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes needed to compute ``outputs``, in graph order."""
    needed, chosen = set(outputs), []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            chosen.append(node)
            needed.update(node.input)
    return chosen[::-1]


@dataclass
class Signature:
    """Which graph inputs of the training model are what."""

    image: onnx.ValueInfoProto
    labels: onnx.ValueInfoProto
    params: list[str]
    trainable: list[str]
    loss: str


def signature(art: OrtArtifact) -> Signature:
    graph, where = art.training.graph, art.path(TRAINING)
    outputs = [out.name for out in graph.output]
    trainable = [name.removesuffix(GRAD_SUFFIX) for name in outputs if name.endswith(GRAD_SUFFIX)]
    params = [i.name for i in graph.input if i.name in art.params]
    data = [i for i in graph.input if i.name not in art.params and i.name != RESET
            and not i.name.endswith(BUFFER_SUFFIX)]
    missing = sorted(set(trainable) - set(params))
    if missing or not trainable:
        raise ModelError(f"{where}: gradients without parameters in the checkpoint: {missing}"
                         if missing else f"{where}: no '*{GRAD_SUFFIX}' output (nothing trained)")
    if len(data) != 2:
        raise ModelError(f"{where}: expected an image and a labels input besides parameters, "
                         f"gradient buffers and {RESET}, got {[i.name for i in data]}")
    image, labels = sorted(data, key=lambda i: i.type.tensor_type.elem_type
                           != onnx.TensorProto.FLOAT)
    return Signature(image, labels, params, trainable, outputs[0])


def _translate(bb: relax.BlockBuilder, graph: onnx.GraphProto, where: str,
               bound: dict[str, relax.Expr | np.ndarray], nodes: list[onnx.NodeProto]
               ) -> ort_ops.GraphTranslator:
    translator = ort_ops.GraphTranslator(bb, graph, where)
    for name, value in bound.items():
        translator.bind(name, value)
    for node in nodes:
        translator.translate(node)
    return translator


def _adjoint(art: OrtArtifact, sig: Signature, batch_size: int,
             param_vars: list[relax.Var]) -> tvm.IRModule:
    """``ort_loss_adjoint(input, *params, labels) -> (loss, (grads of the trained...))``: the
    training graph, forward (what the loss needs) emitted before backward."""
    graph, where = art.training.graph, art.path(TRAINING)
    image = relax.Var(sig.image.name, _tensor_type(sig.image, batch_size))
    labels = relax.Var(sig.labels.name, _tensor_type(sig.labels, batch_size))
    bound = {sig.image.name: image, sig.labels.name: labels,
             **{v.name: v for v in param_vars}, RESET: np.array([True])}
    for info in graph.input:
        if info.name.endswith(BUFFER_SUFFIX):  # reset by lazy_reset_grad: contents never read
            ty = _tensor_type(info, batch_size)
            bound[info.name] = np.zeros([int(d) for d in ty.shape], str(ty.dtype))
    forward = _ancestors(graph, {sig.loss})
    done = {id(node) for node in forward}
    backward = [node for node in graph.node if id(node) not in done]
    bb = relax.BlockBuilder()
    with bb.function(ADJOINT, [image, *param_vars, labels]):
        with bb.dataflow():
            translator = _translate(bb, graph, where, bound, forward)
            loss = bb.emit_output(translator.tensor(sig.loss))
            for node in backward:
                translator.translate(node)
            grads = bb.emit_output(relax.Tuple([translator.tensor(name + GRAD_SUFFIX)
                                                for name in sig.trainable]))
        bb.emit_func_output(relax.Tuple([loss, grads]))
    return bb.get()


def _predict(art: OrtArtifact, sig: Signature, batch_size: int, params: list[relax.Var],
             mod: tvm.IRModule) -> tvm.IRModule:
    """``predict(input, *params) -> logits`` from eval_model.onnx: what its loss node reads."""
    graph, where = art.eval.graph, art.path(EVAL)
    loss_node = next((n for n in graph.node if graph.output[0].name in n.output), None)
    if loss_node is None:
        raise ModelError(f"{where}: no node computes the output {graph.output[0].name}")
    logits = loss_node.input[0]
    image = relax.Var(sig.image.name, _tensor_type(sig.image, batch_size))
    param_vars = [relax.Var(p.name, p.ty) for p in params]
    bb = relax.BlockBuilder(mod)
    with bb.function("predict", [image, *param_vars], data_inputs(1)):
        with bb.dataflow():
            translator = _translate(bb, graph, where,
                                    {image.name: image, **{v.name: v for v in param_vars}},
                                    _ancestors(graph, {logits}))
            out = bb.emit_output(translator.tensor(logits))
        bb.emit_func_output(out)
    return bb.get()


def batch_of(art: OrtArtifact, batch_size: int | None) -> int:
    """The batch size: the artifact's if static (``batch_size`` must then agree or be None)."""
    dim = signature(art).image.type.tensor_type.shape.dim[0]
    static = dim.dim_value if dim.HasField("dim_value") else None
    if static is not None and batch_size not in (None, static):
        raise ConfigError(f"batch_size={batch_size}: the ORT artifact {art.directory} has a "
                          f"fixed batch of {static}")
    if static is None and batch_size is None:
        raise ConfigError(f"the ORT artifact {art.directory} has a dynamic batch: give "
                          f"batch_size")
    return static or batch_size


def adjoint_module(art: OrtArtifact, batch_size: int) -> tvm.IRModule:
    """The training graph as ``ort_loss_adjoint(input, *params, labels) -> (loss, (grads...))``
    (parameters in graph order), before any gftvm pass."""
    sig = signature(art)
    param_vars = [relax.Var(name, relax.TensorType(art.params[name].shape,
                                                   str(art.params[name].dtype)))
                  for name in sig.params]
    return _adjoint(art, sig, batch_size, param_vars)


def build_train_module(art: OrtArtifact, mod: tvm.IRModule, optimizer: OrtOptimizer,
                       filter_plan: dict[str, int] | None = None) -> TrainModule:
    """The training module (``train_step``, ``predict``) from the ``adjoint_module``."""
    sig = signature(art)
    param_vars = list(mod[ADJOINT].params[1:-1])
    batch_size = int(mod[ADJOINT].params[0].ty.shape[0])
    init_params = [art.params[name] for name in sig.params]
    if filter_plan:
        mod = filter_gradients(mod, ADJOINT, filter_plan)
    adjoint = relax.transform.DeadCodeElimination([ADJOINT])(mod)[ADJOINT]
    by_name = dict(zip(sig.params, init_params))
    init_state = optimizer.initial_state([by_name[name] for name in sig.trainable])
    targets_type = _tensor_type(sig.labels, batch_size)
    trained = [param_vars[sig.params.index(name)] for name in sig.trainable]
    mod = add_train_step(mod, ADJOINT, optimizer.function(trained), param_vars, sig.trainable,
                         init_state, targets_type)
    mod = _predict(art, sig, batch_size, param_vars, mod)
    mod = keep_entries(mod, ["train_step", "predict"])
    return TrainModule(mod, init_params, init_state, adjoint)


def optimizer_of(art: OrtArtifact, lr: float) -> OrtOptimizer:
    return read_optimizer(art.optimizer, lr, art.path(OPTIMIZER))
