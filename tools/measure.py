#!/usr/bin/env python
"""Time one train step of an artifact on a board over TVM RPC.

    python tools/measure.py ARTIFACT --rpc HOST:PORT             # a board's rpc_server
    python tools/measure.py ARTIFACT --rpc-tracker HOST:PORT --rpc-key rasp4

On the board: ``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`` (plus
``--tracker HOST:PORT --key rasp4`` to register with a tracker). The library is uploaded,
loaded there, and ``train_step`` is timed with TVM's time_evaluator on random inputs and the
artifact's initial parameters. Prints the median in milliseconds (and JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import tvm
from tvm import rpc
from tvm.runtime.vm import VirtualMachine

from gftvm.runtime import read_manifest
from gftvm.state import read_state


def connect(args: argparse.Namespace) -> rpc.RPCSession:
    if args.rpc:
        host, port = args.rpc.rsplit(":", 1)
        return rpc.connect(host, int(port))
    host, port = args.rpc_tracker.rsplit(":", 1)
    return rpc.connect_tracker(host, int(port)).request(args.rpc_key)


def measure(directory: str, remote: rpc.RPCSession, repeat: int) -> float:
    """Median time of one train step in milliseconds on the remote CPU."""
    manifest = read_manifest(directory)
    library = manifest["files"]["library"]["path"]
    remote.upload(os.path.join(directory, library))
    device = remote.cpu()
    vm = VirtualMachine(remote.load_module(library), device)
    state = read_state(os.path.join(directory, manifest["files"]["state"]["path"]))
    spec = manifest["input"]
    rng = np.random.default_rng(0)
    tensor = lambda value: tvm.runtime.tensor(value, device)
    x = tensor(rng.normal(size=spec["shape"]).astype(spec["dtype"]))
    y = tensor(rng.integers(0, manifest["num_classes"], spec["shape"][0]).astype("int64"))
    params = [tensor(state.params[p["name"]]) for p in manifest["params"]]
    optim = [tensor(value) for value in state.optim]
    timer = vm.time_evaluator("train_step", device, number=1, repeat=repeat, min_repeat_ms=0)
    return float(np.median(timer(x, y, *params, *optim).results) * 1e3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--rpc", metavar="HOST:PORT", help="an rpc_server on the board")
    group.add_argument("--rpc-tracker", metavar="HOST:PORT", help="an RPC tracker")
    parser.add_argument("--rpc-key", default="rasp4", help="device key at the tracker")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    median = measure(args.artifact, connect(args), args.repeat)
    manifest = read_manifest(args.artifact)
    if args.json:
        print(json.dumps({"target": manifest["target"]["name"], "step_ms": median}))
    else:
        print(f"{manifest['target']['name']}: train_step median {median:.2f} ms "
              f"over {args.repeat} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
