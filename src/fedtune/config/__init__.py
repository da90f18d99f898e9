"""Experiment configuration: typed dataclasses loaded from TOML.

Every section of an experiment file maps to one dataclass (one module per concept:
:mod:`~fedtune.config.data`, :mod:`~fedtune.config.model`, :mod:`~fedtune.config.federation`,
:mod:`~fedtune.config.training`, :mod:`~fedtune.config.runtime`), gathered here in
:class:`Experiment`. Loading (:mod:`~fedtune.config.schema`) rejects unknown keys and wrong types
with an error that names the key and the file, and ``--set section.key=value`` overrides go
through the same checks. Combinations that cannot work are refused by the one table in
:mod:`fedtune.config.checks`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import tomli_w

from fedtune.config.data import DataConfig, PartitionConfig
from fedtune.config.federation import AttackConfig, FederationConfig, PrivacyConfig, StrategyConfig
from fedtune.config.model import EMBEDDED_MODEL_NAME, FREEZABLE_HEADS, LoraConfig, ModelConfig
from fedtune.config.runtime import RuntimeConfig, SimulationConfig
from fedtune.config.schema import _help, _plain, apply_overrides, flatten_table, from_dict, read_toml
from fedtune.config.tracking import TrackingConfig
from fedtune.config.training import EvalConfig, PersonalizationConfig, TrainConfig
from fedtune.errors import ConfigError  # (re-exported: fedtune.config.ConfigError)

__all__ = [
    "AttackConfig", "ConfigError", "DataConfig", "EMBEDDED_MODEL_NAME", "EvalConfig", "Experiment", "FREEZABLE_HEADS",
    "FederationConfig", "LoraConfig", "ModelConfig", "PartitionConfig", "PersonalizationConfig", "PrivacyConfig",
    "RuntimeConfig", "SimulationConfig", "StrategyConfig", "TrackingConfig", "TrainConfig", "apply_overrides",
    "default_experiment", "flatten_table", "from_dict", "read_toml",
]


@dataclass
class Experiment:
    """A whole experiment: one TOML file."""

    name: str = field(default="experiment", metadata=_help("Name; also the default output folder name."))
    seed: int = field(default=0, metadata=_help("Seed for partitioning, sampling, initialization and data order."))
    output_dir: str = field(default="", metadata=_help("Where outputs go (default runs/<name>)."))
    mode: Literal["federated", "centralized", "local"] = field(
        default="federated",
        metadata=_help("federated, or a baseline: centralized (shards pooled) or local (each client alone)."),
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    source_file: ClassVar[str] = ""
    """The TOML file this experiment was read from (set by :meth:`from_toml`; not a setting): the
    ``<file>:`` that prefixes errors found later, e.g. by :func:`fedtune.config.checks.check_experiment`."""

    @property
    def resolved_output_dir(self) -> Path:
        """The output folder, ``runs/<name>`` unless set."""
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    @classmethod
    def from_toml(cls, path: str | Path, overrides: typing.Sequence[str] = ()) -> "Experiment":
        """Load an experiment file, then apply ``section.key=value`` overrides."""
        path = Path(path)
        raw = read_toml(path, "config")
        if not raw:  # the dataclass defaults are not the default experiment: say so instead of running them
            raise ConfigError(f"{path} is empty (no keys): `fedtune run` without a file runs the default experiment "
                              "(experiments/default.toml); an experiment file needs its settings")
        apply_overrides(raw, overrides)
        exp = from_dict(cls, raw, source=str(path))
        exp.source_file = str(path)
        return exp

    @classmethod
    def from_overrides(cls, overrides: typing.Sequence[str] = (), base: "Experiment | None" = None) -> "Experiment":
        """``base`` (the dataclass defaults when None) with ``section.key=value`` overrides applied."""
        raw: dict[str, Any] = base.to_dict() if base is not None else {}
        apply_overrides(raw, overrides)
        return from_dict(cls, raw, source="--set")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (TOML/JSON serializable)."""
        return _plain(self)

    def to_toml(self) -> str:
        """The resolved configuration as TOML text."""
        return tomli_w.dumps(self.to_dict())


def default_experiment() -> Experiment:
    """What ``fedtune run`` runs with no file: AG News, embedded MiniLM + LoRA, Dirichlet non-IID.

    ``experiments/default.toml`` spells out the same experiment (a test keeps them equal).
    """
    return Experiment(
        name="agnews-minilm-lora-dirichlet",
        data=DataConfig(dataset="ag_news", train_size=3000, max_length=64),
        model=ModelConfig(name=EMBEDDED_MODEL_NAME, mode="lora", lora=LoraConfig(r=8, alpha=16.0)),
        partition=PartitionConfig(method="dirichlet", num_clients=10, alpha=0.5, min_examples=20),
        strategy=StrategyConfig(name="fedavg"),
        federation=FederationConfig(rounds=4, fraction=1.0),
        train=TrainConfig(epochs=1.0, lr=1e-3, batch_size=16, grad_clip=1.0, precision="auto"),
        eval=EvalConfig(every=2, batch_size=128),
    )
