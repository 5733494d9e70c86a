"""gftvm: compile CNN training steps with TVM Relax, with gradient filtering.

``gftvm.runtime`` needs only numpy and the TVM runtime. The compiler (``gftvm.compile``) and the
model zoo (``gftvm.models``) import onnx and torch, so they are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from . import errors, runtime  # noqa: E402,F401  (public submodules)
from .errors import *  # noqa: E402,F401,F403


def compile(model, **options) -> Any:  # noqa: A001  (the public name the contract fixes)
    """Compile a forward ONNX model (:func:`gftvm.compiler.compile`) or an onnxruntime-training
    artifact directory (:func:`gftvm.compiler.compile_ort`) into a train-step artifact."""
    import inspect

    from .compiler import compile as compile_model
    from .compiler import compile_ort
    from .frontend.ort import is_artifact

    if not is_artifact(model):
        return compile_model(model, **options)
    extra = sorted(set(options) - set(inspect.signature(compile_ort).parameters))
    if extra:
        raise errors.ConfigError(f"{model} is an onnxruntime-training artifact: options {extra} "
                                 f"do not apply (its optimizer, hyper-parameters and trained "
                                 f"parameters come from the artifact; only lr is set here)")
    return compile_ort(model, **options)


def __getattr__(name: str) -> Any:
    if name == "GradientFilter":
        from .filter import GradientFilter

        return GradientFilter
    if name in ("models", "compiler", "passes"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gftvm' has no attribute {name!r}")
