"""FedDyn (Acar et al. 2021, Algorithm 1), added as one file: maths, client half, registry, runs, resume, Flower."""

from __future__ import annotations

import math

import pytest
import torch
from builders import full_plan, perturbed
from equivalence import assert_same_plan, assert_same_states, assert_same_updates, kill_and_resume, parallel, sequential
from safetensors.torch import load_file
from torch import nn

from fedtune.client import local_train
from fedtune.client.kinds import LocalContext, LocalResult, StackedContext
from fedtune.config import ConfigError, Experiment
from fedtune.models import get_trainable
from fedtune.runtime.simulation import client_seed
from fedtune.strategies.base import capabilities_of, strategy_spec
from fedtune.strategies.feddyn import (
    FEDDYN_H,
    FEDDYN_STATE,
    DynamicRegularizer,
    FedDyn,
    feddyn_server_step,
    regularizer_gradient,
)
from fedtune.strategies.from_config import build_strategy
from fedtune.types import ClientUpdate, LocalTrainConfig, RoundPlan

CPU = torch.device("cpu")
LOCAL = LocalTrainConfig(1.0, 0, 0.1, 4)
ADAPTER = "adapter_model.safetensors"


def _update(cid: str, delta: list[float], n: int) -> ClientUpdate:
    return ClientUpdate(cid, {"w": torch.tensor(delta)}, n)


# ----------------------------------------------------------------------------- server maths


def test_server_step_matches_a_hand_computation():
    """m = 4, alpha = 0.5; two rounds of Algorithm 1 worked out by hand (unweighted mean: example counts ignored)."""
    s = FedDyn(local=LOCAL, num_clients=4, alpha=0.5)
    state = s.init({"w": torch.tensor([1.0, 2.0])})
    assert torch.equal(state.buffers[FEDDYN_H]["w"], torch.zeros(2))
    # Round 1: deltas [0.2, -0.4] and [0.6, 0.0]: sum [0.8, -0.4], mean [0.4, -0.2].
    #   h1 = 0 - 0.5 * (1/4) * [0.8, -0.4] = [-0.1, 0.05]
    #   theta1 = ([1, 2] + [0.4, -0.2]) - h1 / 0.5 = [1.4, 1.8] - [-0.2, 0.1] = [1.6, 1.7]
    state, metrics = s.aggregate(1, state, iter([_update("a", [0.2, -0.4], 10), _update("b", [0.6, 0.0], 30)]))
    torch.testing.assert_close(state.buffers[FEDDYN_H]["w"], torch.tensor([-0.1, 0.05]))
    torch.testing.assert_close(state.params["w"], torch.tensor([1.6, 1.7]))
    assert metrics["clients_aggregated"] == 2 and metrics["feddyn_h_norm"] == pytest.approx(math.hypot(0.1, 0.05))
    # Round 2: one client, delta [0.1, 0.1].
    #   h2 = [-0.1, 0.05] - 0.125 * [0.1, 0.1] = [-0.1125, 0.0375]
    #   theta2 = [1.7, 1.8] - h2 / 0.5 = [1.7, 1.8] - [-0.225, 0.075] = [1.925, 1.725]
    state, _ = s.aggregate(2, state, [_update("c", [0.1, 0.1], 1)])
    torch.testing.assert_close(state.buffers[FEDDYN_H]["w"], torch.tensor([-0.1125, 0.0375]))
    torch.testing.assert_close(state.params["w"], torch.tensor([1.925, 1.725]))
    assert state.round == 2


