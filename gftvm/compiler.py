"""``gftvm.compile``: forward ONNX model -> compiled train step -> artifact directory."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import tvm
from tvm import relax

from . import __version__, targets, trainable as trainable_policy, tuning
from .errors import ConfigError, ModelError
from .filter import (PLAN_HEADER, GradientFilter, LayerPlan, conv_backward_macs, plan_json,
                     resolve_plan)
from .frontend import onnx as onnx_frontend, ort
from .runtime import FORMAT_VERSION, MANIFEST, sha256
from .state import TrainState, write_state
from .train_graph import OptimizerConfig, TrainModule, build_train_module, donated_inputs

LIBRARY = "train_step.so"
STATE = "state.npz"


@dataclass
class Artifact:
    """A compiled train step with its initial parameters and optimizer state."""

    executable: relax.Executable
    manifest: dict
    state: TrainState

    def save(self, directory: str | os.PathLike) -> None:
        """Write library, state and manifest to ``directory`` (created if needed). The manifest
        is written last, so a directory with a manifest is complete."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        manifest_path = os.path.join(directory, MANIFEST)
        if os.path.exists(manifest_path):
            os.unlink(manifest_path)
        library = os.path.join(directory, LIBRARY)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            targets.export(self.executable, os.path.join(tmp, LIBRARY),
                           targets.get(self.manifest["target"]["name"]))
            os.replace(os.path.join(tmp, LIBRARY), library)
        write_state(os.path.join(directory, STATE), self.state)
        files = {"library": {"path": LIBRARY, "sha256": sha256(library)},
                 "state": {"path": STATE, "sha256": sha256(os.path.join(directory, STATE))}}
        with open(manifest_path + ".tmp", "w") as f:
            json.dump({**self.manifest, "files": files}, f, indent=1)
        os.replace(manifest_path + ".tmp", manifest_path)

    def summary(self) -> str:
        """A one-screen description of the artifact."""
        m = self.manifest
        params = {p["name"]: p for p in m["params"]}
        count = lambda names: sum(int(np.prod(params[n]["shape"])) for n in names)
        return "\n".join([
            f"model      {m['model']}",
            f"target     {m['target']['name']} ({m['target']['arch']})",
            f"input      {m['input']['name']} {m['input']['dtype']}{m['input']['shape']}, "
            f"{m['num_classes']} classes",
            f"trainable  {m['trainable_spec']}: {len(m['trainable'])} tensors, "
            f"{count(m['trainable']):,} of {count(params):,} values (BN statistics included)",
            f"optimizer  {m['optimizer']}",
            f"saved ctx  {m['saved_context_bytes']:,} bytes kept from forward for backward",
            f"conv bwd   {m['conv_backward_macs']:,} MACs per step",
            f"schedules  {m['tuned_kernels']} kernels with tuned schedules",
            f"versions   gftvm {m['versions']['gftvm']}, tvm {m['versions']['tvm']}",
            self.plan_table(),
        ])

    def plan_table(self) -> str:
        """The gradient-filter plan, one row per filtered layer."""
        config = self.manifest["gradient_filter"]
        if config is None:
            return "filter     none (exact backprop)"
        rows = [LayerPlan(**layer).row() for layer in config["plan"]]
        return "\n".join([f"filter     patch {config['patch']}, layers {config['layers']}",
                          PLAN_HEADER, *rows])


@dataclass
class TrainProgram:
    """A train-step module before ``tvm.compile``: the training module and the
    frontend-specific manifest entries (``info``)."""

    built: TrainModule
    info: dict

    @property
    def mod(self) -> tvm.IRModule:
        return self.built.mod


