"""The on-device runtime: load an artifact directory and train with it.

Imports only numpy and the TVM runtime (no torch, onnx or onnxruntime), so it runs wherever
the TVM runtime does.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

from .errors import ArtifactError, CheckpointError, InputError
from .state import TrainState, read_state, write_state

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: The libraries this process has loaded, by real path, with their checksums.
_LOADED: dict[str, str] = {}


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str) -> dict:
    """Read and check ``manifest.json`` and the checksums of the files it lists."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError as err:
        raise ArtifactError(f"{directory} is not a gftvm artifact: {MANIFEST} is missing") from err
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path} is unreadable: {err}") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')!r}, this "
                            f"runtime reads version {FORMAT_VERSION}")
    for role, entry in manifest["files"].items():
        file = os.path.join(directory, entry["path"])
        if not os.path.exists(file):
            raise ArtifactError(f"artifact {directory}: the {role} file {entry['path']} is missing")
        if sha256(file) != entry["sha256"]:
            raise ArtifactError(f"artifact {directory}: checksum mismatch for {entry['path']} "
                                f"(corrupted or modified after compilation)")
    return manifest


def _load_library(path: str, checksum: str) -> tvm.runtime.Module:
    """Load the artifact's library, unless this process loaded another file from that path:
    dlopen would return the library it loaded first, and a step would run the old code on
    the new artifact's tensors (whose shapes the compiled functions do not check)."""
    path = os.path.realpath(path)
    if _LOADED.get(path, checksum) != checksum:
        raise ArtifactError(f"{path} was rewritten after this process loaded it, and a process "
                            f"cannot load a library twice from one path: load the new artifact "
                            f"in a new process, or save it to another directory")
    library = tvm.runtime.load_module(path)
    _LOADED[path] = checksum
    return library


def _device(manifest: dict) -> tvm.runtime.Device:
    """The CPU, if the artifact was built for this machine's architecture."""
    target = manifest["target"]
    if target["arch"] != platform.machine():
        raise ArtifactError(f"artifact was built for target {target['name']} "
                            f"({target['arch']}); this machine is {platform.machine()}")
    return tvm.cpu()


