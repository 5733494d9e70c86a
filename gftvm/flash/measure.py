"""Latency of search-space networks, measured on modules that gftvm compiles.

A config is exported to ONNX (:func:`gftvm.models.export_onnx`), compiled with
:func:`gftvm.compile` (every parameter trainable, SGD) and saved as an artifact; on the host
its ``predict`` and ``train_step`` are timed through :class:`gftvm.runtime.Session`. A board
times the same artifact over TVM RPC (``tools/search.py measure --rpc ...``).
"""

from __future__ import annotations

import os

import numpy as np

import gftvm
from gftvm import models

from ..timing import median_ms
from .space import Config, build


def compile_config(config: Config, directory: str, target: str = "host", batch: int = 1,
                   image_size: int = 32, num_classes: int = 10) -> str:
    """Export ``config``, compile its train step for ``target`` and save the artifact in
    ``directory`` (the ONNX model next to it); returns the artifact directory."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model.onnx")
    models.export_onnx(build(config, num_classes), path, (1, 3, image_size, image_size))
    artifact = os.path.join(directory, "artifact")
    gftvm.compile(path, target=target, trainable="all", batch_size=batch,
                  optimizer="sgd", lr=0.01, momentum=0.9).save(artifact)
    return artifact


def planned_activation_bytes(config: Config, batch: int = 1, image_size: int = 32) -> int:
    """Bytes that Relax's static memory planner reserves for the forward of ``config`` as
    gftvm imports it (parameters excluded): the compiler's answer to the memory model."""
    import tempfile

    import onnx

    from ..analysis import planned_storage_bytes
    from ..frontend import onnx as onnx_frontend

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        models.export_onnx(build(config), path, (1, 3, image_size, image_size))
        forward = onnx_frontend.import_model(onnx.load(path), batch, path)
    return planned_storage_bytes(forward, "main")


def time_host(artifact: str, repeat: int = 10) -> dict[str, float]:
    """Median ms of ``predict`` and of one ``train_step`` of a host artifact."""
    session = gftvm.runtime.load(artifact)
    spec = session.manifest["input"]
    rng = np.random.default_rng(0)
    x = rng.random(spec["shape"], dtype=np.float32)
    y = rng.integers(0, session.manifest["num_classes"], spec["shape"][0])
    return {"predict_ms": median_ms(lambda: session.predict(x), repeat),
            "step_ms": median_ms(lambda: session.step(x, y), repeat)}
