"""Cortex-A72 artifacts, run in an aarch64 Python under qemu-aarch64 -cpu cortex-a72, match the
host artifact. The emulator comes from tools/setup_aarch64_emulation.sh (make test runs it);
without it this test fails, it does not skip."""

import json
import os
import subprocess

import numpy as np
import pytest

import gftvm
from reference import export, prepared_model, random_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATED_PYTHON = os.environ.get("GFTVM_AARCH64_PYTHON", os.path.join(REPO, ".aarch64", "python"))

EMULATED_STEPS = """
import json, sys
import numpy as np
import gftvm.runtime
artifact, data, out = sys.argv[1:]
session = gftvm.runtime.load(artifact)
batches = np.load(data)
losses = [session.step(batches[f"x{i}"], batches[f"y{i}"]) for i in range(2)]
np.savez(out, **session.parameters())
print(json.dumps({"losses": losses, "target": session.manifest["target"]["name"]}))
"""


@pytest.mark.parametrize("grad_filter", [None, gftvm.GradientFilter(2, "last:4")],
                         ids=["exact", "filtered"])
def test_cortex_a72_artifact_matches_host_under_qemu(grad_filter, tmp_path):
    assert os.access(EMULATED_PYTHON, os.X_OK), (
        f"{EMULATED_PYTHON} is missing: run tools/setup_aarch64_emulation.sh .aarch64")
    path = export(prepared_model("mobilenetv2-0.35"), tmp_path / "model.onnx")
    options = dict(trainable="last:4", batch_size=4, optimizer="sgd", lr=0.005, momentum=0.9,
                   filter=grad_filter)
    for target in ("host", "cortex-a72"):
        gftvm.compile(path, target=target, **options).save(tmp_path / target)
    batches = random_batches(2, 4)
    np.savez(tmp_path / "data.npz", **{f"x{i}": x for i, (x, _) in enumerate(batches)},
             **{f"y{i}": y for i, (_, y) in enumerate(batches)})

    host = gftvm.runtime.load(tmp_path / "host")
    host_losses = [host.step(x, y) for x, y in batches]
    with pytest.raises(gftvm.ArtifactError, match="built for target cortex-a72 .aarch64."):
        gftvm.runtime.load(tmp_path / "cortex-a72")

    env = dict(os.environ, PYTHONPATH=REPO, TVM_USE_RUNTIME_LIB="1")
    out = subprocess.run([EMULATED_PYTHON, "-c", EMULATED_STEPS, str(tmp_path / "cortex-a72"),
                          str(tmp_path / "data.npz"), str(tmp_path / "arm_params.npz")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["target"] == "cortex-a72"
    np.testing.assert_allclose(result["losses"], host_losses, rtol=1e-4)
    with np.load(tmp_path / "arm_params.npz") as arm:
        for name, value in host.parameters().items():
            np.testing.assert_allclose(arm[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
