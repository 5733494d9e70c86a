#!/usr/bin/env python
"""Transfer experiment: pretrain in PyTorch on one partition, fine-tune with the compiled
runtime on a differently distributed partition, evaluate with the compiled ``predict``.

    python tools/finetune.py --model mcunet --train last:4 [--patch 2] --seed 0 --out runs/
        [--frontend ort --momentum 0]

Data: scikit-learn's digits upsampled to 32×32 (``--data digits``), or CIFAR-10 python batches
(``--data cifar:DIR``). The pretraining partition holds 80% of classes 0-4 and 20% of 5-9, the
fine-tuning partition the rest, split 70/30 into train and test (gftvm.data.non_iid_split).
BatchNorm runs in eval mode while fine-tuning (gftvm's policy). Pretrained weights are cached
per (model, seed, data) under OUT/pretrained/. Writes one JSON record per run to OUT.

``--frontend ort`` runs the same protocol through an onnxruntime-training artifact of the
pretrained model (gftvm.frontend.ort.generate_artifacts, the non-trained parameters frozen),
compiled by gftvm's ORT frontend. ORT's artifact has plain SGD (no momentum: give
``--momentum 0``) and trains BatchNorm on batch statistics, as ORT defines it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import gftvm
from gftvm import data, models

SPLIT_SEED = 0   # the partitions are the same for every run; --seed varies init and order
# PyTorch pretrains in this process first; TVM's pool, started later, would pin a worker to
# the core where PyTorch's OpenMP thread runs (see tools/bench.py, bench_layers).
os.environ.setdefault("TVM_BIND_THREADS", "0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mcunet", choices=sorted(models.ZOO))
    parser.add_argument("--train", default="last:4", help="'all' or 'last:K'")
    parser.add_argument("--patch", type=int, default=0, help="gradient-filter R (0: exact BP)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="digits", help="digits or cifar:DIR")
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--pretrain-lr", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--frontend", choices=["onnx", "ort"], default="onnx",
                        help="forward ONNX export, or an onnxruntime-training artifact")
    parser.add_argument("--limit", type=int, default=0, help="use at most N samples per split "
                        "(smoke tests)")
    parser.add_argument("--out", default="runs")
    return parser.parse_args(argv)


def load(spec: str) -> tuple[np.ndarray, np.ndarray]:
    if spec == "digits":
        return data.load_digits()
    if spec.startswith("cifar:"):
        return data.load_cifar(spec.removeprefix("cifar:"))
    raise SystemExit(f"--data {spec!r}: expected digits or cifar:DIR")


def partitions(x: np.ndarray, y: np.ndarray, limit: int) -> dict[str, tuple]:
    pre, fine = data.non_iid_split(y, 0.8, SPLIT_SEED)
    fine = np.random.default_rng(SPLIT_SEED).permutation(fine)
    cut = int(0.7 * len(fine))
    parts = {"pretrain": pre, "train": fine[:cut], "test": fine[cut:]}
    return {k: (x[v[:limit or None]], y[v[:limit or None]]) for k, v in parts.items()}


def pretrain(args: argparse.Namespace, x: np.ndarray, y: np.ndarray) -> torch.nn.Module:
    path = os.path.join(args.out, "pretrained",
                        f"{args.model}-s{args.seed}-{args.data.replace('/', '_')}"
                        f"-e{args.pretrain_epochs}-lr{args.pretrain_lr}-n{len(x)}.pt")
    torch.manual_seed(args.seed)
    model = models.build(args.model, int(y.max()) + 1 if args.data != "digits" else 10)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    rng = np.random.default_rng(args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.pretrain_lr, momentum=0.9,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.pretrain_epochs)
    model.train()
    for _ in tqdm(range(args.pretrain_epochs), desc=f"pretrain {args.model}", leave=False):
        order = rng.permutation(len(x))
        for first in range(0, len(x) - args.batch + 1, args.batch):
            index = order[first:first + args.batch]
            xb = torch.from_numpy(data.augment(x[index], rng))
            loss = torch.nn.functional.cross_entropy(model(xb), torch.from_numpy(y[index]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return model.eval()


def accuracy(session: gftvm.runtime.Session, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy with the compiled predict; the last partial batch is padded."""
    batch = session.manifest["input"]["shape"][0]
    correct = 0
    for first in range(0, len(x), batch):
        xb = x[first:first + batch]
        padded = np.concatenate([xb, np.repeat(xb[-1:], batch - len(xb), 0)])
        correct += int((session.predict(padded)[:len(xb)].argmax(1) == y[first:first + batch])
                       .sum())
    return correct / len(x)


