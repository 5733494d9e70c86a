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
    """Compile a forward ONNX model into a train-step artifact; see :func:`gftvm.compiler.compile`."""
    from .compiler import compile as compile_model

    return compile_model(model, **options)


def __getattr__(name: str) -> Any:
    if name == "GradientFilter":
        from .filter import GradientFilter

        return GradientFilter
    if name in ("models", "compiler", "passes"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'gftvm' has no attribute {name!r}")
