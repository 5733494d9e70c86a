"""The device-side pieces, run on the host: training CLI and step timing over TVM RPC."""

import json
import socket
import subprocess
import sys
import time

import numpy as np

import gftvm
from gftvm import train
from gftvm.data import synthetic
from test_tools import TOOLS, run


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_measure_over_rpc_loopback(artifact_dir):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host",
                               "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)])
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        out = run("measure.py", str(artifact_dir), "--rpc", f"127.0.0.1:{port}", "--repeat",
                  "2", "--json")
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["target"] == "host" and result["step_ms"] > 0
