"""SCAFFOLD: server step by hand, the client correction on the tiny model, c_i persisting across rounds."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune import tensors
from fedtune.aggregate import scaffold_server_step
from fedtune.batching import EncodedDataset
from fedtune.client import local_train
from fedtune.config import ModelConfig
from fedtune.models import get_trainable, load_classifier
from fedtune.payload import CommStats
from fedtune.runtime.simulation import SimulationTransport
from fedtune.strategies import FedAvg, Scaffold
from fedtune.strategies.scaffold import CONTROL_DELTA, SCAFFOLD_STATE, ControlVariate, scaffold_client_control
from fedtune.types import ClientUpdate, LocalTrainConfig, RoundPlan
from fedtune.validation import update_problem


def t(*v):
    return {"w": torch.tensor(v, dtype=torch.float32)}


# --- server maths ----------------------------------------------------------------------------

def test_server_step_by_hand():
    # x = 1 + 0.5 * 2 = 2;  c = 0.1 + (2 / 8) * 0.4 = 0.2
    x, c = scaffold_server_step(t(1.0), t(0.1), t(2.0), t(0.4), num_sampled=2, num_clients=8, server_lr=0.5)
    assert x["w"].item() == pytest.approx(2.0) and c["w"].item() == pytest.approx(0.2)


def test_strategy_weights_deltas_by_examples_and_control_deltas_uniformly():
    s = Scaffold(num_clients=4)
    state = s.init(t(0.0))
    ups = [ClientUpdate("a", t(1.0), 1, extras={CONTROL_DELTA: t(1.0)}),
           ClientUpdate("b", t(5.0), 3, extras={CONTROL_DELTA: t(3.0)})]
    new, metrics = s.aggregate(1, state, iter(ups))
    assert new.params["w"].item() == pytest.approx(4.0)        # (1*1 + 3*5) / 4
    assert new.buffers["c"]["w"].item() == pytest.approx(1.0)  # (2/4) * mean(1, 3)
    assert metrics["clients_aggregated"] == 2.0


def test_plan_carries_the_server_control_variate():
    s = Scaffold(num_clients=3)
    state = s.init(t(1.0, 2.0))
    plan = s.configure(1, state, ["a"])
    assert isinstance(plan.objective, ControlVariate)
    assert torch.equal(plan.objective.c["w"], torch.zeros(2))


def test_update_without_control_delta_is_an_error_naming_the_client():
    s = Scaffold(num_clients=2)
    with pytest.raises(ValueError, match="client x"):
        s.aggregate(1, s.init(t(0.0)), [ClientUpdate("x", t(1.0), 1)])


def test_rejects_bad_num_clients():
    with pytest.raises(ValueError, match="num_clients"):
        Scaffold(num_clients=0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5, width=32), st.floats(-5, 5, width=32), st.integers(1, 9)),
                min_size=1, max_size=6), st.randoms())
def test_server_aggregate_is_permutation_invariant(rows, rnd):
    s = Scaffold(num_clients=10)
    ups = [ClientUpdate(f"c{i}", t(d), n, extras={CONTROL_DELTA: t(dc)}) for i, (d, dc, n) in enumerate(rows)]
    a, _ = s.aggregate(1, s.init(t(0.0)), ups)
    rnd.shuffle(ups)
    b, _ = s.aggregate(1, s.init(t(0.0)), ups)
    assert torch.allclose(a.params["w"], b.params["w"], atol=1e-5)
    assert torch.allclose(a.buffers["c"]["w"], b.buffers["c"]["w"], atol=1e-5)


def test_validation_checks_extras():
    ref = t(0.0, 0.0)
    ok = ClientUpdate("a", t(1.0, 1.0), 1, extras={CONTROL_DELTA: t(1.0, 2.0)})
    assert update_problem(ok, ref) is None
    nan = ClientUpdate("a", t(1.0, 1.0), 1, extras={CONTROL_DELTA: t(float("nan"), 2.0)})
    assert "extras" in update_problem(nan, ref) and "NaN" in update_problem(nan, ref)
    wrong = ClientUpdate("a", t(1.0, 1.0), 1, extras={CONTROL_DELTA: t(1.0)})
    assert "shape" in update_problem(wrong, ref)


def test_client_control_formula_by_hand():
    # c_i+ = c_i - c + (x - y) / (K lr) = 0.5 - 0.25 + (1 - 0.8) / (4 * 0.1) = 0.75
    out = scaffold_client_control(t(0.5), t(0.25), t(1.0), t(0.8), 4, 0.1)
    assert out["w"].item() == pytest.approx(0.75)


# --- client side on the tiny model -----------------------------------------------------------

@pytest.fixture
def setup(tiny_model_dir):
    model = load_classifier(ModelConfig(name=str(tiny_model_dir), mode="lora"), 3, False, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = [[2] + torch.randint(5, 20, (int(n),), generator=g).tolist() + [3]
           for n in torch.randint(3, 10, (40,), generator=g)]
    data = EncodedDataset(ids, None, torch.randint(0, 3, (40,), generator=g))
    return model, data, get_trainable(model)


def sgd(steps, lr=0.05):
    return LocalTrainConfig(epochs=0, max_steps=steps, lr=lr, batch_size=8, grad_clip=0.0, optimizer="sgd")


def train(model, data, params, objective, local, state=None, cid="c0", rnd=1):
    plan = RoundPlan(rnd, params, local, objective)
    return local_train(model, data, plan, cid, pad_id=0, seed=7, device=torch.device("cpu"), state=state)


def test_one_sgd_step_is_corrected_by_exactly_minus_lr_c(setup):
    """K=1, SGD, c_i = 0: SCAFFOLD's delta = FedAvg's delta - lr * c, and delta_c = the raw gradient."""
    model, data, params = setup
    lr = 0.05
    c = {k: 0.3 * torch.randn_like(v) for k, v in params.items()}
    plain = train(model, data, params, None, sgd(1, lr))
    state = {}
    scaf = train(model, data, params, ControlVariate(c), sgd(1, lr), state=state)
    for k in params:
        assert torch.allclose(scaf.delta[k], plain.delta[k] - lr * c[k], atol=1e-6)
        grad = -plain.delta[k] / lr
        assert torch.allclose(scaf.extras[CONTROL_DELTA][k], grad, atol=1e-4)
        assert torch.allclose(state[SCAFFOLD_STATE][k], grad, atol=1e-4)


def test_adamw_client_control_is_the_mean_gradient_not_the_adam_step(setup):
    """Under AdamW, c_i+ is the mean clipped gradient (option II would give ~sign(g) after one step)."""
    model, data, params = setup
    grad = {k: -v / 0.05 for k, v in train(model, data, params, None, sgd(1, 0.05)).delta.items()}
    adam = LocalTrainConfig(epochs=0, max_steps=1, lr=1e-3, batch_size=8, grad_clip=0.0, optimizer="adamw",
                            weight_decay=0.0)
    c = tensors.zeros_like(params)
    state: dict = {}
    up = train(model, data, params, ControlVariate(c), adam, state=state)
    for k in params:
        assert torch.allclose(state[SCAFFOLD_STATE][k], grad[k], atol=1e-4)
    option_two = {k: -up.delta[k] / 1e-3 for k in params}
    assert tensors.norm(tensors.sub(option_two, grad)) > 10 * tensors.norm(grad)

    # Two AdamW steps with clipping: the control is a mean of gradients clipped to norm 0.5.
    two = LocalTrainConfig(epochs=0, max_steps=2, lr=1e-3, batch_size=8, grad_clip=0.5, optimizer="adamw",
                           weight_decay=0.0)
    state2: dict = {}
    train(model, data, params, ControlVariate(c), two, state=state2)
    assert all(torch.isfinite(v).all() for v in state2[SCAFFOLD_STATE].values())
    total = torch.sqrt(sum(v.pow(2).sum() for v in state2[SCAFFOLD_STATE].values()))
    assert total <= 0.5 + 1e-5  # a mean of gradients clipped to norm 0.5 has norm at most 0.5


def test_zero_controls_give_fedavg_update_bit_for_bit(setup):
    model, data, params = setup
    local = LocalTrainConfig(epochs=0, max_steps=4, lr=0.05, batch_size=8)
    plain = train(model, data, params, None, local)
    scaf = train(model, data, params, ControlVariate(tensors.zeros_like(params)), local, state={})
    assert all(torch.equal(plain.delta[k], scaf.delta[k]) for k in params)


def test_own_control_variate_enters_the_correction(setup):
    """Stored c_i = 1, server c = 0, one SGD step: the step moves by +lr more; c_i+ is the raw gradient."""
    model, data, params = setup
    lr = 0.05
    c = tensors.zeros_like(params)
    a = train(model, data, params, ControlVariate(c), sgd(1, lr), state={})
    state = {SCAFFOLD_STATE: {k: torch.ones_like(v) for k, v in params.items()}}
    b = train(model, data, params, ControlVariate(c), sgd(1, lr), state=state)
    for k in params:
        assert torch.allclose(b.delta[k], a.delta[k] + lr, atol=1e-6)
        grad = -a.delta[k] / lr
        assert torch.allclose(state[SCAFFOLD_STATE][k], grad, atol=1e-4)
        assert torch.allclose(b.extras[CONTROL_DELTA][k], grad - 1.0, atol=1e-4)


def test_control_variate_persists_across_rounds_in_the_simulation(setup):
    model, data, params = setup
    local = LocalTrainConfig(epochs=0, max_steps=3, lr=0.02, batch_size=8)
    clients = {"c0": data.subset(list(range(20))), "c1": data.subset(list(range(20, 40)))}
    transport = SimulationTransport(model, clients, pad_id=0, seed=0, device=torch.device("cpu"))
    s = Scaffold(num_clients=2, local=local)
    state = s.init(params)

    plan1 = s.configure(1, state, ["c0", "c1"])
    ups1 = list(transport.run_round(plan1, ["c0", "c1"], CommStats()))
    c_after_1 = {cid: tensors.clone(transport.client_states[cid][SCAFFOLD_STATE]) for cid in clients}
    for u in ups1:  # first participation: c_i was zero, so c_i+ equals the control delta sent
        assert all(torch.equal(u.extras[CONTROL_DELTA][k], c_after_1[u.client_id][k]) for k in params)
    state, _ = s.aggregate(1, state, ups1)
    assert tensors.norm(state.buffers["c"]) > 0

    plan2 = s.configure(2, state, ["c0", "c1"])
    ups2 = list(transport.run_round(plan2, ["c0", "c1"], CommStats()))
    for u in ups2:  # round 2 started from round 1's c_i: c_i(2) = c_i(1) + delta_c(2)
        c2 = transport.client_states[u.client_id][SCAFFOLD_STATE]
        assert all(torch.allclose(c2[k], c_after_1[u.client_id][k] + u.extras[CONTROL_DELTA][k], atol=1e-6)
                   for k in params)

    # The corrected round-2 update differs from FedAvg's from the same global tensors.
    fedavg_plan = FedAvg(local=local).configure(2, state, ["c0", "c1"])
    plain = list(SimulationTransport(model, clients, pad_id=0, seed=0, device=torch.device("cpu"))
                 .run_round(fedavg_plan, ["c0", "c1"], CommStats()))
    for p, u in zip(plain, ups2, strict=True):
        assert tensors.norm(tensors.sub(p.delta, u.delta)) > 1e-4 * tensors.norm(p.delta)


def test_simulation_counts_control_bytes_both_ways(setup):
    model, data, params = setup
    local = LocalTrainConfig(epochs=0, max_steps=1, lr=0.02, batch_size=8)
    transport = SimulationTransport(model, {"c0": data}, pad_id=0, seed=0, device=torch.device("cpu"))
    fedavg_stats, scaf_stats = CommStats(), CommStats()
    list(transport.run_round(FedAvg(local=local).configure(1, FedAvg().init(params), ["c0"]), ["c0"], fedavg_stats))
    s = Scaffold(num_clients=1, local=local)
    list(transport.run_round(s.configure(1, s.init(params), ["c0"]), ["c0"], scaf_stats))
    assert scaf_stats.bytes_down == 2 * fedavg_stats.bytes_down
    assert scaf_stats.bytes_up == 2 * fedavg_stats.bytes_up
