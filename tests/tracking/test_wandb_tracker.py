"""Weights & Biases in offline mode: a tiny run's offline run folder (wandb is optional: skipped when missing)."""

from __future__ import annotations

import pytest
from tracking_runs import tiny_tracked

from fedtune.experiment import run_experiment

pytest.importorskip("wandb")


def test_offline_run_with_files_plots_and_model(tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # (offline is fedtune's default)
    monkeypatch.setenv("WANDB_SILENT", "true")
    exp = tiny_tracked(tiny_model_dir, tiny_csv, tmp_path / "run", 'tracking.backends=["wandb"]',
                       'tracking.group="g"', "federation.rounds=1")
    result = run_experiment(exp, quiet=True)
    (run_dir,) = (result.output_dir / "wandb").glob("offline-run-*")
    assert len(list(run_dir.glob("run-*.wandb"))) == 1  # (the offline run: `wandb sync` uploads it)
    files = run_dir / "files"
    assert (files / "summary.json").read_text() == (result.output_dir / "summary.json").read_text()
    assert (files / "config.toml").is_file()
    assert {p.name.split("_")[0] for p in (files / "media" / "images" / "plots").glob("*.png")} >= {"metric", "loss"}
    assert (result.output_dir / "summary.json").is_file()
