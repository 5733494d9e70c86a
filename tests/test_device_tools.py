"""The device-side pieces, run on the host: training CLI and step timing over TVM RPC."""

import json
import os
import subprocess
import sys

import numpy as np

import gftvm
from gftvm import train
from gftvm.data import synthetic
from test_tools import run


def test_train_cli_trains_and_resumes(artifact_dir, tmp_path, capsys):
    x, y = synthetic(12, seed=1)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    checkpoint = str(tmp_path / "ckpt.npz")
    args = [str(artifact_dir), str(tmp_path / "data.npz"), "--checkpoint", checkpoint]
    assert train.main(args + ["--epochs", "2"]) == 0
    assert train.main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("3 steps") == 3 and "epoch 2" in out
    session = gftvm.runtime.load(artifact_dir)
    session.load_checkpoint(checkpoint)
    assert session.steps == 9


def test_train_cli_reports_bad_data(artifact_dir, tmp_path, capsys):
    np.savez(tmp_path / "data.npz", images=np.zeros(3))
    assert train.main([str(artifact_dir), str(tmp_path / "data.npz")]) == 1
    assert "expected an .npz with arrays 'x' and 'y'" in capsys.readouterr().err


def test_measure_over_rpc_loopback(artifact_dir, rpc_server):
    out = run("measure.py", str(artifact_dir), "--rpc", rpc_server, "--repeat", "2", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["target"] == "host" and result["step_ms"] > 0


def test_deploy_copies_only_the_runtime_and_starts_training(artifact_dir, tmp_path):
    """The device bundle: these files import nothing of the compiler (checked by running
    them from a copy without the rest of gftvm, torch or onnx)."""
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 3, 32, 32), np.float32),
             y=np.zeros(4, np.int64))
    out = run("deploy.py", str(artifact_dir), "pi@board", "--data", str(tmp_path / "data.npz"),
              "--dry-run")
    lines = out.strip().splitlines()
    assert lines[-1].startswith("ssh pi@board 'cd gftvm-train && TVM_USE_RUNTIME_LIB=1 python3 "
                                "-m gftvm.train artifact data.npz")
    copied = next(line for line in lines if line.startswith("scp") and "runtime.py" in line)
    bundle = tmp_path / "device" / "gftvm"
    bundle.mkdir(parents=True)
    for path in copied.split()[1:-1]:
        bundle.joinpath(os.path.basename(path)).write_bytes(open(path, "rb").read())
    code = ("import sys\nfor m in ('torch', 'onnx', 'onnxruntime'): sys.modules[m] = None\n"
            "from gftvm import train\n"
            f"sys.exit(train.main([{str(artifact_dir)!r}, {str(tmp_path / 'data.npz')!r}, "
            f"'--checkpoint', {str(tmp_path / 'ck.npz')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "device",
                            capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(tmp_path / "device")))
    assert result.returncode == 0, result.stderr
    assert "epoch 1: mean loss" in result.stdout
