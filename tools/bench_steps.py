#!/usr/bin/env python
"""Train-step variants for tools/bench.py, built from files in a work directory, each timed
and measured in a fresh process (``python tools/bench_steps.py VARIANT_JSON THREADS REPEAT
MEMORY_STEPS`` prints ``{"peak_mib": ..., "ms": ...}``), so that no framework's thread pool or
allocator disturbs another's.

A variant is a JSON-able dict: ``kind`` ("gftvm", "torch", "torch_forward_update" or "ort"),
``dir`` (a gftvm artifact, a directory with ``model.pt`` (the zoo model's state_dict) or an ORT
artifact), ``batch``, ``image_size``, and for "torch" and "torch_forward_update" ``model`` (zoo
name), ``trainable`` (parameter names) and ``patches`` (gradient-filtered Conv2d module -> R).
"torch_forward_update" is the "torch" step without backward (forward under ``no_grad``, the
same optimizer step): the lower bound of any method that only cuts backward work. Every
variant steps on ``gftvm.data.synthetic(batch, image_size=image_size)``.

Peak train-step memory: after imports, loading and input creation, the peak resident set
(VmHWM) is reset (``/proc/self/clear_refs``); then ``MEMORY_STEPS`` steps run (also the
warm-up of the timing) and ``peak_mib`` is VmHWM minus the resident set (VmRSS) just before
the first step: the memory the steps add at their peak (activations, saved context,
gradients, allocator pools, thread stacks) on top of the loaded model, its parameters and
optimizer state. PyTorch's momentum buffers are allocated before that baseline, as gftvm's and
ORT's optimizer state is at load. What the first steps initialise once counts too: for
PyTorch about 16-20 MiB that stay resident (MCUNet, batch 2, one thread), which dominates
small configurations. ``ms``: the median of ``REPEAT`` further steps.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable

from gftvm.timing import median_ms

MODEL_STATE = "model.pt"
#: Least time a timed measurement runs for: ten runs of a 0.3 ms call measured a moment of
#: this shared machine (a per-layer backward varied by 50 % between runs of the bench).
MIN_SECONDS = 0.5


def inputs(variant: dict):
    from gftvm.data import synthetic

    return synthetic(variant["batch"], image_size=variant["image_size"])


def gftvm_step(variant: dict) -> Callable[[], object]:
    import gftvm

    session = gftvm.runtime.load(variant["dir"])
    images, labels = inputs(variant)
    return lambda: session.step(images, labels)


def torch_model(variant: dict):
    """The zoo model with the state_dict saved in the variant's directory, BN in inference
    mode (as gftvm trains), the named Conv2d modules gradient-filtered (gftvm.reference)."""
    import torch

    from gftvm import models
    from gftvm.reference import filter_convs

    model = models.build(variant["model"])
    model.load_state_dict(torch.load(os.path.join(variant["dir"], MODEL_STATE)))
    model.eval()
    filter_convs(model, variant["patches"])
    for name, param in model.named_parameters():
        param.requires_grad_(name in variant["trainable"])
    return model


def momentum_sgd(model):
    """SGD with momentum 0.9 (lr 1e-3) on the model's trainable parameters, its momentum
    buffers allocated now (a step on zero gradients changes nothing); their gradients None."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def torch_training(variant: dict):
    """The variant's model (:func:`torch_model`), its batch as tensors and
    :func:`momentum_sgd` on its trained parameters."""
    import torch

    model = torch_model(variant)
    images, labels = (torch.from_numpy(a) for a in inputs(variant))
    return model, images, labels, momentum_sgd(model)


def torch_step(variant: dict) -> Callable[[], object]:
    """PyTorch eager: cross-entropy, backward, SGD with momentum 0.9 (lr 1e-3)."""
    import torch

    model, images, labels, optimizer = torch_training(variant)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def forward_update(model, images, labels, optimizer) -> Callable[[], object]:
    """A step without backward: the loss under ``torch.no_grad()``, then ``optimizer.step()``
    on the gradients the parameters already hold (set once; the update costs the same for any
    values). Refuses parameters without a gradient: the optimizer would skip them."""
    import torch

    missing = [i for group in optimizer.param_groups for i, p in enumerate(group["params"])
               if p.grad is None]
    if missing:
        raise ValueError(f"forward_update: optimizer parameters {missing} have no gradient")

    def step() -> None:
        with torch.no_grad():
            torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.step()

    return step


def torch_forward_update_step(variant: dict) -> Callable[[], object]:
    """:func:`torch_step` without its backward (:func:`forward_update`), gradients of ones."""
    import torch

    model, images, labels, optimizer = torch_training(variant)
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.ones_like(param)
    return forward_update(model, images, labels, optimizer)


def ort_step(variant: dict, threads: int) -> Callable[[], object]:
    """onnxruntime-training's training API on the artifact: forward+backward, SGD step."""
    import onnxruntime
    from onnxruntime.training import api as ort_api

    from gftvm.frontend import ort

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    path = lambda name: os.path.join(variant["dir"], name)
    state = ort_api.CheckpointState.load_checkpoint(path(ort.CHECKPOINT))
    module = ort_api.Module(path(ort.TRAINING), state, path(ort.EVAL), session_options=options)
    optimizer = ort_api.Optimizer(path(ort.OPTIMIZER), module)
    optimizer.set_learning_rate(1e-3)
    module.train()
    images, labels = inputs(variant)

    def step() -> None:
        module(images, labels)
        optimizer.step()
        module.lazy_reset_grad()

    return step


def make_step(variant: dict, threads: int) -> Callable[[], object]:
    """The variant's train step, ready to call (everything loaded)."""
    if variant["kind"] == "ort":
        return ort_step(variant, threads)
    return {"gftvm": gftvm_step, "torch": torch_step,
            "torch_forward_update": torch_forward_update_step}[variant["kind"]](variant)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (peak memory needs Linux)")


def peak_growth_mib(step: Callable[[], object], steps: int) -> float:
    """Peak resident memory that ``steps`` calls of ``step`` add, in MiB (see module doc)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    for _ in range(steps):
        step()
    return (_status_kib("VmHWM") - before) / 1024


def measure(variant: dict, threads: int, repeat: int, memory_steps: int) -> dict:
    """``peak_mib`` (:func:`peak_growth_mib` of the first ``memory_steps`` steps) and ``ms``
    (median of ``repeat`` steps after those, or of as many as take ``MIN_SECONDS``)."""
    step = make_step(variant, threads)
    peak = peak_growth_mib(step, memory_steps)
    return {"peak_mib": peak, "ms": median_ms(step, repeat, warmup=0, min_seconds=MIN_SECONDS)}


def run_fresh(script: str, args: list, what: str) -> dict:
    """Run ``python script *args`` in a new process; the JSON object its last line prints."""
    out = subprocess.run([sys.executable, os.path.abspath(script), *map(str, args)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_in_fresh_process(variant: dict, threads: int, repeat: int,
                             memory_steps: int = 3) -> dict:
    """:func:`measure` in a new Python process, alone with its own thread pools."""
    return run_fresh(__file__, [json.dumps(variant), threads, repeat, memory_steps],
                     f"measuring the {variant['kind']} step of {variant['dir']}")


def main() -> None:
    variant = json.loads(sys.argv[1])
    threads, repeat, memory_steps = (int(a) for a in sys.argv[2:5])
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    print(json.dumps(measure(variant, threads, repeat, memory_steps)))


if __name__ == "__main__":
    main()
