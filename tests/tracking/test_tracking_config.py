"""``[tracking]``: the TOML section, its checks, and the flattened config the trackers log."""

from __future__ import annotations

import pytest

from fedtune.config import ConfigError, Experiment
from fedtune.config.tracking import TrackingConfig
from fedtune.tracking import flat_config, numeric_metrics


def test_tracking_section_in_toml(tmp_path):
    p = tmp_path / "exp.toml"
    p.write_text('name = "x"\n[tracking]\nbackends = ["tensorboard", "mlflow"]\nexperiment = "study"\n'
                 'mlflow_uri = "sqlite:///db.sqlite"\nlog_model = false\n')
    exp = Experiment.from_toml(p)
    assert exp.tracking == TrackingConfig(backends=["tensorboard", "mlflow"], experiment="study",
                                          mlflow_uri="sqlite:///db.sqlite", log_model=False)
    again = tmp_path / "again.toml"
    again.write_text(exp.to_toml())
    assert Experiment.from_toml(again) == exp  # (config.toml of a run reads back the same)
    assert Experiment().tracking.backends == []  # off by default


def test_typo_key_is_an_error_naming_the_key(tmp_path):
    p = tmp_path / "exp.toml"
    p.write_text('name = "x"\n[tracking]\nbackend = ["mlflow"]\n')
    with pytest.raises(ConfigError, match=r"tracking\.backend.*known keys here: backends"):
        Experiment.from_toml(p)


@pytest.mark.parametrize("backends, message", [
    ('["mlfow"]', r"tracking.backends: unknown tracker 'mlfow' \(known: tensorboard, mlflow, wandb\)"),
    ('["mlflow", "mlflow"]', r"names 'mlflow' twice"),
    ('"mlflow"', r"backends"),
])
def test_bad_backends_are_one_line_errors(backends, message):
    with pytest.raises(ConfigError, match=message) as info:
        Experiment.from_overrides([f"tracking.backends={backends}"])
    assert "\n" not in str(info.value)


def test_flat_config_is_dotted_with_plain_values():
    flat = flat_config(Experiment.from_overrides(["train.lr=0.003", 'model.lora.target_modules=["query", "value"]'])
                       .to_dict())
    assert flat["train.lr"] == 0.003 and flat["federation.rounds"] == Experiment().federation.rounds
    assert flat["model.lora.target_modules"] == '["query", "value"]'
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    assert "tracking.backends" in flat and not any(isinstance(v, dict) for v in flat.values())


def test_numeric_metrics_keep_numbers_only():
    record = {"round": 3, "eval_accuracy": 0.5, "clients": 2, "stopped": "budget", "flag": True,
              "nan": float("nan")}
    assert numeric_metrics(record) == {"eval_accuracy": 0.5, "clients": 2.0}
    assert numeric_metrics(record, "client_0/") == {"client_0/eval_accuracy": 0.5, "client_0/clients": 2.0}