def test_server_step_is_permutation_invariant_and_refuses_bad_counts():
    s = FedDyn(local=LOCAL, num_clients=3, alpha=0.1)
    state = s.init({"w": torch.zeros(3)})
    ups = [_update(c, [float(i), -1.0, 2.0 * i], 5) for i, c in enumerate("abc")]
    a, _ = s.aggregate(1, state, ups)
    b, _ = s.aggregate(1, state, ups[::-1])
    torch.testing.assert_close(a.params["w"], b.params["w"])
    with pytest.raises(ValueError, match="no client updates"):
        s.aggregate(1, state, [])
    with pytest.raises(ValueError, match="num_clients"):
        feddyn_server_step({"w": torch.zeros(1)}, {"w": torch.zeros(1)}, {"w": torch.zeros(1)}, 4, 3, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        FedDyn(local=LOCAL, num_clients=3, alpha=0.0)


# ----------------------------------------------------------------------------- client half


def _objective_term(w, w_global, grad_prev, alpha):
    """FedDyn's local objective minus L_k: -<grad_k, w> + alpha/2 ||w - w_global||^2."""
    return -(grad_prev * w).sum() + 0.5 * alpha * (w - w_global).pow(2).sum()


def test_regularizer_gradient_equals_autograd():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g, requires_grad=True)
    w_global, grad_prev = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    (auto,) = torch.autograd.grad(_objective_term(w, w_global, grad_prev, 0.3), w)
    torch.testing.assert_close(regularizer_gradient(w.detach(), w_global, grad_prev, 0.3), auto)


def test_hooks_add_the_gradient_of_the_local_objective():
    """Sequential and batched hooks: loss gradient + hook = autograd of L_k(w) + the FedDyn term."""
    g = torch.Generator().manual_seed(1)
    alpha = 0.2
    w_global = {"a": torch.randn(3, generator=g), "b": torch.randn(2, 2, generator=g)}
    grad_prev = {k: torch.randn(v.shape, generator=g) for k, v in w_global.items()}
    start = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in w_global.items()}

    def loss(ws):
        return sum((v ** 3).sum() for v in ws.values())

    params = {k: nn.Parameter(v.clone()) for k, v in start.items()}
    expected = torch.autograd.grad(loss(params) + sum(_objective_term(params[k], w_global[k], grad_prev[k], alpha)
                                                      for k in params), list(params.values()))
    loss(params).backward()
    ctx = LocalContext("c", w_global, {FEDDYN_STATE: grad_prev}, LOCAL, CPU)
    DynamicRegularizer(alpha).start(ctx).before_clip(params)
    for p, e in zip(params.values(), expected, strict=True):
        torch.testing.assert_close(p.grad, e)

    # Batched: slot 0 has the state above, slot 1 none yet (grad_k = 0).
    stacks = {k: torch.stack([v, v]).requires_grad_(True) for k, v in start.items()}
    sum(loss({k: s[i] for k, s in stacks.items()}) for i in range(2)).backward()
    sctx = StackedContext(["c0", "c1"], w_global, [{FEDDYN_STATE: grad_prev}, {}], LOCAL, CPU)
    with torch.no_grad():
        DynamicRegularizer(alpha).start_stacked(sctx).before_clip(stacks, {k: s.grad for k, s in stacks.items()}, [0, 1])
    for (k, s), e in zip(stacks.items(), expected, strict=True):
        torch.testing.assert_close(s.grad[0], e)
        w = start[k].clone().requires_grad_(True)
        (e1,) = torch.autograd.grad(loss({k: w}) + _objective_term(w, w_global[k], torch.zeros_like(w), alpha), w)
        torch.testing.assert_close(s.grad[1], e1)


def test_finish_keeps_the_new_gradient_state():
    grad_prev = {"w": torch.tensor([1.0, -2.0])}
    start, local = {"w": torch.tensor([0.5, 0.5])}, {"w": torch.tensor([1.5, 0.0])}
    state = {FEDDYN_STATE: grad_prev}
    hooks = DynamicRegularizer(0.5).start(LocalContext("c", start, state, LOCAL, CPU))
    result = LocalResult("c", start, local, {"w": local["w"] - start["w"]}, steps=3)
    hooks.finish(result)
    # grad_k <- grad_k - alpha (w_local - w_global) = [1, -2] - 0.5 * [1, -0.5] = [0.5, -1.75]
    torch.testing.assert_close(state[FEDDYN_STATE]["w"], torch.tensor([0.5, -1.75]))
    assert result.metrics["feddyn_grad_norm"] == pytest.approx(math.hypot(0.5, 1.75))


