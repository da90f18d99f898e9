"""[strategy] and [privacy] config: new names map to strategy objects; bad values are errors naming the key."""

import pytest

from fedtune.config import ConfigError, Experiment
from fedtune.strategies import (
    FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Krum, Median, MultiKrum, Scaffold, TrimmedMean,
)

EXPECTED = {
    "fedavg": FedAvg, "fedprox": FedProx, "scaffold": Scaffold, "fedavgm": FedAvgM, "fedadam": FedAdam,
    "fedyogi": FedYogi, "fedadagrad": FedAdagrad, "median": Median, "trimmed_mean": TrimmedMean,
    "krum": Krum, "multikrum": MultiKrum,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_name_builds_its_strategy(name):
    from fedtune.experiment import build_strategy

    s = build_strategy(Experiment.from_overrides([f"strategy.name={name}"]), num_clients=7)
    assert type(s) is EXPECTED[name]


def test_fields_reach_the_objects():
    from fedtune.experiment import build_strategy

    def build(*o):
        return build_strategy(Experiment.from_overrides(list(o)), num_clients=7)

    s = build("strategy.name=fedyogi", "strategy.server_lr=0.03", "strategy.beta1=0.5", "strategy.beta2=0.9",
              "strategy.tau=0.01")
    assert (s.server_lr, s.beta1, s.beta2, s.tau) == (0.03, 0.5, 0.9, 0.01)
    assert build("strategy.name=fedadam").server_lr == 0.01  # 0 = the strategy's default
    assert build("strategy.name=fedavgm", "strategy.momentum=0.7").momentum == 0.7
    assert build("strategy.name=scaffold").num_clients == 7
    assert build("strategy.name=scaffold", "mode=\"centralized\"").num_clients == 1
    assert build("strategy.name=trimmed_mean", "strategy.trim_beta=0.25").beta == 0.25
    mk = build("strategy.name=multikrum", "strategy.krum_f=1", "strategy.krum_m=3")
    assert (mk.f, mk.m) == (1, 3)
    assert build("train.optimizer=\"sgd\"").local.optimizer == "sgd"


@pytest.mark.parametrize("override, key", [
    ("strategy.server_lr=-1", "strategy.server_lr"), ("strategy.momentum=1.0", "strategy.momentum"),
    ("strategy.beta1=-0.1", "strategy.beta1"), ("strategy.beta2=1.5", "strategy.beta2"),
    ("strategy.tau=0", "strategy.tau"), ("strategy.trim_beta=0.5", "strategy.trim_beta"),
    ("strategy.krum_f=-1", "strategy.krum_f"), ("strategy.krum_m=0", "strategy.krum_m"),
    ("strategy.name=fedmagic", "strategy.name"), ("train.optimizer=\"lion\"", "train.optimizer"),
    ("privacy.clip=-1", "privacy.clip"),
])
def test_bad_values_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Experiment.from_overrides([override])


def test_every_new_field_has_help():
    import dataclasses

    from fedtune.config import PrivacyConfig
    from fedtune.strategies.base import option_table, registered_strategies

    for f in dataclasses.fields(PrivacyConfig):
        assert f.metadata.get("help"), f"PrivacyConfig.{f.name} has no help"
    for spec in registered_strategies().values():
        for f in dataclasses.fields(spec.options):
            assert f.metadata.get("help"), f"{spec.options.__name__}.{f.name} has no help"
    assert all(f.help for f in option_table().values())


def test_privacy_section_round_trips_through_toml(tmp_path):
    exp = Experiment.from_overrides(["privacy.enabled=true", "privacy.noise_multiplier=0.7"])
    p = tmp_path / "x.toml"
    p.write_text(exp.to_toml())
    assert Experiment.from_toml(p) == exp