def build_program(model: onnx_frontend.ModelLike,
                  trainable: trainable_policy.TrainableSpec = "all", batch_size: int = 8,
                  optimizer: str = "sgd", lr: float = 0.05, momentum: float = 0.0,
                  weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                  eps: float = 1e-8, filter: GradientFilter | None = None,
                  progress: Callable[[str], None] | None = None) -> TrainProgram:
    """Import a forward ONNX model and build its train-step module (``train_step`` and
    ``predict``): what :func:`compile` compiles and tools/tune.py tunes."""
    say = progress or (lambda message: None)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be positive")
    where = "<onnx.ModelProto>" if isinstance(model, onnx.ModelProto) else os.fspath(model)
    opt = OptimizerConfig(optimizer, lr, momentum, weight_decay, tuple(betas), eps)
    relax_optimizer = opt.build()

    start = time.perf_counter()
    proto = onnx_frontend.load_model(model)
    names = trainable_policy.resolve(proto, trainable)
    onnx_frontend.check_differentiable(proto, set(names), where)
    forward = onnx_frontend.import_model(proto, batch_size, where)
    logits = forward["main"].ret_ty
    if not isinstance(logits, relax.TensorType) or len(logits.shape) != 2:
        raise ModelError(f"{where}: the output must be logits of shape (batch, classes), got "
                         f"{logits}")
    say(f"imported {where} ({len(proto.graph.node)} nodes) in {time.perf_counter() - start:.1f}s")
    plan = resolve_plan(proto, filter, names, forward) if filter is not None else []

    start = time.perf_counter()
    built = build_train_module(forward, names, batch_size, relax_optimizer,
                               {layer.weight: layer.patch for layer in plan})
    say(f"built the training graph in {time.perf_counter() - start:.1f}s")

    image = onnx_frontend.image_input(proto)
    return TrainProgram(built, {
        "model": where, "input_name": image.name,
        "trainable_spec": trainable if isinstance(trainable, str) else "list",
        "trainable": names, "optimizer": opt.to_json(),
        "conv_backward_macs": conv_backward_macs(proto, names, forward, plan),
        "gradient_filter": None if filter is None else {**filter.to_json(),
                                                        "plan": plan_json(plan)}})


#: onnxruntime-training's default learning rate (``Optimizer.get_learning_rate()``).
ORT_DEFAULT_LR = 1e-3


def build_ort_program(artifact: str | os.PathLike, batch_size: int | None = None,
                      lr: float = ORT_DEFAULT_LR, filter: GradientFilter | None = None,
                      progress: Callable[[str], None] | None = None) -> TrainProgram:
    """The train-step module of an onnxruntime-training artifact (directory or its
    training_model.onnx): its training graph, with the optimizer of optimizer_model.onnx at
    learning rate ``lr`` (ORT sets it at run time; the other hyper-parameters are in the
    artifact), trained and frozen parameters as the artifact has them, and the initial
    parameters of its checkpoint."""
    say = progress or (lambda message: None)
    start = time.perf_counter()
    art = ort.load_artifact(artifact)
    batch = ort.batch_of(art, batch_size)
    optimizer = ort.optimizer_of(art, lr)
    adjoint = ort.adjoint_module(art, batch)
    sig = ort.signature(art)
    say(f"translated {art.path(ort.TRAINING)} ({len(art.training.graph.node)} nodes) in "
        f"{time.perf_counter() - start:.1f}s")
    forward = tvm.IRModule({"main": adjoint[ort.ADJOINT]})
    plan = resolve_plan(art.training, filter, sig.trainable, forward) if filter else []
    start = time.perf_counter()
    built = ort.build_train_module(art, adjoint, optimizer,
                                   {layer.weight: layer.patch for layer in plan})
    say(f"built the training graph in {time.perf_counter() - start:.1f}s")
    return TrainProgram(built, {
        "model": art.directory, "frontend": "onnxruntime-training",
        "input_name": sig.image.name, "trainable_spec": "ort", "trainable": sig.trainable,
        "optimizer": optimizer.to_json(),
        "conv_backward_macs": conv_backward_macs(art.training, sig.trainable, forward, plan),
        "gradient_filter": None if filter is None else {**filter.to_json(),
                                                        "plan": plan_json(plan)}})


