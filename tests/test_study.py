"""Smoke test of the accuracy-study loop: pretrain, compile with the filter, fine-tune with the
compiled runtime, evaluate with the compiled predict, report."""

import json

from test_tools import run


def test_short_filtered_finetune_learns_and_reports(tmp_path):
    out = run("finetune.py", "--model", "mcunet", "--train", "last:4", "--patch", "2",
              "--pretrain-epochs", "3", "--epochs", "4", "--limit", "300", "--batch", "16",
              "--lr", "0.005", "--out", str(tmp_path))
    record = json.loads((tmp_path / "mcunet-last4-R2-s0.json").read_text())
    assert "accuracy" in out
    losses = record["loss_per_epoch"]
    assert losses[-1] < losses[0], losses
    assert record["accuracy"] > 0.4, record      # chance is 0.1
    assert record["conv_backward_macs"] > 0 and record["saved_context_bytes"] > 0

    table = run("report.py", str(tmp_path), "--plots", str(tmp_path / "plots"))
    assert f"{record['accuracy'] * 100:.1f} ± 0.0 (n=1)" in table
    assert (tmp_path / "plots" / "accuracy_vs_macs.png").stat().st_size > 0


def test_finetune_through_an_ort_artifact_learns_and_is_its_own_row(tmp_path):
    """--frontend ort: the same loop from an onnxruntime-training artifact of the model."""
    run("finetune.py", "--model", "mcunet", "--train", "last:4", "--patch", "2",
        "--frontend", "ort", "--momentum", "0", "--pretrain-epochs", "3", "--epochs", "4",
        "--limit", "300", "--batch", "16", "--lr", "0.005", "--out", str(tmp_path))
    record = json.loads((tmp_path / "mcunet-last4-R2-ort-s0.json").read_text())
    manifest = json.loads((tmp_path / "artifacts" / "mcunet-last4-R2-ort-s0" / "manifest.json")
                          .read_text())
    assert manifest["frontend"] == "onnxruntime-training"
    assert len(manifest["gradient_filter"]["plan"]) == 4
    losses = record["loss_per_epoch"]
    assert record["frontend"] == "ort" and losses[-1] < losses[0], losses
    assert record["accuracy"] > 0.4, record
    assert "| mcunet (ORT artifact) |" in run("report.py", str(tmp_path))