def compile_finetune(args: argparse.Namespace, model: torch.nn.Module, workdir: str) -> None:
    """Export the pretrained model (forward ONNX, or an ORT artifact) and compile its train step
    into ``workdir``."""
    os.makedirs(workdir, exist_ok=True)
    onnx_path = os.path.join(workdir, "model.onnx")
    models.export_onnx(model, onnx_path, (1, 3, 32, 32))
    grad_filter = gftvm.GradientFilter(args.patch, args.train) if args.patch else None
    if args.frontend == "onnx":
        gftvm.compile(onnx_path, trainable=args.train, batch_size=args.batch, optimizer="sgd",
                      lr=args.lr, momentum=args.momentum, filter=grad_filter).save(workdir)
        return
    if args.momentum != 0:
        raise SystemExit("--frontend ort: ORT's SGD has no momentum; give --momentum 0")
    import onnx

    from gftvm import trainable
    from gftvm.frontend import ort

    trained = set(trainable.resolve(onnx.load(onnx_path), args.train))
    ort_dir = os.path.join(workdir, "ort")
    ort.generate_artifacts(model, ort_dir, (args.batch, 3, 32, 32), "sgd",
                           frozen=[n for n, _ in model.named_parameters() if n not in trained])
    gftvm.compile(ort_dir, lr=args.lr, filter=grad_filter).save(workdir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = partitions(*load(args.data), args.limit)
    model = pretrain(args, *parts["pretrain"])
    name = f"{args.model}-{args.train.replace(':', '')}-{'R%d' % args.patch if args.patch else 'BP'}"
    if args.frontend == "ort":
        name += "-ort"
    workdir = os.path.join(args.out, "artifacts", f"{name}-s{args.seed}")
    compile_finetune(args, model, workdir)
    session = gftvm.runtime.load(workdir)

    (x, y), (x_test, y_test) = parts["train"], parts["test"]
    before = accuracy(session, x_test, y_test)
    rng = np.random.default_rng(args.seed)
    losses, accuracies, step_times = [], [], []
    for epoch in range(args.epochs):
        order = rng.permutation(len(x))
        bar = tqdm(range(0, len(x) - args.batch + 1, args.batch),
                   desc=f"{name} s{args.seed} epoch {epoch + 1}/{args.epochs}")
        epoch_losses = []
        for first in bar:
            index = order[first:first + args.batch]
            start = time.perf_counter()
            epoch_losses.append(session.step(data.augment(x[index], rng), y[index]))
            step_times.append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{np.mean(epoch_losses):.3f}")
        losses.append(float(np.mean(epoch_losses)))
        accuracies.append(accuracy(session, x_test, y_test))
        bar.write(f"epoch {epoch + 1}: loss {losses[-1]:.4f}, test accuracy {accuracies[-1]:.4f}")

    manifest = session.manifest
    record = {
        "model": args.model, "train": args.train, "patch": args.patch, "seed": args.seed,
        "frontend": args.frontend, "data": args.data, "epochs": args.epochs,
        "batch": args.batch, "lr": args.lr, "momentum": args.momentum,
        "accuracy_before": before, "accuracy": accuracies[-1], "accuracy_per_epoch": accuracies,
        "loss_per_epoch": losses, "conv_backward_macs": manifest["conv_backward_macs"],
        "saved_context_bytes": manifest["saved_context_bytes"],
        "step_ms": float(np.median(step_times) * 1e3), "command": " ".join(sys.argv),
    }
    path = os.path.join(args.out, f"{name}-s{args.seed}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"{name} seed {args.seed}: accuracy {before:.4f} -> {record['accuracy']:.4f}; "
          f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
