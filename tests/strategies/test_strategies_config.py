"""[strategy] and [privacy] config: new names map to strategy objects; bad values are errors naming the key."""

import pytest

from fedtune.config import ConfigError, Experiment
from fedtune.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    Scaffold,
    TrimmedMean,
)
from fedtune.strategies.base import capabilities_of
from fedtune.strategies.from_config import build_strategy

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


# ----------------------------------------------------------------------------- the registry


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as it is, restored after the test (strategies registered in a test do not leak)."""
    from fedtune.strategies import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base.registered_strategies()))
    return base


def test_a_new_strategy_is_configurable_from_toml_without_a_config_edit(scratch_registry, tmp_path):
    """Register a strategy with its own options: TOML, --set, to_toml, unknown keys and validation all follow."""
    import dataclasses

    base = scratch_registry

    @dataclasses.dataclass(frozen=True)
    class ToyOptions:
        toy_gain: float = dataclasses.field(default=1.0, metadata={"help": "toy: server gain (> 0)."})

        def __post_init__(self):
            if not self.toy_gain > 0:
                raise base.option_error("toy_gain", "> 0", self.toy_gain)

    caps = base.Capabilities(streams=True, secagg_safe=False, dp_safe=False, client_state=False)

    class Toy:  # declares no capabilities: the registry's are stamped on it
        def __init__(self, gain, local):
            self.gain, self.local = gain, local

    @base.register_strategy("toy", ToyOptions, caps)
    def build_toy(options, ctx):
        return Toy(options.toy_gain, ctx.local)

    p = tmp_path / "toy.toml"
    p.write_text('[strategy]\nname = "toy"\ntoy_gain = 3\n')
    exp = Experiment.from_toml(p)
    assert exp.strategy.options() == ToyOptions(toy_gain=3.0) and exp.strategy.toy_gain == 3.0
    assert "toy_gain = 3.0" in exp.to_toml()
    assert Experiment.from_toml(p, ["strategy.toy_gain=0.5"]).strategy.toy_gain == 0.5
    with pytest.raises(ConfigError, match=r"strategy\.toy_gain must be > 0"):
        Experiment.from_toml(p, ["strategy.toy_gain=-1"])
    with pytest.raises(ConfigError, match=r"unknown key 'strategy\.gain' \(strategy 'toy' takes: toy_gain"):
        Experiment.from_toml(p, ["strategy.gain=2"])
    built = build_strategy(exp, num_clients=3)
    assert type(built) is Toy and built.gain == 3.0 and capabilities_of(built) == caps

    @base.register_strategy("toy_mislabelled", base.NoOptions, caps)
    def build_mislabelled(options, ctx):
        return FedAvg(local=ctx.local)  # FedAvg declares other capabilities: the registration must agree

    with pytest.raises(TypeError, match="registered with"):
        build_strategy(Experiment.from_overrides(["strategy.name=toy_mislabelled"]), num_clients=3)


def test_registration_refuses_inconsistent_or_undocumented_options(scratch_registry):
    import dataclasses

    base = scratch_registry
    caps = FedAvg.capabilities

    @dataclasses.dataclass(frozen=True)
    class OtherMu:
        mu: float = dataclasses.field(default=0.5, metadata={"help": "another mu"})

    with pytest.raises(TypeError, match="option 'mu'.*a \\[strategy\\] key means one thing"):
        base.register_strategy("other", OtherMu, caps)(lambda o, c: FedAvg(local=c.local))

    @dataclasses.dataclass(frozen=True)
    class NoHelp:
        x: int = 0

    with pytest.raises(TypeError, match="needs metadata"):
        base.register_strategy("nohelp", NoHelp, caps)
    with pytest.raises(TypeError, match="registered twice"):
        base.register_strategy("fedavg", base.NoOptions, caps)(lambda o, c: FedAvg(local=c.local))
    with pytest.raises(ConfigError, match="strategy.name: 'nope' is not one of the registered strategies"):
        base.strategy_spec("nope")


def test_capabilities_decide_dp_and_are_declared_by_every_strategy():
    from fedtune.strategies.base import UNKNOWN_CAPABILITIES, registered_strategies

    for name, spec in registered_strategies().items():
        s = build_strategy(Experiment.from_overrides([f"strategy.name={name}"]), num_clients=4)
        assert capabilities_of(s) == spec.capabilities, name
    assert capabilities_of(object()) == UNKNOWN_CAPABILITIES and not UNKNOWN_CAPABILITIES.dp_safe
    assert {n for n, s in registered_strategies().items() if s.capabilities.dp_safe} == {
        "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}
    assert {n for n, s in registered_strategies().items() if s.capabilities.secagg_safe} == {"fedavg", "fedprox"}
    assert {n for n, s in registered_strategies().items() if s.capabilities.client_state} == {"scaffold", "feddyn"}


def test_other_strategies_options_stay_accepted_and_old_configs_compare_equal():
    """A sweep may set strategy.mu for fedavg too; a config saved before a strategy existed lacks its keys."""
    from fedtune.checkpoint import config_differences
    from fedtune.config import flatten_table

    exp = Experiment.from_overrides(["strategy.name=fedavg", "strategy.mu=0.01", "strategy.krum_f=2"])
    assert (exp.strategy.mu, exp.strategy.krum_f) == (0.01, 2)
    old = exp.to_dict()
    del old["strategy"]["alpha"]  # as written before feddyn was added
    defaults = flatten_table(Experiment().to_dict())
    assert config_differences({**defaults, **flatten_table(old)}, exp.to_dict()) == []


def test_fedtune_config_prints_the_strategy_options(capsys):
    from fedtune.cli import main

    assert main(["config", "--set", "strategy.name=feddyn", "--set", "strategy.alpha=0.05"]) == 0
    out = capsys.readouterr().out
    section = out.split("[strategy]")[1].split("\n[")[0]
    assert 'name = "feddyn"' in section and "alpha = 0.05" in section and "mu = 0.0" in section


def test_krum_cohort_too_small_is_refused_before_any_training(tiny_experiment):
    """Krum needs n >= 2f + 3 updates: said when the strategy is built, not after a round of training."""
    from fedtune.experiment import run_experiment

    exp = tiny_experiment('strategy.name="krum"', "strategy.krum_f=1")  # 3 clients < 2*1 + 3
    with pytest.raises(ConfigError, match=r"krum_f = 1 needs at least 5 clients per round \(2f \+ 3\), but rounds "
                                          r"sample 3"):
        run_experiment(exp, quiet=True)
    assert not (exp.resolved_output_dir / "metrics.jsonl").exists()  # no round ran
    with pytest.raises(ConfigError, match="strategy.krum_m = 4 averages more updates than a round has"):
        run_experiment(tiny_experiment('strategy.name="multikrum"', "strategy.krum_m=4", "partition.num_clients=3",
                                       f'output_dir="{exp.resolved_output_dir}-m"'), quiet=True)