def test_client_state_follows_the_paper_over_two_rounds(lora_model, client_data):
    """Real local training: after round t, grad_k = grad_k(t-1) - alpha (theta_k^t - theta^{t-1}); round 2 uses it."""
    alpha = 0.05
    local = LocalTrainConfig(1.0, 3, 0.01, 8)
    data = client_data["c1"]
    theta0 = perturbed(get_trainable(lora_model))
    state: dict = {}

    def train(theta, rnd, st):
        plan = RoundPlan(rnd, theta, local, DynamicRegularizer(alpha))
        return local_train(lora_model, data, plan, "c1", pad_id=0, seed=client_seed(0, rnd, "c1"), device=CPU,
                           state=st)

    u1 = train(theta0, 1, state)
    g1 = {k: -alpha * u1.delta[k] for k in theta0}  # grad_k^0 = 0
    assert state.keys() == {FEDDYN_STATE}
    for k in theta0:
        torch.testing.assert_close(state[FEDDYN_STATE][k], g1[k])
    theta1 = perturbed(theta0, seed=2)  # whatever the server sends next
    u2 = train(theta1, 2, state)
    for k in theta0:
        torch.testing.assert_close(state[FEDDYN_STATE][k], g1[k] - alpha * u2.delta[k])
    fresh = train(theta1, 2, {})  # the same round without the client's memory trains differently
    assert any(not torch.allclose(fresh.delta[k], u2.delta[k]) for k in theta0)


def test_batched_trainer_equals_sequential(lora_model, client_data):
    """The stacked hooks give the sequential updates and states (one client already holds a grad_k)."""
    params = perturbed(get_trainable(lora_model))
    local = LocalTrainConfig(epochs=1.0, max_steps=0, lr=0.01, batch_size=4, weight_decay=0.01, grad_clip=0.5)
    plan = RoundPlan(2, params, local, DynamicRegularizer(0.1))

    def states():
        return {"c2": {FEDDYN_STATE: {k: 0.01 * torch.ones_like(v) for k, v in params.items()}}}

    seq_states, par_states = states(), states()
    assert_same_updates(sequential(lora_model, client_data, plan, seq_states),
                        parallel(lora_model, client_data, plan, par_states))
    assert_same_states(seq_states, par_states, FEDDYN_STATE, params)


def test_kind_travels_through_the_wire_schema_and_flower_messages():
    plan = full_plan(DynamicRegularizer(0.03))
    from fedtune.wire import plan_config, plan_from_config, plan_tensors

    config = plan_config(plan)
    assert config["objective.kind"] == "feddyn" and config["objective.alpha"] == 0.03
    assert_same_plan(plan_from_config(config, plan_tensors(plan)), plan)
    messages = pytest.importorskip("fedtune.runtime.flower.messages")
    request = messages.TrainRequest("client_001", plan, messages.TaskInfo(("a", "b")))
    back = messages.decode_train_request(messages.encode_train_request(request))
    assert back.plan.objective == DynamicRegularizer(0.03)


# ----------------------------------------------------------------------------- registry and config


def test_registered_with_its_options_and_capabilities(tiny_experiment):
    spec = strategy_spec("feddyn")
    assert spec.option_names() == ["alpha"]
    caps = spec.capabilities
    assert caps.streams and caps.client_state and not caps.secagg_safe and not caps.dp_safe
    exp = Experiment.from_overrides(["strategy.name=feddyn", "strategy.alpha=0.1", "partition.num_clients=6"])
    s = build_strategy(exp)
    assert type(s) is FedDyn and (s.alpha, s.num_clients) == (0.1, 6) and capabilities_of(s) == caps
    assert 'alpha = 0.1' in exp.to_toml() and Experiment.from_overrides([], base=exp) == exp
    with pytest.raises(ConfigError, match=r"strategy\.alpha must be > 0"):
        Experiment.from_overrides(["strategy.name=feddyn", "strategy.alpha=0"])
    with pytest.raises(ConfigError, match=r"unknown key 'strategy\.alhpa'.*'feddyn' takes: alpha"):
        Experiment.from_overrides(["strategy.name=feddyn", "strategy.alhpa=0.1"])


