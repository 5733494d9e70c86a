#!/usr/bin/env python
"""Train-step variants for tools/bench.py, built from files in a work directory, so that the
benchmark times them side by side in one process and measures the memory of each in a fresh one.

A variant is a JSON-able dict: ``kind`` ("gftvm", "torch" or "ort"), ``dir`` (a gftvm artifact,
a directory with ``model.pt`` (the zoo model's state_dict) or an ORT artifact), ``batch``,
``image_size``, and for "torch" ``model`` (zoo name), ``trainable`` (parameter names) and
``patches`` (gradient-filtered Conv2d module -> R). Every variant steps on
``gftvm.data.synthetic(batch, image_size=image_size)``.

Peak train-step memory (``python tools/bench_steps.py VARIANT_JSON THREADS STEPS``, run by
:func:`peak_memory`): in a fresh process, after imports, loading and input creation, the
peak resident set (VmHWM) is reset (``/proc/self/clear_refs``); then ``STEPS`` steps run and
the result is VmHWM minus the resident set (VmRSS) just before the first step, in MiB: the
memory the steps add at their peak (activations, saved context, gradients, allocator pools)
on top of the loaded model, its parameters and optimizer state. PyTorch's momentum buffers
are allocated before that baseline, as gftvm's and ORT's optimizer state is at load.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable

MODEL_STATE = "model.pt"


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


def torch_step(variant: dict) -> Callable[[], object]:
    """PyTorch eager: cross-entropy, backward, SGD with momentum 0.9 (lr 1e-3)."""
    import torch

    model = torch_model(variant)
    images, labels = (torch.from_numpy(a) for a in inputs(variant))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    for param in params:  # allocate the momentum buffers now (a zero step changes nothing)
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad()

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


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
    return {"gftvm": gftvm_step, "torch": torch_step}[variant["kind"]](variant)


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


def peak_memory(variant: dict, threads: int, steps: int = 3) -> float:
    """:func:`peak_growth_mib` of the variant, measured in a fresh Python process."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(variant),
                          str(threads), str(steps)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory of {variant['kind']} variant {variant['dir']} failed:\n"
                           f"{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    variant, threads, steps = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    print(peak_growth_mib(make_step(variant, threads), steps))


if __name__ == "__main__":
    main()
