"""simulation.workers: clients trained in forked worker processes give the one-process results."""

import pytest
import torch
from builders import perturbed
from equivalence import CPU, assert_same_updates

from fedtune.checkpoint import read_checkpoint
from fedtune.config import ConfigError
from fedtune.experiment import run_experiment
from fedtune.models import get_trainable
from fedtune.payload import CommStats
from fedtune.runtime.simulation import SimulationTransport
from fedtune.runtime.workers import WorkerPool, worker_threads
from fedtune.strategies.scaffold import SCAFFOLD_STATE
from fedtune.types import LocalTrainConfig, RoundPlan


def _final(result):
    return read_checkpoint(result.output_dir).state.params


def _close(a: dict, b: dict, atol=1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("extra", [
    ['strategy.name="fedavg"'],
    ['strategy.name="scaffold"', 'train.optimizer="sgd"', "train.lr=0.05", "simulation.state_cache=1",
     'federation.codec_up="topk:0.3"'],
    ['strategy.name="fedavg"', "simulation.parallel_clients=2"],
], ids=["fedavg", "scaffold-topk-error-feedback-cache1", "batched-groups"])
def test_workers_give_the_one_process_run(tiny_experiment, tmp_path, extra):
    """Same model, metrics and client states with 2 workers (1 thread each) as in this process (1 thread)."""
    torch.set_num_threads(1)  # (the workers' thread count: the sums split alike)
    base = ["partition.num_clients=5", "federation.rounds=3", "train.epochs=2"] + extra
    one = run_experiment(tiny_experiment(*base, f'output_dir="{tmp_path / "one"}"'), quiet=True)
    two = run_experiment(tiny_experiment(*base, "simulation.workers=2", f'output_dir="{tmp_path / "two"}"'),
                         quiet=True)
    _close(_final(one), _final(two))
    for a, b in zip(one.history, two.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["bytes_up"] == b["bytes_up"] and a["bytes_down"] == b["bytes_down"]
    if "scaffold" in extra[0]:
        from safetensors.torch import load_file

        from fedtune.client_store import STORE_DIR

        def states(result):  # client -> its state file's tensors (generation numbers may differ)
            return {p.name.split(".g")[0]: load_file(p) for p in (result.output_dir / STORE_DIR).glob("*.safetensors")}

        a, b = states(one), states(two)
        assert len(a) == 5 and a.keys() == b.keys()
        for cid in a:
            _close(a[cid], b[cid])


def _transport(lora_model, client_data):
    return SimulationTransport(lora_model, client_data, pad_id=0, seed=0, device=CPU)


def test_pool_streams_the_updates_in_client_order(lora_model, client_data):
    params = perturbed(get_trainable(lora_model))
    plan = RoundPlan(2, params, LocalTrainConfig(epochs=1.0, max_steps=0, lr=0.01, batch_size=4))
    torch.set_num_threads(1)
    here = _transport(lora_model, client_data)
    pooled = _transport(lora_model, client_data)
    pooled.use_workers(2, threads=1)
    try:
        order = list(reversed(client_data))
        a = {u.client_id: u for u in here.run_round(plan, order, CommStats())}
        got = list(pooled.run_round(plan, order, CommStats()))
        assert [u.client_id for u in got] == order
        assert_same_updates(a, {u.client_id: u for u in got})
    finally:
        pooled.close()


class _Boom(Exception):
    pass


def test_a_failing_client_is_raised_here_and_the_pool_stays_usable(lora_model, client_data, monkeypatch):
    params = get_trainable(lora_model)
    plan = RoundPlan(1, params, LocalTrainConfig(epochs=1.0, max_steps=0, lr=0.01, batch_size=4))
    first = next(iter(client_data))
    real = SimulationTransport.train_job

    def train_job(self, job, states):
        if job.clients == (first,) and job.plan.round == 1:
            raise _Boom(f"bad rows for {first}")
        return real(self, job, states)

    monkeypatch.setattr(SimulationTransport, "train_job", train_job)  # (before the fork: the workers have it)
    t = _transport(lora_model, client_data)
    t.use_workers(2, threads=1)
    try:
        with pytest.raises(_Boom, match=f"bad rows for {first}") as info:
            list(t.run_round(plan, list(client_data), CommStats()))
        assert any(first in note for note in info.value.__notes__)
        again = list(t.run_round(RoundPlan(2, params, plan.local), list(client_data), CommStats()))
        assert [u.client_id for u in again] == list(client_data)  # no stale reply from the failed round
    finally:
        t.close()


def test_client_state_travels_to_the_worker_and_back(lora_model, client_data):
    from fedtune.strategies.scaffold import ControlVariate

    params = perturbed(get_trainable(lora_model))
    c = {k: 0.01 * torch.ones_like(v) for k, v in params.items()}
    plan = RoundPlan(1, params, LocalTrainConfig(epochs=1.0, max_steps=0, lr=0.05, batch_size=8, optimizer="sgd"), ControlVariate(c))
    torch.set_num_threads(1)
    here, pooled = _transport(lora_model, client_data), _transport(lora_model, client_data)
    pooled.use_workers(2, threads=1)
    try:
        list(here.run_round(plan, list(client_data), CommStats()))
        list(pooled.run_round(plan, list(client_data), CommStats()))
    finally:
        pooled.close()
    assert set(pooled.client_states) == set(client_data)
    for cid in client_data:
        _close(here.client_states[cid][SCAFFOLD_STATE], pooled.client_states[cid][SCAFFOLD_STATE])


def test_refusals_name_the_setting(lora_model, client_data, tiny_experiment):
    t = SimulationTransport(lora_model, client_data, pad_id=0, seed=0, device=torch.device("cuda"))
    with pytest.raises(ConfigError, match="simulation.workers = 2 needs the CPU, not cuda"):
        WorkerPool(t, 2)
    with pytest.raises(ConfigError, match="at least 2 workers"):
        WorkerPool(t, 1)
    with pytest.raises(ConfigError, match="simulation.workers must be >= 1, got 0"):
        tiny_experiment("simulation.workers=0")
    with pytest.raises(ConfigError, match="threads per worker must be >= 1"):
        worker_threads(0)
    assert worker_threads() == 1 and worker_threads(3) == 3


def test_workers_may_change_on_resume(tiny_experiment, tmp_path):
    out = tmp_path / "r"
    run_experiment(tiny_experiment("federation.rounds=1", f'output_dir="{out}"'), quiet=True)
    res = run_experiment(tiny_experiment("federation.rounds=2", "simulation.workers=2", f'output_dir="{out}"'),
                         quiet=True, resume=True)
    assert [h["round"] for h in res.history] == [1, 2]


def test_an_abandoned_round_leaves_no_stale_reply(lora_model, client_data):
    params = get_trainable(lora_model)
    local = LocalTrainConfig(epochs=1.0, max_steps=0, lr=0.01, batch_size=4)
    t = _transport(lora_model, client_data)
    t.use_workers(2, threads=1)
    try:
        round_one = t.run_round(RoundPlan(1, params, local), list(client_data), CommStats())
        first = next(round_one)  # the consumer stops after one update (an aggregate that raised, say)
        round_one.close()
        assert first.client_id == next(iter(client_data))
        again = list(t.run_round(RoundPlan(2, params, local), list(client_data), CommStats()))
        assert [u.client_id for u in again] == list(client_data)
        assert all(u.metrics["steps"] > 0 for u in again)
    finally:
        t.close()


def test_a_dead_worker_is_named_and_the_pool_refuses_more_work(lora_model, client_data, monkeypatch):
    import os

    params = get_trainable(lora_model)
    local = LocalTrainConfig(epochs=1.0, max_steps=0, lr=0.01, batch_size=4)
    real = SimulationTransport.train_job

    def train_job(self, job, states):
        if job.clients == (next(iter(client_data)),):
            os._exit(9)  # (the kernel's OOM killer, in effect)
        return real(self, job, states)

    monkeypatch.setattr(SimulationTransport, "train_job", train_job)
    t = _transport(lora_model, client_data)
    t.use_workers(2, threads=1)
    try:
        with pytest.raises(RuntimeError, match=r"simulation worker \d died while training \(exit code 9"):
            list(t.run_round(RoundPlan(1, params, local), list(client_data), CommStats()))
        with pytest.raises(RuntimeError, match="died while training"):
            list(t.run_round(RoundPlan(2, params, local), list(client_data), CommStats()))
    finally:
        t.close()
