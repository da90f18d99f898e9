"""Shared checks that two ways of getting a result agree.

Sequential vs batched multi-adapter training (``sequential`` / ``parallel`` and ``assert_same_updates`` /
``assert_same_states``), a RoundPlan and its wire round trip (``assert_same_plan``), and a straight run vs one
killed in round 3 and resumed (``kill_and_resume``, with ``Killed`` / ``kill_at`` / ``metric_lines`` /
``untimed``). Not a test module; importable from any test folder (``pythonpath = ["tests"]``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.checkpoint import read_checkpoint
from fedtune.cli import main
from fedtune.client import local_train
from fedtune.client_store import STORE_DIR, ClientStateStore
from fedtune.experiment import run_experiment
from fedtune.runtime.parallel import train_group
from fedtune.runtime.simulation import SimulationTransport, client_seed
from fedtune.strategies.scaffold import ControlVariate
from fedtune.types import RoundPlan

CPU = torch.device("cpu")

# ----------------------------------------------------------------------------- sequential vs batched training


def sequential(model, client_data, plan, states=None):
    states = states if states is not None else {}
    return {cid: local_train(model, d, plan, cid, pad_id=0, seed=client_seed(0, plan.round, cid), device=CPU,
                             state=states.setdefault(cid, {}))
            for cid, d in client_data.items()}


def parallel(model, client_data, plan, states=None):
    states = states if states is not None else {}
    ids = list(client_data)
    ups = train_group(model, [client_data[c] for c in ids], plan, ids, pad_id=0,
                      seeds=[client_seed(0, plan.round, c) for c in ids], group_seed=5, device=CPU,
                      states=[states.setdefault(c, {}) for c in ids])
    return {u.client_id: u for u in ups}


def assert_same_updates(a, b, atol=2e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for cid in a:
        ua, ub = a[cid], b[cid]
        assert ua.num_examples == ub.num_examples
        assert ua.metrics.keys() == ub.metrics.keys()
        assert ua.metrics["steps"] == ub.metrics["steps"]
        for k, v in ua.metrics.items():
            assert v == pytest.approx(ub.metrics[k], rel=1e-4, abs=1e-6), (cid, k)
        assert ua.delta.keys() == ub.delta.keys()
        for k in ua.delta:
            torch.testing.assert_close(ub.delta[k], ua.delta[k], atol=atol, rtol=rtol, msg=lambda m, cid=cid, k=k: f"{cid} {k}: {m}")
        assert ua.extras.keys() == ub.extras.keys()
        for name in ua.extras:
            for k in ua.extras[name]:
                torch.testing.assert_close(ub.extras[name][k], ua.extras[name][k], atol=atol, rtol=rtol)


def assert_same_states(a, b, purpose, names):
    """Every client's ``purpose`` state entry agrees between two trainers' state dicts."""
    assert a.keys() == b.keys()
    for cid in a:
        for k in names:
            torch.testing.assert_close(b[cid][purpose][k], a[cid][purpose][k], atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- a plan and its wire round trip


def assert_same_plan(back: RoundPlan, plan: RoundPlan) -> None:
    for f in dataclasses.fields(RoundPlan):
        got, want = getattr(back, f.name), getattr(plan, f.name)
        if isinstance(want, dict):
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), f.name
        elif isinstance(want, ControlVariate):
            assert all(torch.equal(got.c[k], want.c[k]) for k in want.c)
        else:
            assert got == want, f.name


# ----------------------------------------------------------------------------- a straight run vs killed + resumed


class Killed(Exception):
    """Stands in for the process being killed in the middle of a round."""


def kill_at(monkeypatch, rnd: int) -> None:
    original = SimulationTransport.run_round
    seen: dict[int, int] = {}  # updates per round, over calls (LoRA rules may call once per client)

    def run_round(self, plan, clients, stats):
        for update in original(self, plan, clients, stats):
            seen[plan.round] = seen.get(plan.round, 0) + 1
            if plan.round == rnd and seen[plan.round] == 2:
                raise Killed(f"killed during round {rnd}")
            yield update

    monkeypatch.setattr(SimulationTransport, "run_round", run_round)


def metric_lines(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "time" not in k} for r in records]


def all_state_tensors(out) -> dict:
    """Every tensor of the run's last checkpoint: global params, strategy buffers, client states."""
    ck = read_checkpoint(out)
    flat = {("params", k): v for k, v in ck.state.params.items()}
    flat.update({("buffer", b, k): v for b, td in ck.state.buffers.items() for k, v in td.items()})
    states = dict(ck.client_states)
    if ck.client_store:  # the states the checkpoint names in the run's client_states/ folder
        store = ClientStateStore(out / STORE_DIR)
        store.restore(ck.client_store)
        states.update(store.items())
    flat.update({("client", c, p, k): v for c, st in states.items() for p, td in st.items() for k, v in td.items()})
    return flat


def kill_and_resume(tiny_experiment, tmp_path, monkeypatch, sets):
    """Run ``sets`` (3 rounds) straight, and again killed in round 3 then resumed by ``fedtune run --resume``.

    Checks that the final models and every state tensor are equal; returns (straight result, killed
    folder, the straight run's state tensors).
    """
    straight = run_experiment(tiny_experiment(*sets, f'output_dir="{tmp_path / "straight"}"'), quiet=True)

    killed_dir = tmp_path / "killed"
    with monkeypatch.context() as m:
        kill_at(m, 3)
        with pytest.raises(Killed):
            run_experiment(tiny_experiment(*sets, f'output_dir="{killed_dir}"'), quiet=True)
    assert read_checkpoint(killed_dir).round == 2
    assert [r["round"] for r in metric_lines(killed_dir)] == [1, 2]
    with (killed_dir / "metrics.jsonl").open("a") as fh:  # as if the kill came after round 3 was logged
        fh.write(json.dumps({"round": 3, "train_loss": 123.0}) + "\n")

    assert main(["run", "--resume", str(killed_dir), "--quiet"]) == 0

    a = load_file(straight.output_dir / "model" / "adapter_model.safetensors")
    b = load_file(killed_dir / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = all_state_tensors(straight.output_dir), all_state_tensors(killed_dir)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    resumed = metric_lines(killed_dir)
    assert [r["round"] for r in resumed] == [1, 2, 3]  # continued, not restarted; the stray line is gone
    assert untimed(resumed) == untimed(metric_lines(straight.output_dir))
    summary = json.loads((killed_dir / "summary.json").read_text())
    assert summary["final_metrics"] == straight.final_metrics
    return straight, killed_dir, sa
