"""fedtune: federated fine-tuning of language models.

The library API::

    from fedtune import Experiment, run_experiment
    exp = Experiment.from_toml("experiments/default.toml", overrides=["federation.rounds=2"])
    result = run_experiment(exp)
    result.final_metrics, result.history, result.output_dir
"""

from fedtune.config import ConfigError, Experiment

__all__ = ["ConfigError", "Experiment", "run_experiment", "RunResult"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy imports (torch, transformers) only when the runner is asked for.
    if name in ("run_experiment", "RunResult"):
        from fedtune import experiment

        return getattr(experiment, name)
    raise AttributeError(name)
