"""``[tracking]``: where a run's metrics, configuration and final files are logged besides its folder."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtune.config.schema import _help
from fedtune.errors import ConfigError

BACKENDS = ("tensorboard", "mlflow", "wandb")
"""The experiment trackers ``tracking.backends`` may name (:mod:`fedtune.tracking`)."""


@dataclass
class TrackingConfig:
    """Experiment trackers (TensorBoard, MLflow, Weights & Biases): off unless ``backends`` names one."""

    backends: list[str] = field(default_factory=list, metadata=_help(
        "Trackers to log to: any of tensorboard, mlflow, wandb (each an optional install: "
        "pip install -e \".[tracking]\"); empty = none."))
    experiment: str = field(default="", metadata=_help(
        "MLflow experiment / W&B project the run is logged under (default: the experiment's name; a sweep: "
        "the sweep's name)."))
    group: str = field(default="", metadata=_help(
        "W&B group and MLflow tag fedtune.group of the run (a sweep sets its name, so its runs stay together)."))
    run_name: str = field(default="", metadata=_help("The tracked run's name (default: the experiment's name)."))
    mlflow_uri: str = field(default="", metadata=_help(
        "MLflow tracking URI (http://host:port, sqlite:///file.db, ...); default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///<parent of output_dir>/mlflow.db with artifacts in <parent of output_dir>/mlartifacts."))
    tensorboard_dir: str = field(default="", metadata=_help(
        "Folder of the run's TensorBoard event files (default <output_dir>/tensorboard; a sweep: "
        "<sweep folder>/tensorboard/<run>)."))
    log_model: bool = field(default=True, metadata=_help(
        "Upload the final model folder as an artifact (MLflow, W&B); summary.json and plots are always logged."))

    def __post_init__(self) -> None:
        if not isinstance(self.backends, list) or not all(isinstance(b, str) for b in self.backends):
            raise ConfigError(f"tracking.backends must be a list of names, got {self.backends!r}")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ConfigError(f"tracking.backends: unknown tracker {unknown[0]!r} (known: {', '.join(BACKENDS)})")
        repeated = sorted({b for b in self.backends if self.backends.count(b) > 1})
        if repeated:
            raise ConfigError(f"tracking.backends names {repeated[0]!r} twice")
