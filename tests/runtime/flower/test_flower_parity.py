"""Parity: the same tiny experiment through the in-process simulation and through real Flower processes.

A SuperLink and two SuperNodes run on localhost (insecure, free ports); each SuperNode reads its own
shard (the simulation's manifest). ``fedtune run``'s Flower path submits the app (``flwr run``);
the final global adapters must equal the simulation's within 1e-6. FedAdam (server optimizer
state) runs one round on Flower, then a second Flower run resumes it from its checkpoint: the
result equals two uninterrupted rounds of the simulation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flower_processes import federation  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedtune.checkpoint import resume_experiment  # noqa: E402
from fedtune.config import ConfigError  # noqa: E402
from fedtune.experiment import run_experiment  # noqa: E402

LABELS = '["money","sports","tech"]'
STRATEGIES = {"fedavg": ["strategy.name=\"fedavg\""], "fedprox": ["strategy.name=\"fedprox\"", "strategy.mu=0.1"]}


def _adapter(out: Path) -> dict:
    return load_file(out / "model" / "adapter_model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture
def common(tiny_experiment):
    def make(out: Path, *extra: str):
        return tiny_experiment(
            "partition.num_clients=2", "federation.rounds=2", "train.epochs=2", f"data.label_names={LABELS}",
            f'output_dir="{out}"', *extra,
        )

    return make


def _check_node_timing(path) -> None:
    """Every reply's phases were written: the nodes' identification and each round's training, each message
    in a fresh ClientApp process (its own imports), all of it inside the server's round trip."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["kind"], r["round"]) for r in records) == [("identify", 0)] * 2 + [("train", 1)] * 2 + \
        [("train", 2)] * 2, records
    for r in records:
        assert r["phases"]["imports"] > 0 and r["phases"]["model"] > 0, r
        assert sum(r["phases"].values()) <= r["round_trip"] + 0.5, r
        if r["kind"] == "train":
            assert r["phases"]["train"] > 0, r


def test_flower_deployment_matches_simulation(common, tmp_path):
    """FedAvg, FedProx and resumed FedAdam: real SuperLink + 2 SuperNodes give the simulation's model (1e-6)."""
    sims = {name: run_experiment(common(tmp_path / f"sim-{name}", *opts), quiet=True)
            for name, opts in {**STRATEGIES, "fedadam": ['strategy.name="fedadam"']}.items()}
    manifests = tmp_path / "manifests"
    shutil.copytree(sims["fedavg"].output_dir / "partition", manifests)
    with federation(tmp_path / "flower") as fed:
        fed.start_superlink()
        for i in range(2):
            fed.start_supernode(f"node{i}", f'manifest="{manifests / f"client_{i:03d}.json"}"')
        for name, opts in STRATEGIES.items():
            exp = common(tmp_path / f"flower-{name}", *opts, 'runtime.mode="flower"',
                         f'runtime.superlink="{fed.address}"', "runtime.insecure=true",
                         "runtime.connect_timeout=60", "runtime.round_timeout=60")
            try:
                result = run_experiment(exp, quiet=True)
            except Exception as exc:
                raise AssertionError(f"{name} on Flower failed: {exc}\n{fed.tail()}") from exc
            assert len(result.history) == 2, fed.tail()
            assert [r["clients"] for r in result.history] == [2, 2]
            assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in result.history)
            diff = _max_diff(_adapter(sims[name].output_dir), _adapter(result.output_dir))
            assert diff <= 1e-6, f"{name}: max |flower - simulation| = {diff:.3e}"
            sim_acc = sims[name].final_metrics["accuracy"]
            assert result.final_metrics["accuracy"] == pytest.approx(sim_acc, abs=1e-9)
            _check_node_timing(result.output_dir / "node_timing.jsonl")

        # FedAdam, interrupted after round 1 and resumed by a new Flower run from the checkpoint.
        out = tmp_path / "flower-fedadam"
        flower = ['strategy.name="fedadam"', 'runtime.mode="flower"', f'runtime.superlink="{fed.address}"',
                  "runtime.insecure=true", "runtime.connect_timeout=60", "runtime.round_timeout=60"]
        first = run_experiment(common(out, *flower, "federation.rounds=1"), quiet=True)
        assert len(first.history) == 1, fed.tail()
        resumed = run_experiment(resume_experiment(out, overrides=["federation.rounds=2"]), quiet=True, resume=True)
        assert [r["round"] for r in resumed.history] == [1, 2], fed.tail()
        # Round 1 was not trained again: its record (timings included) is the first run's, kept.
        assert resumed.history[0] == first.history[0]
        diff = _max_diff(_adapter(sims["fedadam"].output_dir), _adapter(out))
        assert diff <= 1e-6, f"resumed fedadam: max |flower - simulation| = {diff:.3e}"


def test_flower_resume_refuses_client_state_on_nodes(common, tmp_path):
    """SCAFFOLD's c_i and error-feedback residuals live on the nodes: a Flower resume is refused up front."""
    from fedtune.checkpoint import checkpoint_to_resume

    for extra, named in ((['strategy.name="scaffold"'], "scaffold"),
                         (['federation.codec_up="int8"'], "codec_up")):
        exp = common(tmp_path / "x", *extra, 'runtime.mode="flower"')
        with pytest.raises(ConfigError, match=f"cannot resume on Flower.*{named}"):
            checkpoint_to_resume(exp)
