"""Weights & Biases: one W&B run per fedtune run, offline unless ``WANDB_MODE`` says otherwise.

Offline runs are written under ``<output_dir>/wandb/`` (``wandb sync <that folder>`` uploads them later).
Config: the flattened resolved config. History: every numeric key of ``metrics.jsonl`` with step = round.
Files: ``summary.json``, ``config.toml``, the plots (as images and files); the model folder as a ``model``
artifact when ``tracking.log_model``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.tracking.base import FINISHED, import_backend


class WandbTracker:
    """A W&B run in project ``project`` (group ``group``), its files under ``directory``."""

    name = "wandb"

    def __init__(self, directory: Path, project: str, run_name: str, group: str = "") -> None:
        wandb = import_backend("wandb", self.name)
        self._wandb = wandb
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project, name=run_name, group=group or None, dir=str(directory),
            mode=os.environ.get("WANDB_MODE") or "offline", reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Every config key into the run's config."""
        self.run.config.update(dict(flat), allow_val_change=True)

    def log_round(self, step: int, record: Mapping[str, float]) -> None:
        """One history row at ``step``."""
        self.run.log(dict(record), step=step)

    def log_artifacts(self, run_dir: Path, *, model: bool, plots: list[Path]) -> None:
        """``summary.json`` and ``config.toml`` as files, the plots as images, the model as an artifact."""
        for name in ("summary.json", "config.toml"):  # (files in the run's folder are synced with it)
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, Path(self.run.dir) / name)
        if plots:
            self.run.log({f"plots/{p.stem}": self._wandb.Image(str(p)) for p in plots})
        if model and (run_dir / "model").is_dir():
            artifact = self._wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.run.name}-model"), type="model")
            artifact.add_dir(str(run_dir / "model"))
            self.run.log_artifact(artifact)

    def close(self, status: str) -> None:
        """Finish the run (exit code 0 when FINISHED, 1 otherwise)."""
        self.run.finish(exit_code=0 if status == FINISHED else 1)


def open_tracker(exp, out_dir: Path, run_name: str) -> WandbTracker:
    """The run's W&B tracker: project ``tracking.experiment`` (or the name), group ``tracking.group``."""
    return WandbTracker(Path(out_dir), exp.tracking.experiment or exp.name, run_name, exp.tracking.group)
