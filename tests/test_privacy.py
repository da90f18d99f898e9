"""Central DP: clipping bounds a client's contribution, noise has the stated scale, epsilon is dp_accounting's."""

import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune import privacy, tensors
from fedtune.config import ConfigError, Experiment
from fedtune.experiment import build_strategy
from fedtune.strategies import DifferentiallyPrivate, FedAdam, FedAvg, Median, Scaffold
from fedtune.types import ClientUpdate


def t(*v):
    return {"w": torch.tensor(v, dtype=torch.float32)}


def direct_epsilon(noise_multiplier, q, rounds, delta):
    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise_multiplier)), rounds)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("nm, q, rounds, delta", [(1.1, 0.3, 5, 1e-5), (0.8, 1.0, 3, 1e-6), (2.0, 0.05, 40, 1e-5)])
def test_epsilon_equals_dp_accounting_figure(nm, q, rounds, delta):
    eps = privacy.dp_epsilon(noise_multiplier=nm, sampling_rate=q, rounds=rounds, delta=delta)
    assert eps == direct_epsilon(nm, q, rounds, delta)
    assert 0 < eps < math.inf


def test_epsilon_grows_with_rounds_and_is_infinite_without_noise():
    e1 = privacy.dp_epsilon(noise_multiplier=1.0, sampling_rate=0.5, rounds=1, delta=1e-5)
    e5 = privacy.dp_epsilon(noise_multiplier=1.0, sampling_rate=0.5, rounds=5, delta=1e-5)
    assert e1 < e5
    assert privacy.dp_epsilon(noise_multiplier=0.0, sampling_rate=0.5, rounds=1, delta=1e-5) == math.inf


def test_strategy_reports_epsilon_each_round_as_computed_directly():
    s = DifferentiallyPrivate(FedAvg(), clip=1.0, noise_multiplier=1.3, delta=1e-5, num_clients=10,
                              clients_per_round=3)
    state = s.init(t(0.0, 0.0))
    for rnd in (1, 2, 3):
        ups = [ClientUpdate(f"c{i}", t(0.1, 0.2), 5) for i in range(3)]
        state, metrics = s.aggregate(rnd, state, ups)
        assert metrics["dp_epsilon"] == direct_epsilon(1.3, 0.3, rnd, 1e-5)
        assert metrics["clients_aggregated"] == 3.0


def test_clipping_bounds_each_clients_contribution():
    """Noise off: replacing one client's delta by a huge one moves the mean by at most clip / denominator."""
    clip, denom = 0.5, 4
    s = DifferentiallyPrivate(FedAvg(), clip=clip, noise_multiplier=0.0, delta=1e-5, num_clients=8,
                              clients_per_round=denom)
    honest = [ClientUpdate(f"c{i}", t(0.1 * i, -0.1), 1) for i in range(4)]
    attacked = honest[:3] + [ClientUpdate("evil", t(1e6, -1e6), 1000)]
    a, ma = s.aggregate(1, s.init(t(0.0, 0.0)), honest)
    b, mb = s.aggregate(1, s.init(t(0.0, 0.0)), attacked)
    moved = tensors.norm(tensors.sub(a.params, b.params))
    assert moved <= 2 * clip / denom + 1e-6  # old (<= clip) out, new (== clip) in
    assert mb["dp_clipped_fraction"] == 0.25 and ma["dp_clipped_fraction"] == 0.0
    # fixed denominator: the sum is divided by clients_per_round, and example counts do not weight
    assert torch.allclose(a.params["w"], torch.tensor([0.6 / 4, -0.4 / 4]))


def test_clipped_sum_clips_to_norm_exactly():
    acc = privacy.ClippedSum(clip=1.0)
    acc.add(t(3.0, 4.0))
    acc.add(t(0.3, 0.4))
    assert torch.allclose(acc.total["w"], torch.tensor([0.6 + 0.3, 0.8 + 0.4]))
    assert acc.clipped == 1 and acc.count == 2