def test_capabilities_refuse_dp_secagg_and_flower_resume(tiny_experiment):
    from fedtune.checkpoint import checkpoint_to_resume
    from fedtune.config.checks import check_experiment

    with pytest.raises(ConfigError, match=r"\[privacy\].*feddyn.*cannot wrap FedDyn"):
        build_strategy(Experiment.from_overrides(["privacy.enabled=true", "strategy.name=feddyn"]))
    with pytest.raises(ConfigError, match="runtime.secagg.*strategy.name = 'feddyn'"):
        check_experiment(tiny_experiment("strategy.name=feddyn", 'runtime.mode="flower"', "runtime.secagg=true"))
    with pytest.raises(ConfigError, match="cannot resume on Flower.*feddyn"):
        checkpoint_to_resume(tiny_experiment("strategy.name=feddyn", 'runtime.mode="flower"'))


# ----------------------------------------------------------------------------- runs

FEDDYN = ["strategy.name=feddyn", "strategy.alpha=0.01", "train.epochs=1"]


def test_end_to_end_moves_the_model_and_stays_finite(tiny_experiment, tmp_path):
    from fedtune.experiment import run_experiment
    from fedtune.models import load_classifier, save_model

    exp = tiny_experiment(*FEDDYN, "eval.every=1")
    result = run_experiment(exp, quiet=True)
    assert [r["round"] for r in result.history] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) and r["feddyn_h_norm"] > 0 for r in result.history)
    assert math.isfinite(result.final_metrics["accuracy"])
    final = load_file(result.output_dir / "model" / ADAPTER)
    save_model(load_classifier(exp.model, 3, False, exp.seed), None, tmp_path / "initial")
    initial = load_file(tmp_path / "initial" / ADAPTER)
    assert final.keys() == initial.keys()
    assert all(bool(torch.isfinite(v).all()) for v in final.values())
    assert sum(float((final[k] - initial[k]).pow(2).sum()) for k in final) > 0


def test_killed_run_resumes_bit_for_bit(tiny_experiment, tmp_path, monkeypatch):
    """h (server buffer) and every client's grad_k (client states) go through the checkpoint.

    3 of 4 clients a round (seed 2 samples clients 0-2, then 0, 2, 3, then 0-2): client_001 sits out
    round 2 and comes back in round 3, after the resume, with its round-1 grad_k.
    """
    sets = [*FEDDYN, "federation.rounds=3", "eval.every=1", "partition.num_clients=4", "federation.clients_per_round=3",
            "seed=2"]
    _, _, sa = kill_and_resume(tiny_experiment, tmp_path, monkeypatch, sets)
    assert any(k[:2] == ("buffer", FEDDYN_H) for k in sa)
    assert len({k[1] for k in sa if k[0] == "client" and k[2] == FEDDYN_STATE}) == 4  # every client took part


@pytest.mark.slow
def test_flower_deployment_matches_simulation(tiny_experiment, tmp_path):
    """Real SuperLink + 2 SuperNodes, 2 rounds: grad_k stays on the nodes; the model is the simulation's (1e-6)."""
    pytest.importorskip("flwr")
    import shutil

    from flower_processes import federation

    from fedtune.experiment import run_experiment

    def exp(out, *extra):
        return tiny_experiment(*FEDDYN, "partition.num_clients=2", "federation.rounds=2",
                               'data.label_names=["money","sports","tech"]', f'output_dir="{out}"', *extra)

    sim = run_experiment(exp(tmp_path / "sim"), quiet=True)
    manifests = tmp_path / "manifests"
    shutil.copytree(sim.output_dir / "partition", manifests)
    with federation(tmp_path / "flower") as fed:
        fed.start_superlink()
        for i in range(2):
            fed.start_supernode(f"node{i}", f'manifest="{manifests / f"client_{i:03d}.json"}"')
        try:
            result = run_experiment(exp(tmp_path / "flower-run", 'runtime.mode="flower"',
                                        f'runtime.superlink="{fed.address}"', "runtime.insecure=true",
                                        "runtime.connect_timeout=60", "runtime.round_timeout=60"), quiet=True)
        except Exception as exc:
            raise AssertionError(f"feddyn on Flower failed: {exc}\n{fed.tail()}") from exc
    a, b = load_file(sim.output_dir / "model" / ADAPTER), load_file(result.output_dir / "model" / ADAPTER)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-6, f"max |flower - simulation| = {diff:.3e}"
    assert [r["feddyn_h_norm"] for r in result.history] == pytest.approx([r["feddyn_h_norm"] for r in sim.history],
                                                                          rel=1e-5)
