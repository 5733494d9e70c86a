"""Runtime behaviour: checkpoints, resumption, input validation, artifact integrity."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tvm
from tvm import relax

import gftvm
from gftvm import state, tuning
from reference import ARTIFACT_OPTIONS, random_batches

BATCHES = random_batches(4, 4)


def test_runtime_trains_without_compiler_dependencies(artifact_dir):
    """Blocks torch, onnx and onnxruntime (an import of them raises), then loads and steps."""
    code = f"""
import sys
for name in ("torch", "onnx", "onnxruntime"):
    sys.modules[name] = None
import numpy as np, gftvm.runtime
session = gftvm.runtime.load({str(artifact_dir)!r})
print(session.step(np.zeros((4, 3, 32, 32), np.float32), np.zeros(4, np.int64)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > 0


def test_checkpoint_resumes_exactly(artifact_dir, tmp_path):
    uninterrupted = gftvm.runtime.load(artifact_dir)
    losses = [uninterrupted.step(x, y) for x, y in BATCHES]

    first = gftvm.runtime.load(artifact_dir)
    for x, y in BATCHES[:2]:
        first.step(x, y)
    first.save_checkpoint(tmp_path / "ckpt.npz")
    resumed = gftvm.runtime.load(artifact_dir)
    resumed.load_checkpoint(tmp_path / "ckpt.npz")
    assert resumed.steps == 2
    assert [resumed.step(x, y) for x, y in BATCHES[2:]] == losses[2:]
    for name, value in uninterrupted.parameters().items():
        assert np.array_equal(value, resumed.parameters()[name]), name


def test_loss_decreases_on_a_repeated_batch(artifact_dir):
    session = gftvm.runtime.load(artifact_dir)
    x, y = BATCHES[0]
    losses = [session.step(x, y) for _ in range(5)]
    assert losses[-1] < losses[0] - 0.1
    assert session.predict(x).shape == (4, 10)


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((4, 3, 32, 32), np.float64), np.zeros(4, np.int64), "input 'input' must be float32"),
    (np.zeros((2, 3, 32, 32), np.float32), np.zeros(2, np.int64), r"shape \[4, 3, 32, 32\]"),
    (np.zeros((4, 3, 32, 32), np.float32), np.zeros(4, np.float32), "labels must be integers"),
    (np.zeros((4, 3, 32, 32), np.float32), np.array([0, 1, 2, 10]), r"labels must lie in \[0, 10\)"),
])
def test_step_rejects_bad_inputs(artifact_dir, x, y, message):
    session = gftvm.runtime.load(artifact_dir)
    before = session.parameters()
    with pytest.raises(gftvm.InputError, match=message):
        session.step(x, y)
    assert session.steps == 0
    for name, value in session.parameters().items():
        assert np.array_equal(value, before[name])


def test_a_step_that_returns_new_tensors_trains_the_same(artifact_dir, mcunet_onnx, tmp_path,
                                                         monkeypatch):
    """Without InPlaceStateUpdate, train_step returns new parameter and state tensors, and the
    Session must keep them at every step (it stops looking only when a step wrote all of them
    in place)."""
    monkeypatch.setattr(tuning, "InPlaceStateUpdate", lambda *_: tvm.transform.Sequential([]))
    gftvm.compile(mcunet_onnx, **ARTIFACT_OPTIONS).save(tmp_path / "copying")
    in_place, copying = gftvm.runtime.load(artifact_dir), gftvm.runtime.load(tmp_path / "copying")
    for x, y in BATCHES[:3]:
        np.testing.assert_allclose(copying.step(x, y), in_place.step(x, y), rtol=1e-6)
    expected = in_place.parameters()
    for name, value in copying.parameters().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7)


def checked_inputs(library) -> dict[str, list[int]]:
    """Per VM function, the inputs (by position) that each call checks."""
    text = relax.VMExecutable(library).as_text()
    return {name: [int(i) for i in re.findall(r"check_tensor_info in: %(\d+),", body)]
            for name, body in re.findall(r"^@(\w+):\n(.*?)(?=^@|\Z)", text, re.M | re.S)}


