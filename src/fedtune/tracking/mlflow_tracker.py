"""MLflow: one MLflow run per fedtune run, logged through :class:`mlflow.MlflowClient` (no global active run).

Params: the flattened resolved config. Metrics: every numeric key of ``metrics.jsonl`` with step = round.
Artifacts: ``summary.json``, ``config.toml``, ``metrics.jsonl``, the ``model/`` folder, ``plots/``.

Where: ``tracking.mlflow_uri``, else ``$MLFLOW_TRACKING_URI``, else a local SQLite store beside the run
folders: ``sqlite:///<parent of output_dir>/mlflow.db`` with artifacts in ``<parent of output_dir>/mlartifacts``
(for the default ``runs/<name>`` folders: ``runs/mlflow.db``, what ``mlflow ui --backend-store-uri`` opens).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.tracking.base import import_backend

MAX_VALUE = 6000
"""Longest param value MLflow stores (longer ones are cut)."""
BATCH = 100
"""Params per ``log_batch`` call (MLflow's limit)."""
EXPERIMENT_KIND = "custom_model_development"
"""The ``mlflow.experimentKind`` tag of the experiments fedtune creates: model training (the UI's training view)."""


def tracking_uri(exp, out_dir: Path) -> str:
    """``tracking.mlflow_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<parent of out_dir>/mlflow.db``."""
    if exp.tracking.mlflow_uri:
        return exp.tracking.mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(out_dir).resolve().parent / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go: ``mlartifacts`` beside a SQLite file; the server's choice otherwise."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


class MlflowTracker:
    """A run in experiment ``experiment`` of the MLflow store at ``uri``."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None) -> None:
        import_backend("mlflow", self.name)
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location(uri),
                                                               tags={"mlflow.experimentKind": EXPERIMENT_KIND})
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {})).info.run_id

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Every config key as a param (values cut at MLflow's 6000 characters)."""
        from mlflow.entities import Param

        params = [Param(k, str(v)[:MAX_VALUE]) for k, v in flat.items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH])

    def log_round(self, step: int, record: Mapping[str, float]) -> None:
        """One metric point per key at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in record.items()])

    def log_artifacts(self, run_dir: Path, *, model: bool, plots: list[Path]) -> None:
        """``summary.json``, ``config.toml``, ``metrics.jsonl``, the model folder (``model``), the plots."""
        for name in ("summary.json", "config.toml", "metrics.jsonl"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if model and (run_dir / "model").is_dir():
            self.client.log_artifacts(self.run_id, str(run_dir / "model"), "model")
        for path in plots:
            self.client.log_artifact(self.run_id, str(path), "plots")

    def close(self, status: str) -> None:
        """Mark the run FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status)


def open_tracker(exp, out_dir: Path, run_name: str) -> MlflowTracker:
    """The run's MLflow tracker (store: :func:`tracking_uri`; experiment: ``tracking.experiment`` or the name)."""
    tags = {"fedtune.output_dir": str(Path(out_dir).resolve())}
    if exp.tracking.group:
        tags["fedtune.group"] = exp.tracking.group
    return MlflowTracker(tracking_uri(exp, out_dir), exp.tracking.experiment or exp.name, run_name, tags)