def test_noise_has_the_stated_scale():
    """Zero updates: the released mean is pure noise with std noise_multiplier * clip / denominator."""
    gen = torch.Generator().manual_seed(0)
    zero = {"w": torch.zeros(200_000)}
    out = privacy.private_mean(zero, clip=0.5, noise_multiplier=1.2, denominator=3.0, generator=gen)
    expected = 1.2 * 0.5 / 3.0
    assert float(out["w"].std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(out["w"].mean())) < 5 * expected / math.sqrt(200_000)


def test_noise_is_seeded_per_round():
    def run(seed, rnd):
        s = DifferentiallyPrivate(FedAvg(), clip=1.0, noise_multiplier=1.0, delta=1e-5, num_clients=2,
                                  clients_per_round=2, seed=seed)
        return s.aggregate(rnd, s.init(t(0.0, 0.0)), [ClientUpdate("a", t(0.0, 0.0), 1)])[0].params["w"]

    assert torch.equal(run(0, 1), run(0, 1))
    assert not torch.equal(run(0, 1), run(0, 2)) and not torch.equal(run(0, 1), run(1, 1))


def test_composes_with_a_server_optimizer():
    s = DifferentiallyPrivate(FedAdam(server_lr=0.1), clip=1.0, noise_multiplier=0.5, delta=1e-5,
                              num_clients=4, clients_per_round=2)
    state, metrics = s.aggregate(1, s.init(t(0.0)), [ClientUpdate("a", t(1.0), 1), ClientUpdate("b", t(1.0), 1)])
    assert set(state.buffers) == {"m", "v"} and "dp_epsilon" in metrics


@pytest.mark.parametrize("kwargs, field", [
    (dict(clip=0.0), "clip"), (dict(noise_multiplier=-0.1), "noise_multiplier"),
    (dict(delta=0.0), "delta"), (dict(delta=1.0), "delta"),
])
def test_invalid_settings_are_refused_naming_the_field(kwargs, field):
    base = dict(clip=1.0, noise_multiplier=1.0, delta=1e-5, num_clients=4, clients_per_round=2)
    with pytest.raises(ValueError, match=field):
        DifferentiallyPrivate(FedAvg(), **{**base, **kwargs})
    key = {"clip": "clip", "noise_multiplier": "noise_multiplier", "delta": "delta"}[field]
    with pytest.raises(ConfigError, match=f"privacy.{key}"):
        Experiment.from_overrides([f"privacy.{key}={kwargs[field]}"])


@pytest.mark.parametrize("inner", [Scaffold(num_clients=4), Median()])
def test_refuses_rules_that_need_individual_updates(inner):
    with pytest.raises(ValueError, match=type(inner).__name__):
        DifferentiallyPrivate(inner, clip=1.0, noise_multiplier=1.0, delta=1e-5, num_clients=4, clients_per_round=2)


def test_config_builds_the_wrapper_with_the_sampling_rate():
    exp = Experiment.from_overrides(["privacy.enabled=true", "privacy.clip=0.3", "partition.num_clients=10",
                                     "federation.clients_per_round=4", "strategy.name=fedavgm"])
    s = build_strategy(exp, num_clients=10)
    assert isinstance(s, DifferentiallyPrivate) and s.sampling_rate == 0.4 and s.clip == 0.3
    with pytest.raises(ConfigError, match="scaffold"):
        build_strategy(Experiment.from_overrides(["privacy.enabled=true", "strategy.name=scaffold"]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-1e3, 1e3, width=32), min_size=3, max_size=3), min_size=1, max_size=6),
       st.floats(0.01, 10.0))
def test_clipped_sum_norm_is_at_most_count_times_clip(rows, clip):
    acc = privacy.ClippedSum(clip=clip)
    for r in rows:
        acc.add({"w": torch.tensor(r)})
    assert tensors.norm(acc.total) <= len(rows) * clip * (1 + 1e-5)
    assert acc.clipped == sum(1 for r in rows if tensors.norm({"w": torch.tensor(r)}) > clip)


def test_accounting_does_not_flood_the_log(caplog):
    """dp_accounting warns for every fractional RDP order that fails to converge, in compose too: kept quiet."""
    import logging

    with caplog.at_level(logging.WARNING):
        for rounds in (1, 5, 20):
            privacy.dp_epsilon(noise_multiplier=0.3, sampling_rate=0.5, rounds=rounds, delta=1e-5)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records[:2]
