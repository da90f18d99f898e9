"""What every tracker does (:class:`Tracker`), and what they all log: the flattened config, numeric round metrics."""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from fedtune.config.schema import flatten_table
from fedtune.errors import ConfigError

INSTALL_HINT = 'pip install -e ".[tracking]"'
"""How to install the trackers (the ``tracking`` extra of pyproject.toml)."""

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
"""How a tracked run ended (MLflow's run statuses; the other trackers map them to theirs)."""


class TrackingError(ConfigError):
    """A tracker cannot be used: its library is not installed, or it cannot open its store (one line)."""


class Tracker(Protocol):
    """One experiment tracker's run: opened by its module's ``open_tracker(exp, out_dir, flat)``."""

    name: str
    """The backend's name in ``tracking.backends``."""

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Log the resolved configuration, flattened to dotted keys (:func:`flat_config`)."""

    def log_round(self, step: int, record: Mapping[str, float]) -> None:
        """Log one round's numeric metrics (:func:`numeric_metrics`) at ``step`` (the round)."""

    def log_artifacts(self, run_dir: Path, *, model: bool, plots: list[Path]) -> None:
        """Log the final files: ``summary.json``, the ``model`` folder when ``model``, and ``plots`` (PNG)."""

    def close(self, status: str) -> None:
        """End the run with ``status`` (:data:`FINISHED`, :data:`FAILED` or :data:`KILLED`)."""


def import_backend(module: str, backend: str):
    """Import ``module`` for tracker ``backend``; not installed is a one-line :class:`TrackingError`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrackingError(f"tracking.backends names {backend!r} but {module} cannot be imported ({exc}); "
                            f"install the trackers with: {INSTALL_HINT}") from None


def _param_value(value: Any) -> str | int | float | bool:
    if isinstance(value, (bool, int, float, str)):
        return value
    if value is None:
        return ""
    return json.dumps(value, default=str)  # lists (and anything else) as one string


def flat_config(config: Mapping[str, Any]) -> dict[str, str | int | float | bool]:
    """The configuration as dotted keys (``train.lr``) with str/int/float/bool values (lists as JSON text)."""
    return {k: _param_value(v) for k, v in sorted(flatten_table(config).items())}


def numeric_metrics(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The record's finite int/float values (not bools, not ``round``), keys prefixed with ``prefix``."""
    return {f"{prefix}{k}": float(v) for k, v in record.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
