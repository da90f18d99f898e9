"""The one round loop (fedtune.server.loop.run_rounds) with a fake transport and a fake strategy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest
import torch

from fedtune.payload import CommStats
from fedtune.server.loop import clients_per_round, run_rounds, sample_clients
from fedtune.types import ClientUpdate, LocalTrainConfig, RoundPlan, ServerState

LOCAL = LocalTrainConfig(1.0, 0, 0.1, 4)


class CountingStrategy:
    """Adds the example-weighted mean delta; records what the loop handed it."""

    def __init__(self) -> None:
        self.configured: list[tuple[int, list[str]]] = []
        self.aggregated: list[list[str]] = []

    def init(self, params):
        return ServerState(0, {k: v.clone() for k, v in params.items()})

    def configure(self, rnd: int, state: ServerState, clients: Sequence[str]) -> RoundPlan:
        self.configured.append((rnd, list(clients)))
        return RoundPlan(rnd, state.params, LOCAL)

    def aggregate(self, rnd: int, state: ServerState, updates: Iterable[ClientUpdate]):
        seen, total, acc = [], 0, None
        for u in updates:
            seen.append(u.client_id)
            total += u.num_examples
            part = {k: v * u.num_examples for k, v in u.delta.items()}
            acc = part if acc is None else {k: acc[k] + part[k] for k in acc}
        self.aggregated.append(seen)
        params = {k: state.params[k] + acc[k] / total for k in acc}
        return ServerState(rnd, params), {"seen": float(len(seen))}


class FakeTransport:
    """Every client sends delta = its index + 1 (one bad client sends NaN); counts fixed bytes."""

    def __init__(self, bad: str | None = None) -> None:
        self.bad = bad
        self.plans: list[RoundPlan] = []

    def run_round(self, plan: RoundPlan, clients: Sequence[str], stats: CommStats):
        self.plans.append(plan)
        for cid in clients:
            stats.bytes_down += 10
            stats.bytes_up += 7
            value = float("nan") if cid == self.bad else float(int(cid[1:]) + 1)
            yield ClientUpdate(cid, {"w": torch.full((2,), value)}, num_examples=2,
                               metrics={"train_loss": value, "steps": 1.0})


CLIENTS = ["c0", "c1", "c2", "c3"]


def test_the_loop_samples_configures_aggregates_evaluates_and_records():
    strategy, transport = CountingStrategy(), FakeTransport()
    evaluated, called = [], []
    state, history = run_rounds(
        strategy, transport, CLIENTS, strategy.init({"w": torch.zeros(2)}), rounds=3, per_round=2, seed=1,
        evaluate=lambda s: evaluated.append(s.round) or {"score": float(s.params["w"][0])}, eval_every=2,
        callbacks=[lambda s, r: called.append(r["round"])], eval_initial=True,
    )
    assert [r["round"] for r in history] == [0, 1, 2, 3] and called == [0, 1, 2, 3]
    assert evaluated == [0, 2, 3]  # the start, every 2nd round and the last
    for rnd, sampled in strategy.configured:
        assert sampled == sample_clients(CLIENTS, rnd, 2, 1) and len(sampled) == 2
    assert strategy.aggregated == [c for _, c in strategy.configured]  # every sampled update, in order
    expected = sum(sum(int(c[1:]) + 1 for c in sampled) / 2 for _, sampled in strategy.configured)
    assert float(state.params["w"][0]) == pytest.approx(expected)
    r1 = history[1]
    assert r1["clients"] == r1["clients_aggregated"] == 2 and r1["bytes_down"] == 20 and r1["bytes_up"] == 14
    assert r1["train_loss"] == pytest.approx(sum(int(c[1:]) + 1 for c in strategy.configured[0][1]) / 2)
    assert r1["seen"] == 2.0 and "eval_score" not in r1 and history[2]["eval_score"] == float(
        transport.plans[2].params["w"][0])  # evaluated on the state after round 2 = the plan of round 3
    assert all(history[i]["wall_time"] <= history[i + 1]["wall_time"] for i in range(3))


def test_a_bad_update_is_rejected_by_name_and_the_round_goes_on():
    strategy, transport = CountingStrategy(), FakeTransport(bad="c1")
    _, history = run_rounds(strategy, transport, CLIENTS, strategy.init({"w": torch.zeros(2)}), rounds=1,
                            per_round=4, seed=0)
    assert strategy.aggregated == [["c0", "c2", "c3"]]
    assert history[0]["clients_aggregated"] == 3
    assert history[0]["rejected"] == [{"client": "c1", "reason": "tensor w contains NaN or Inf"}]


def test_resumed_loop_starts_after_the_state_round_and_continues_the_clock():
    strategy, transport = CountingStrategy(), FakeTransport()
    start = ServerState(2, {"w": torch.zeros(2)})
    _, history = run_rounds(strategy, transport, CLIENTS, start, rounds=4, per_round=1, seed=0,
                            wall_time_offset=100.0)
    assert [r["round"] for r in history] == [3, 4] and history[0]["wall_time"] >= 100.0


def test_clients_per_round():
    assert clients_per_round(10, 3, 0.5) == 3 and clients_per_round(10, 0, 0.25) == 2
    assert clients_per_round(2, 5, 1.0) == 2 and clients_per_round(10, 0, 0.01) == 1
