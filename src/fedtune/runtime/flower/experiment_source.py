"""How a Flower App finds its fedtune Experiment: a TOML file shipped inside the app, plus run-config overrides.

The app folder (``flower_app/`` in this repository) holds ``pyproject.toml`` (the Flower App),
a three-line module binding the apps, and the experiment TOML. ``flwr run`` bundles the folder
(FAB) and ships it to the SuperLink and every SuperNode, so server and clients read the same
experiment. The run config (``[tool.flwr.app.config]``, or ``flwr run ... -c 'key=value'``) has
two reserved keys, ``experiment`` (the TOML's path inside the app folder) and ``resume`` (true: the
ServerApp continues from the checkpoint in the output folder); every other key is a fedtune
override such as ``federation.rounds = 3``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedtune.config import ConfigError, Experiment

EXPERIMENT_KEY = "experiment"
"""Run-config key naming the experiment TOML inside the app folder."""
RESUME_KEY = "resume"
"""Run-config key: true makes the ServerApp resume from the output folder's checkpoint."""
RESERVED_KEYS = (EXPERIMENT_KEY, RESUME_KEY)

ExperimentSource = Callable[[Mapping[str, Any]], Experiment]
"""Builds the Experiment from a Flower run config (``context.run_config``)."""


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    raise ConfigError(f"run-config value {value!r} is not a TOML scalar")


def from_app_dir(app_dir: str | Path) -> ExperimentSource:
    """A source reading ``run_config["experiment"]`` relative to ``app_dir``, other keys as overrides."""
    root = Path(app_dir)

    def load(run_config: Mapping[str, Any]) -> Experiment:
        name = run_config.get(EXPERIMENT_KEY)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"the Flower run config needs {EXPERIMENT_KEY} = '<experiment TOML in the app folder>'")
        overrides = [f"{k}={_toml_literal(v)}" for k, v in run_config.items() if k not in RESERVED_KEYS]
        path = Path(name) if Path(name).is_absolute() else root / name
        return Experiment.from_toml(path, overrides)

    return load


def fixed(exp: Experiment) -> ExperimentSource:
    """A source that ignores the run config (apps built in-process, e.g. Flower simulation)."""
    return lambda _run_config: exp