class Session:
    """A loaded artifact with its current parameters and optimizer state. It checks them
    against the manifest when it loads them; the compiled functions check only the batch at
    each call (``train_graph.data_inputs``)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        directory = os.fspath(directory)
        self.manifest = read_manifest(directory)
        self.device = _device(self.manifest)
        files = self.manifest["files"]
        library = _load_library(os.path.join(directory, files["library"]["path"]),
                                files["library"]["sha256"])
        self._vm = VirtualMachine(library, self.device)
        self._names = [p["name"] for p in self.manifest["params"]]
        self._trainable = [self._names.index(n) for n in self.manifest["trainable"]]
        spec = self.manifest["input"]
        self._x = tvm.runtime.empty(spec["shape"], spec["dtype"], self.device)
        self._y = tvm.runtime.empty([spec["shape"][0]], "int64", self.device)
        self._in_place = False
        try:
            state = read_state(os.path.join(directory, files["state"]["path"]))
        except ValueError as err:
            raise ArtifactError(str(err)) from err
        self._set_state(state)

    # -- training ---------------------------------------------------------------------------
    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step on the batch; returns the mean cross-entropy before the update.
        The batch is copied into tensors the Session keeps: a new tensor per step cost more
        than the copy (docs/benchmarks.md, "Where the time goes")."""
        self._x.copyfrom(self._check_input(x))
        self._y.copyfrom(self._check_labels(y))
        loss, updated, state = self._vm["train_step"](self._x, self._y, *self._params,
                                                      *self._optim)
        if not self._in_place:
            self._keep(updated, state)
        self.steps += 1
        return float(np.from_dlpack(loss))

    def _keep(self, updated, state) -> None:
        """Hold the step's new parameters and optimizer state. A step that wrote all of them
        over the tensors it was given (InPlaceStateUpdate) does so at every step (the same code
        runs), and then the Session stops reading them back (hundreds of tensors per step)."""
        given = [*(self._params[i] for i in self._trainable), *self._optim]
        self._in_place = all(new.same_as(old) for new, old in zip([*updated, *state], given))
        for index, value in zip(self._trainable, updated):
            self._params[index] = value
        self._optim = tuple(state)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for the batch, with the current parameters."""
        self._x.copyfrom(self._check_input(x))
        return self._vm["predict"](self._x, *self._params).numpy()

    def parameters(self) -> dict[str, np.ndarray]:
        """Current parameters by ONNX initializer name."""
        return {name: value.numpy() for name, value in zip(self._names, self._params)}

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write parameters, optimizer state and step count atomically."""
        meta = {"library_sha256": self.manifest["files"]["library"]["sha256"],
                "steps": self.steps}
        write_state(path, TrainState(self.parameters(), [s.numpy() for s in self._optim], meta))

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint saved by :meth:`save_checkpoint` of the same artifact."""
        try:
            state = read_state(path)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        if state.meta.get("library_sha256") != self.manifest["files"]["library"]["sha256"]:
            raise CheckpointError(f"checkpoint {os.fspath(path)} was saved by another artifact")
        try:
            self._set_state(state)
        except ArtifactError as err:
            raise CheckpointError(f"checkpoint {os.fspath(path)}: {err}") from err

    def _set_state(self, state: TrainState) -> None:
        """Take ``state`` as the current one, after checking every tensor's dtype and shape
        against the manifest (the compiled functions do not check them at each call)."""
        m = self.manifest
        expected = _specs({p["name"]: (p["dtype"], p["shape"]) for p in m["params"]},
                          [(s["dtype"], s["shape"]) for s in m["optim_state"]])
        got = _specs({n: (v.dtype, v.shape) for n, v in state.params.items()},
                     [(v.dtype, v.shape) for v in state.optim])
        wrong = [k for k in {**expected, **got} if got.get(k) != expected.get(k)]
        if wrong:
            raise ArtifactError("parameters or optimizer state do not match the manifest: "
                                + "; ".join(f"{k} is {got.get(k, 'absent')}, the manifest has "
                                            f"{expected.get(k, 'none')}" for k in wrong[:5]))
        self._params = [tvm.runtime.tensor(state.params[n], self.device) for n in self._names]
        self._optim = tuple(tvm.runtime.tensor(v, self.device) for v in state.optim)
        self.steps = int(state.meta.get("steps", 0))

    # -- input checks -----------------------------------------------------------------------
    def _check_input(self, x: np.ndarray) -> np.ndarray:
        spec = self.manifest["input"]
        x = np.asarray(x)
        if x.dtype != np.dtype(spec["dtype"]) or list(x.shape) != spec["shape"]:
            raise InputError(f"input '{spec['name']}' must be {spec['dtype']} of shape "
                             f"{spec['shape']}, got {x.dtype} of shape {list(x.shape)}")
        return np.ascontiguousarray(x)

    def _check_labels(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y)
        batch, classes = self.manifest["input"]["shape"][0], self.manifest["num_classes"]
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (batch,):
            raise InputError(f"labels must be integers of shape ({batch},), got {y.dtype} of "
                             f"shape {list(y.shape)}")
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise InputError(f"labels must lie in [0, {classes}), got [{y.min()}, {y.max()}]")
        return y.astype(np.int64)


def _specs(params: dict[str, tuple], optim: list[tuple]) -> dict[str, str]:
    """``dtype[shape]`` of each parameter and optimizer-state tensor, given as (dtype, shape)."""
    text = lambda dtype, shape: f"{dtype}{[int(d) for d in shape]}"
    return {**{f"parameter {n}": text(*spec) for n, spec in params.items()},
            **{f"optimizer state {i}": text(*spec) for i, spec in enumerate(optim)}}


def load(directory: str | os.PathLike) -> Session:
    """Load an artifact directory written by ``Artifact.save``."""
    return Session(directory)
