import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import gftvm
from reference import ARTIFACT_OPTIONS, export, free_port, prepared_model


@pytest.fixture(scope="session")
def mcunet_onnx(tmp_path_factory):
    return export(prepared_model("mcunet"), tmp_path_factory.mktemp("mcunet") / "mcunet.onnx")


@pytest.fixture(scope="session")
def artifact_dir(mcunet_onnx, tmp_path_factory):
    """MCUNet, last 4 conv layers trained with SGD + momentum, batch 4, saved once."""
    directory = tmp_path_factory.mktemp("artifact")
    gftvm.compile(mcunet_onnx, **ARTIFACT_OPTIONS).save(directory)
    return directory


@pytest.fixture
def rpc_server():
    """A TVM RPC server on 127.0.0.1 (this machine as the board); yields its address. It runs
    in its own process group, stopped as a whole: the server's worker process outlives a
    terminated server otherwise."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host",
                               "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
                              start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            assert server.poll() is None, "the RPC server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "the RPC server did not start in 60 s"
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
