#!/usr/bin/env python
"""Move parameters between gftvm and onnxruntime-training checkpoints.

    python tools/ort_checkpoint.py to-ort GFTVM_CKPT.npz ORT_ARTIFACT_DIR OUT_CHECKPOINT
    python tools/ort_checkpoint.py from-ort ORT_CHECKPOINT GFTVM_ARTIFACT_DIR OUT.npz

``to-ort`` writes the parameters of a gftvm checkpoint (or an artifact's state.npz) as an ORT
checkpoint laid out like the ORT artifact's own; ``from-ort`` writes an ORT checkpoint's
parameters as a checkpoint that the compiled gftvm artifact loads (``Session.load_checkpoint``,
``python -m gftvm.train --resume``), with a fresh optimizer state.
"""

from __future__ import annotations

import argparse
import sys

import gftvm
from gftvm.frontend import ort


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_ort = commands.add_parser("to-ort", help="gftvm checkpoint -> ORT checkpoint")
    to_ort.add_argument("checkpoint")
    to_ort.add_argument("ort_artifact", help="the ORT artifact directory")
    to_ort.add_argument("output")
    from_ort = commands.add_parser("from-ort", help="ORT checkpoint -> gftvm checkpoint")
    from_ort.add_argument("checkpoint")
    from_ort.add_argument("gftvm_artifact", help="the compiled gftvm artifact directory")
    from_ort.add_argument("output")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-ort":
            ort.to_ort_checkpoint(args.checkpoint, args.ort_artifact, args.output)
        else:
            ort.from_ort_checkpoint(args.checkpoint, args.gftvm_artifact, args.output)
    except gftvm.GftvmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