def test_calls_check_only_the_batch(artifact_dir):
    """The parameters and optimizer state are checked when the Session loads them, not at
    every call; a direct VM call still checks the batch, and names it."""
    library = tvm.runtime.load_module(str(artifact_dir / "train_step.so"))
    checked = checked_inputs(library)
    assert checked["train_step"] == [0, 1] and checked["predict"] == [0]
    saved = state.read_state(artifact_dir / "state.npz")
    x, y = BATCHES[0]
    train_step = relax.VirtualMachine(library, tvm.cpu())["train_step"]
    args = [tvm.runtime.tensor(v) for v in [*saved.params.values(), *saved.optim]]
    with pytest.raises(Exception, match="param=input"):
        train_step(tvm.runtime.tensor(x[:2]), tvm.runtime.tensor(y), *args)


def test_checkpoint_with_a_wrong_tensor_is_refused(artifact_dir, tmp_path):
    session = gftvm.runtime.load(artifact_dir)
    path = tmp_path / "ckpt.npz"
    session.save_checkpoint(path)
    saved = state.read_state(path)
    name, value = next(iter(saved.params.items()))
    saved.params[name] = value[:1]
    saved.optim[0] = saved.optim[0].astype(np.float64)
    state.write_state(path, saved)
    before = session.parameters()
    wrong = (rf"parameter {re.escape(name)} is float32\[1, .*\], the manifest has "
             rf"float32\[{value.shape[0]}, .*optimizer state 0 is float64")
    with pytest.raises(gftvm.CheckpointError, match=wrong):
        session.load_checkpoint(path)
    for name, value in session.parameters().items():
        assert np.array_equal(value, before[name])


def copy_artifact(artifact_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(artifact_dir, target)
    return target


def test_missing_artifact_file(artifact_dir, tmp_path):
    target = copy_artifact(artifact_dir, tmp_path)
    os.unlink(target / "state.npz")
    with pytest.raises(gftvm.ArtifactError, match="state file state.npz is missing"):
        gftvm.runtime.load(target)
    with pytest.raises(gftvm.ArtifactError, match="manifest.json is missing"):
        gftvm.runtime.load(tmp_path)


def test_a_library_rewritten_after_loading_is_refused(artifact_dir, tmp_path):
    """dlopen returns the library it first loaded from a path, so a Session of an artifact
    saved again over a loaded one would run the old code: the runtime refuses it."""
    target = copy_artifact(artifact_dir, tmp_path)
    gftvm.runtime.load(target)
    library = target / "train_step.so"
    (target / "new.so").write_bytes(library.read_bytes() + b"\0")
    os.replace(target / "new.so", library)  # a new file, as Artifact.save writes it
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"]["library"]["sha256"] = gftvm.runtime.sha256(str(library))
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(gftvm.ArtifactError, match="rewritten after this process loaded it"):
        gftvm.runtime.load(target)


def test_corrupted_library_fails_the_checksum(artifact_dir, tmp_path):
    target = copy_artifact(artifact_dir, tmp_path)
    library = target / "train_step.so"
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    with pytest.raises(gftvm.ArtifactError, match="checksum mismatch for train_step.so"):
        gftvm.runtime.load(target)


def test_artifact_for_another_target_is_refused(artifact_dir, tmp_path):
    import json

    target = copy_artifact(artifact_dir, tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["target"].update(name="cortex-a72", arch="aarch64")
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(gftvm.ArtifactError, match="built for target cortex-a72"):
        gftvm.runtime.load(target)


def test_truncated_checkpoint(artifact_dir, tmp_path):
    session = gftvm.runtime.load(artifact_dir)
    session.step(*BATCHES[0])
    path = tmp_path / "ckpt.npz"
    session.save_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(gftvm.CheckpointError, match="ckpt.npz is not a readable gftvm state"):
        session.load_checkpoint(path)


def test_checkpoint_from_another_artifact_is_refused(artifact_dir, tmp_path):
    session = gftvm.runtime.load(artifact_dir)
    path = tmp_path / "ckpt.npz"
    session.save_checkpoint(path)
    saved = state.read_state(path)
    saved.meta["library_sha256"] = "0" * 64
    state.write_state(path, saved)
    with pytest.raises(gftvm.CheckpointError, match="saved by another artifact"):
        session.load_checkpoint(path)


def test_failed_checkpoint_write_keeps_the_good_one(artifact_dir, tmp_path, monkeypatch):
    session = gftvm.runtime.load(artifact_dir)
    path = tmp_path / "ckpt.npz"
    session.save_checkpoint(path)
    good = path.read_bytes()
    session.step(*BATCHES[0])

    def crash(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        session.save_checkpoint(path)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
