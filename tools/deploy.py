#!/usr/bin/env python
"""Copy an artifact and the gftvm runtime to a board over ssh, and start training there.

    python tools/deploy.py ARTIFACT user@board --data train.npz [--epochs 3] [--dry-run]

The board needs Python 3.10+ with numpy and the TVM runtime (README, "Targets and the device
side"); no compiler, no network, no torch/onnx. What is copied: the artifact directory, the
data file and the runtime-only part of gftvm (runtime, state, errors, train). Training runs as
``python3 -m gftvm.train`` in REMOTE_DIR, resuming from its checkpoint if one is there.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_FILES = ["__init__.py", "errors.py", "runtime.py", "state.py", "train.py"]


def commands(args: argparse.Namespace) -> list[list[str]]:
    """The ssh/scp commands that deploy and start training."""
    remote = args.remote_dir
    package = [os.path.join(REPO, "gftvm", name) for name in RUNTIME_FILES]
    train = (f"cd {shlex.quote(remote)} && TVM_USE_RUNTIME_LIB=1 python3 -m gftvm.train "
             f"artifact {shlex.quote(os.path.basename(args.data))} --epochs {args.epochs} "
             f"--resume")
    return [
        ["ssh", args.board, f"mkdir -p {shlex.quote(remote)}/gftvm"],
        ["scp", "-r", os.path.abspath(args.artifact), f"{args.board}:{remote}/artifact"],
        ["scp", *package, f"{args.board}:{remote}/gftvm/"],
        ["scp", os.path.abspath(args.data), f"{args.board}:{remote}/"],
        ["ssh", args.board, train],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="artifact directory (tools/compile.py --target ...)")
    parser.add_argument("board", help="ssh destination, e.g. pi@raspberrypi.local")
    parser.add_argument("--data", required=True, help=".npz with x (float32 NCHW) and y")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--remote-dir", default="gftvm-train")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    for path in (os.path.join(args.artifact, "manifest.json"), args.data):
        if not os.path.exists(path):
            print(f"error: {path} does not exist", file=sys.stderr)
            return 1
    for command in commands(args):
        print(" ".join(shlex.quote(part) for part in command), flush=True)
        if not args.dry_run:
            subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
