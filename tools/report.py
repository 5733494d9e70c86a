#!/usr/bin/env python
"""Turn tools/finetune.py records into a paper-shaped markdown table and plots.

    python tools/report.py RUNS_DIR [-o docs/accuracy_table.md] [--plots docs/]

Rows: models (a model fine-tuned through the ORT frontend is a row of its own). Columns: BP
all, BP L2, BP L4, GF R2 L2, GF R2 L4, GF R4 L4. Each cell:
mean ± std top-1 accuracy over seeds (and the seed count), conv backward MACs per step, and
the bytes the forward keeps for the backward (both measured from the compiled module).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import defaultdict

import numpy as np

COLUMNS = [("all", 0, "BP all"), ("last:2", 0, "BP L2"), ("last:4", 0, "BP L4"),
           ("last:2", 2, "GF R2 L2"), ("last:4", 2, "GF R2 L4"), ("last:4", 4, "GF R4 L4")]


def load_runs(directory: str) -> dict[tuple[str, str], list[dict]]:
    """Records grouped by (model, column label)."""
    labels = {(train, patch): label for train, patch, label in COLUMNS}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        label = labels.get((record["train"], record["patch"]))
        if label:
            row = record["model"] + (" (ORT artifact)" if record.get("frontend") == "ort" else "")
            groups[row, label].append(record)
    return groups


def human(value: float, unit: str) -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.1f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def table(groups: dict[tuple[str, str], list[dict]]) -> str:
    models = sorted({model for model, _ in groups})
    lines = ["| model | " + " | ".join(label for *_, label in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for model in models:
        cells = []
        for *_, label in COLUMNS:
            runs = groups.get((model, label), [])
            if not runs:
                cells.append("–")
                continue
            acc = np.array([r["accuracy"] for r in runs]) * 100
            cells.append(f"{acc.mean():.1f} ± {acc.std():.1f} (n={len(runs)})<br>"
                         f"{human(runs[0]['conv_backward_macs'], 'MAC')}<br>"
                         f"{human(runs[0]['saved_context_bytes'], 'B')}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(groups: dict[tuple[str, str], list[dict]], directory: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({model for model, _ in groups})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for *_, label in COLUMNS:
            runs = groups.get((model, label), [])
            if runs:
                acc = [r["accuracy"] * 100 for r in runs]
                ax.errorbar(runs[0]["conv_backward_macs"], np.mean(acc), yerr=np.std(acc),
                            fmt="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set(title=model, xlabel="conv backward MACs per step", ylabel="top-1 accuracy (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    accuracy_path = os.path.join(directory, "accuracy_vs_macs.png")
    fig.savefig(accuracy_path, dpi=90)

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for *_, label in COLUMNS:
            runs = groups.get((model, label), [])
            if runs:
                curve = np.mean([r["loss_per_epoch"] for r in runs], axis=0)
                ax.plot(range(1, len(curve) + 1), curve, marker="o", label=label)
        ax.set(title=model, xlabel="fine-tuning epoch", ylabel="mean training loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    loss_path = os.path.join(directory, "loss_curves.png")
    fig.savefig(loss_path, dpi=90)
    return [accuracy_path, loss_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs")
    parser.add_argument("-o", "--output", help="write the table here (default: print)")
    parser.add_argument("--plots", help="directory for accuracy_vs_macs.png, loss_curves.png")
    args = parser.parse_args(argv)
    groups = load_runs(args.runs)
    if not groups:
        print(f"error: no finetune records in {args.runs}", file=sys.stderr)
        return 1
    text = table(groups)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        for path in plots(groups, args.plots):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
