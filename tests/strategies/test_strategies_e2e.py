"""Every strategy name (and DP) runs end to end on the tiny model: 2 rounds, finite metrics, a model that moved."""

import math

import pytest
import torch

from fedtune.strategies.base import strategy_names

ADAPTER = "adapter_model.safetensors"


def _initial_adapter(exp, out):
    """The run's starting trainable tensors as save_model writes them: the task's model for (exp.model, exp.seed)."""
    from safetensors.torch import load_file

    from fedtune.models import load_classifier, save_model

    save_model(load_classifier(exp.model, 3, False, exp.seed), None, out)
    return load_file(out / ADAPTER)

NAMES = strategy_names()  # every registered name (the config accepts these)
FAST = ["train.epochs=1", "federation.rounds=2", "eval.every=2"]


@pytest.mark.parametrize("name", NAMES)
def test_strategy_runs_end_to_end(tiny_experiment, name):
    from fedtune.experiment import run_experiment

    extra = {"fedprox": ["strategy.mu=0.01"], "multikrum": ["strategy.krum_m=2"],
             "trimmed_mean": ["strategy.trim_beta=0.34"]}.get(name, [])
    from safetensors.torch import load_file

    exp = tiny_experiment(f"strategy.name={name}", *FAST, *extra)
    result = run_experiment(exp, quiet=True)
    assert [r["round"] for r in result.history] == [1, 2]
    assert all(r["clients_aggregated"] == 3 for r in result.history)
    assert math.isfinite(result.final_metrics["accuracy"])
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in result.history)
    # The strategy moved the model: the saved trainable tensors are finite and differ from the starting ones.
    final = load_file(result.output_dir / "model" / ADAPTER)
    initial = _initial_adapter(exp, result.output_dir.parent / "initial_model")
    assert final.keys() == initial.keys() and final
    assert all(bool(torch.isfinite(v).all()) for v in final.values())
    change = math.sqrt(sum(float((final[k].double() - initial[k].double()).pow(2).sum()) for k in final))
    assert math.isfinite(change) and change > 0, (name, change)


def test_scaffold_doubles_the_bytes_it_moves(tiny_experiment, tmp_path):
    from fedtune.experiment import run_experiment

    plain = run_experiment(tiny_experiment(*FAST), quiet=True).history[0]
    scaf = run_experiment(tiny_experiment("strategy.name=scaffold", *FAST, f'output_dir="{tmp_path / "scaffold"}"'),
                          quiet=True).history[0]
    assert scaf["bytes_up"] == 2 * plain["bytes_up"] and scaf["bytes_down"] == 2 * plain["bytes_down"]
    assert scaf["control_norm"] > 0


def test_dp_fedavg_runs_and_reports_epsilon_every_round(tiny_experiment):
    from fedtune.experiment import run_experiment
    from fedtune.privacy import dp_epsilon

    exp = tiny_experiment("privacy.enabled=true", "privacy.clip=0.5", "privacy.noise_multiplier=0.8",
                          "federation.clients_per_round=2", *FAST)
    history = run_experiment(exp, quiet=True).history
    for r in history:
        assert r["dp_epsilon"] == dp_epsilon(noise_multiplier=0.8, sampling_rate=2 / 3, rounds=r["round"], delta=1e-5)
        assert r["clients_aggregated"] == 2
    assert history[0]["dp_epsilon"] < history[1]["dp_epsilon"]
