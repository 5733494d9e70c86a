"""The CLI and the demo, run as a user runs them."""

import os
import re
import subprocess
import sys

import gftvm

TOOLS = os.path.join(os.path.dirname(__file__), os.pardir, "tools")


def run(tool, *args, cwd=None):
    out = subprocess.run([sys.executable, os.path.join(TOOLS, tool), *args], cwd=cwd,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_compile_cli(mcunet_onnx, tmp_path):
    out = run("compile.py", str(mcunet_onnx), "--train", "last:2", "--batch", "2",
              "--optimizer", "adam", "--lr", "0.001", "-o", str(tmp_path / "art"))
    assert "trainable  last:2: 8 tensors" in out
    session = gftvm.runtime.load(tmp_path / "art")
    assert session.manifest["optimizer"]["name"] == "adam"
    assert session.manifest["input"]["shape"] == [2, 3, 32, 32]


def test_compile_cli_prints_the_filter_plan(mcunet_onnx, tmp_path):
    out = run("compile.py", str(mcunet_onnx), "--train", "last:2", "--batch", "2",
              "--filter-patch", "4", "--filter-layers", "last:2", "-o", str(tmp_path / "art"))
    assert "filter     patch 4, layers last:2" in out
    plan = gftvm.runtime.load(tmp_path / "art").manifest["gradient_filter"]["plan"]
    for layer in plan:
        assert layer["node"] in out and f"R{layer['patch']}" in out


def test_compile_cli_reports_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "compile.py"), str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "error: cannot parse ONNX model" in out.stderr and "bad.onnx" in out.stderr


def test_demo_loss_goes_down(tmp_path):
    out = run("demo.py", cwd=tmp_path)
    means = [float(v) for v in re.search(r"mean loss per 10 steps: (.*)", out)[1].split(" -> ")]
    assert means[-1] < means[0] - 0.3
    assert os.path.exists(tmp_path / "out/demo/manifest.json")
