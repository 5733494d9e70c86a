"""Parameter and optimizer-state files (.npz), shared by artifacts and checkpoints.

Keys: ``param/<initializer name>``, ``optim/<index>`` and ``meta`` (a JSON string). Files are
written atomically: a temporary file in the same directory, fsync, then rename, so a crash
never leaves a half-written file in place of a good one. Only numpy is needed to read them.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrainState:
    params: dict[str, np.ndarray]
    optim: list[np.ndarray]
    meta: dict = field(default_factory=dict)


def write_state(path: str | os.PathLike, state: TrainState) -> None:
    """Write ``state`` to ``path`` atomically."""
    arrays = {f"param/{name}": value for name, value in state.params.items()}
    arrays.update({f"optim/{i}": value for i, value in enumerate(state.optim)})
    arrays["meta"] = np.array(json.dumps(state.meta))
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_state(path: str | os.PathLike) -> TrainState:
    """Read a state file. Raises ValueError (with the path) if it is truncated or malformed."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{os.fspath(path)} is not a readable gftvm state file: {err}") from err
    params = {key.removeprefix("param/"): value for key, value in arrays.items()
              if key.startswith("param/")}
    optim = [arrays[f"optim/{i}"] for i in range(sum(k.startswith("optim/") for k in arrays))]
    return TrainState(params, optim, meta)
