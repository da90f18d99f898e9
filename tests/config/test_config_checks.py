"""fedtune.config.checks: every row of the one table of refused combinations fires, names its settings, says why."""

from __future__ import annotations

import pytest

from fedtune.config import ConfigError
from fedtune.config.checks import CHECKS, check_experiment

FLOWER = ['runtime.mode="flower"']
CASES = {
    "personalization-needs-federation": (['personalization.method="fedper"', 'mode="centralized"'],
                                         r"\[personalization\] personalizes.*mode = 'centralized'"),
    "federated-eval-needs-federation": (["eval.federated=true", 'mode="centralized"'],
                                        r"eval.federated.*mode = 'centralized' has none"),
    "label-flip-needs-classes": (['data.task="causal_lm"', 'attack.kind="label_flip"', "attack.fraction=0.5"],
                                 r"label_flip.*not data.task = 'causal_lm'"),
    "generated-labels-need-label-answers": (["eval.generative=true"],
                                            r"eval.generative parses.*not 'classification'"),
    "compile-one-client-at-a-time": (["train.compile=true", "simulation.parallel_clients=3"],
                                     r"train.compile = true needs simulation.parallel_clients = 1"),
    "checkpointing-one-client-at-a-time": (["train.gradient_checkpointing=true", "simulation.parallel_clients=3"],
                                           r"gradient_checkpointing = true needs simulation.parallel_clients = 1"),
    "clients-per-round-within-partition": (["federation.clients_per_round=5"],
                                           r"clients_per_round = 5 is more than the partition's partition.num_clients = 3"),
    "compile-in-process": ([*FLOWER, "train.compile=true"], r"train.compile = true is for runtime.mode = 'simulation'"),
    "flower-needs-federation": ([*FLOWER, 'mode="local"'], r"mode = 'local' needs every client's data"),
    "secagg-weighted-mean": ([*FLOWER, "runtime.secagg=true", 'strategy.name="median"'],
                             r"SecAgg\+ sums quantized vectors.*strategy.name = 'median'"),
}


def test_every_check_has_a_case():
    assert {c.name for c in CHECKS} == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_each_check_refuses_with_its_reason(name, tiny_experiment):
    overrides, message = CASES[name]
    exp = tiny_experiment(*overrides)
    applicable = [c.name for c in CHECKS if c.applies(exp)]
    assert name in applicable
    with pytest.raises(ConfigError, match=message):
        check_experiment(exp, tuple(c for c in CHECKS if c.name == name))
    with pytest.raises(ConfigError):
        check_experiment(exp)


def test_the_supported_combinations_pass(tiny_experiment):
    for overrides in ([], [*FLOWER, 'model.lora.aggregation="svd"', "model.lora.client_ranks=[2, 4]"],
                      [*FLOWER, 'data.task="qa"'], ['personalization.method="fedper"'],
                      [*FLOWER, "eval.per_client=true", "eval.federated=true", 'personalization.method="finetune"'],
                      [*FLOWER, "runtime.secagg=true", 'strategy.name="fedprox"'],
                      [*FLOWER, 'attack.kind="sign_flip"', "attack.fraction=0.5", 'strategy.name="median"']):
        check_experiment(tiny_experiment(*overrides))


def test_refusals_name_the_experiment_file(tmp_path):
    """A refused combination read from a TOML file starts with the file, like every other config error."""
    from fedtune.config import Experiment

    path = tmp_path / "exp.toml"
    path.write_text('[runtime]\nmode = "flower"\nsecagg = true\n[strategy]\nname = "median"\n')
    with pytest.raises(ConfigError, match=rf"^{path}: runtime.secagg = true .*strategy.name = 'median'"):
        check_experiment(Experiment.from_toml(path))
    with pytest.raises(ConfigError, match=r"^runtime.secagg = true"):  # (built in code: no file to name)
        check_experiment(Experiment.from_overrides(['runtime.mode="flower"', "runtime.secagg=true",
                                                    'strategy.name="median"']))