def compile(model: onnx_frontend.ModelLike, target: str = "host",
            trainable: trainable_policy.TrainableSpec = "all", batch_size: int = 8,
            optimizer: str = "sgd", lr: float = 0.05, momentum: float = 0.0,
            weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
            eps: float = 1e-8, filter: GradientFilter | None = None,
            progress: Callable[[str], None] | None = None,
            schedules: str | os.PathLike | bool = True,
            default_schedule: bool = True, winograd: bool = True) -> Artifact:
    """Compile the train step (forward, cross-entropy, backward, optimizer update) and the
    ``predict`` function of a forward ONNX model. ``schedules``: the tuning database applied
    (True: ``schedules/<target>/`` when present, False: none, or a database directory);
    ``default_schedule``: give the other kernels gftvm's default schedule (False: TVM's naive
    loops); ``winograd``: compute 3x3 stride-1 convs as Winograd products on CPU targets
    (passes/winograd.py; False: direct convs, bitwise closer to PyTorch). See README for the
    other options."""
    targets.get(target)
    program = build_program(model, trainable, batch_size, optimizer, lr, momentum,
                            weight_decay, betas, eps, filter, progress)
    return _package(program, target, schedules, default_schedule, winograd, progress)


def compile_ort(artifact: str | os.PathLike, target: str = "host", batch_size: int | None = None,
                lr: float = ORT_DEFAULT_LR, filter: GradientFilter | None = None,
                progress: Callable[[str], None] | None = None,
                schedules: str | os.PathLike | bool = True,
                default_schedule: bool = True, winograd: bool = True) -> Artifact:
    """Compile an onnxruntime-training artifact (see :func:`build_ort_program`)."""
    targets.get(target)
    program = build_ort_program(artifact, batch_size, lr, filter, progress)
    return _package(program, target, schedules, default_schedule, winograd, progress)


def _package(program: TrainProgram, target: str, schedules: str | os.PathLike | bool,
             default_schedule: bool, winograd: bool,
             progress: Callable[[str], None] | None) -> Artifact:
    """Compile the training module for ``target`` and describe it in the manifest."""
    say = progress or (lambda message: None)
    built = program.built
    spec = targets.get(target)
    start = time.perf_counter()
    tvm_target = spec.tvm_target()
    database = tuning.database_for(spec, schedules, say)
    say(f"compiling for {target} ({tvm_target.attrs['mcpu']})...")
    donated = donated_inputs(program.info["trainable"], len(built.optim_state))
    executable, tuned = tuning.compile_module(built.mod, tvm_target, database, default_schedule,
                                              {"train_step": donated}, winograd)
    say(f"compiled for {target} in {time.perf_counter() - start:.1f}s"
        + (f" ({tuned} kernels with tuned schedules)" if database is not None else ""))

    predict = built.mod["predict"]
    param_names = [p.name for p in predict.params[1:]]
    info = dict(program.info)
    input_name = info.pop("input_name")
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": info.pop("model"),
        "target": {"name": target, "arch": spec.arch, "tvm": str(tvm_target)},
        "input": {"name": input_name, "shape": [int(d) for d in predict.params[0].ty.shape],
                  "dtype": "float32"},
        "num_classes": int(predict.ret_ty.shape[1]),
        "params": [{"name": n, "shape": list(v.shape), "dtype": str(v.dtype)}
                   for n, v in zip(param_names, built.params)],
        **info,
        "saved_context_bytes": built.saved_bytes,
        "optim_state": [{"shape": list(v.shape), "dtype": str(v.dtype)}
                        for v in built.optim_state],
        "tuned_kernels": tuned,
        "default_schedule": default_schedule,
        "winograd": winograd and tvm_target.kind.name == "llvm",
        "versions": {"gftvm": __version__, "tvm": tvm.__version__},
    }
    state = TrainState(dict(zip(param_names, built.params)), built.optim_state, {"steps": 0})
    return Artifact(executable, manifest, state)
