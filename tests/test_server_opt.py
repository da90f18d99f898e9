"""Server optimizers on the pseudo-gradient: hand-checked steps and their strategies."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune import server_opt
from fedtune.strategies import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi
from fedtune.types import ClientUpdate


def t(*v):
    return {"w": torch.tensor(v, dtype=torch.float32)}


def test_pseudo_gradient_is_minus_mean_delta():
    assert torch.equal(server_opt.pseudo_gradient(t(1.0, -2.0))["w"], torch.tensor([-1.0, 2.0]))


def test_momentum_step_by_hand():
    # m = 0.5 * 2 + (-1) = 0; x = 3 - 0.1 * 0 = 3.   second coord: m = 0.5*0 + 4 = 4; x = 1 - 0.4 = 0.6
    p, m = server_opt.momentum_step(t(3.0, 1.0), t(-1.0, 4.0), t(2.0, 0.0), server_lr=0.1, beta=0.5)
    assert torch.allclose(m["w"], torch.tensor([0.0, 4.0]))
    assert torch.allclose(p["w"], torch.tensor([3.0, 0.6]))


def test_adam_step_by_hand():
    # g = 2, m0 = 0, v0 = tau^2 = 0.01; b1 = 0.9, b2 = 0.99:
    # m = 0.2, v = 0.99 * 0.01 + 0.01 * 4 = 0.0499, x = 1 - 0.1 * 0.2 / (sqrt(0.0499) + 0.1)
    p, m, v = server_opt.adam_step(t(1.0), t(2.0), t(0.0), t(0.01), server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    assert m["w"].item() == pytest.approx(0.2)
    assert v["w"].item() == pytest.approx(0.0499)
    assert p["w"].item() == pytest.approx(1 - 0.02 / (math.sqrt(0.0499) + 0.1), rel=1e-6)


def test_yogi_step_by_hand():
    # v0 = 0.01 < g^2 = 4: sign(v - g^2) = -1, v = 0.01 + 0.01 * 4 = 0.05 (Adam would give 0.0499)
    p, m, v = server_opt.yogi_step(t(1.0), t(2.0), t(0.0), t(0.01), server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    assert v["w"].item() == pytest.approx(0.05)
    assert p["w"].item() == pytest.approx(1 - 0.02 / (math.sqrt(0.05) + 0.1), rel=1e-6)
    # v0 = 9 > g^2 = 4: v = 9 - 0.01 * 4 = 8.96
    _, _, v = server_opt.yogi_step(t(1.0), t(2.0), t(0.0), t(9.0), server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    assert v["w"].item() == pytest.approx(8.96)


def test_adagrad_step_by_hand():
    # v = 0.01 + 4 = 4.01; m = 0.2 (beta1 = 0.9)
    p, m, v = server_opt.adagrad_step(t(1.0), t(2.0), t(0.0), t(0.01), server_lr=0.1, beta1=0.9, tau=0.1)
    assert v["w"].item() == pytest.approx(4.01)
    assert p["w"].item() == pytest.approx(1 - 0.02 / (math.sqrt(4.01) + 0.1), rel=1e-6)


def test_steps_do_not_modify_their_inputs():
    params, g, m, v = t(1.0), t(2.0), t(0.5), t(0.25)
    server_opt.adam_step(params, g, m, v, server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    server_opt.momentum_step(params, g, m, server_lr=0.1, beta=0.9)
    assert params["w"].item() == 1.0 and m["w"].item() == 0.5 and v["w"].item() == 0.25


def updates(*deltas):
    return [ClientUpdate(f"c{i}", d, n) for i, (d, n) in enumerate(deltas)]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.floats(-10, 10, width=32), min_size=3, max_size=3), min_size=1, max_size=5),
       st.lists(st.integers(1, 50), min_size=5, max_size=5))
def test_fedavgm_with_zero_momentum_and_unit_lr_is_fedavg(rows, counts):
    ups = [ClientUpdate(f"c{i}", {"w": torch.tensor(r)}, counts[i]) for i, r in enumerate(rows)]
    p0 = {"w": torch.tensor([0.5, -1.0, 2.0])}
    a, _ = FedAvg().aggregate(1, FedAvg().init(p0), ups)
    s = FedAvgM(momentum=0.0, server_lr=1.0)
    b, _ = s.aggregate(1, s.init(p0), ups)
    assert torch.allclose(a.params["w"], b.params["w"], atol=1e-6)


def test_fedavgm_momentum_accumulates_across_rounds():
    s = FedAvgM(momentum=0.5, server_lr=1.0)
    state = s.init(t(0.0))
    state, _ = s.aggregate(1, state, updates((t(1.0), 1)))  # g = -1, m = -1, x = 1
    state, _ = s.aggregate(2, state, updates((t(1.0), 1)))  # m = -0.5 - 1 = -1.5, x = 2.5
    assert state.params["w"].item() == pytest.approx(2.5)
    assert state.buffers["m"]["w"].item() == pytest.approx(-1.5)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_adaptive_strategies_keep_moments_in_buffers(cls):
    s = cls(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    state = s.init(t(1.0, 1.0))
    assert torch.allclose(state.buffers["v"]["w"], torch.full((2,), 0.01))
    # weighted mean delta: (1*[-2, 0] + 3*[-2, 0]) / 4 = [-2, 0] -> g = [2, 0]
    state, metrics = s.aggregate(1, state, updates((t(-2.0, 0.0), 1), (t(-2.0, 0.0), 3)))
    assert set(state.buffers) == {"m", "v"} and metrics["clients_aggregated"] == 2.0
    assert state.buffers["m"]["w"].tolist() == pytest.approx([0.2, 0.0])
    # a zero pseudo-gradient coordinate does not move; the other moves against g
    assert state.params["w"][1].item() == 1.0 and state.params["w"][0].item() < 1.0
    assert state.round == 1


@pytest.mark.parametrize("kwargs, field", [
    (dict(server_lr=0.0), "server_lr"), (dict(beta1=1.0), "beta1"), (dict(beta2=-0.1), "beta2"), (dict(tau=0.0), "tau"),
])
def test_adaptive_rejects_bad_hyperparameters(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FedAdam(**kwargs)


def test_fedavgm_rejects_bad_momentum():
    with pytest.raises(ValueError, match="momentum"):
        FedAvgM(momentum=1.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 10), st.floats(-10, -1e-3)), min_size=1, max_size=6),
       st.sampled_from(["adam", "yogi", "adagrad"]),
       st.floats(0.001, 1.0), st.floats(1e-4, 1.0))
def test_adaptive_first_step_moves_against_the_pseudo_gradient(g, kind, lr, tau):
    """From m = 0, v = tau^2: x moves by -lr*(1-b1)*g/(sqrt(v)+tau): opposite sign to g, zero where g is 0."""
    params = {"w": torch.zeros(len(g))}
    grad = {"w": torch.tensor(g)}
    m = {"w": torch.zeros(len(g))}
    v = server_opt.init_second_moment(params, tau)
    kw = dict(server_lr=lr, beta1=0.9, tau=tau)
    step = {"adam": server_opt.adam_step, "yogi": server_opt.yogi_step, "adagrad": server_opt.adagrad_step}[kind]
    if kind != "adagrad":
        kw["beta2"] = 0.99
    new, _, _ = step(params, grad, m, v, **kw)
    assert torch.equal(torch.sign(new["w"]), -torch.sign(grad["w"]))
