"""Parity: the same tiny experiment through the in-process simulation and through real Flower processes.

A SuperLink and two SuperNodes run on localhost (insecure, free ports); each SuperNode reads its own
shard (the simulation's manifest). ``fedtune run``'s Flower path submits the app (``flwr run``);
the final global adapters must equal the simulation's within 1e-6.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from safetensors.torch import load_file  # noqa: E402

from fedtune.experiment import run_experiment  # noqa: E402

from flower_processes import federation  # noqa: E402

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


def test_flower_deployment_matches_simulation(common, tmp_path):
    """FedAvg and FedProx: real SuperLink + 2 SuperNodes give the simulation's global model (1e-6)."""
    sims = {name: run_experiment(common(tmp_path / f"sim-{name}", *opts), quiet=True)
            for name, opts in STRATEGIES.items()}
    manifests = tmp_path / "manifests"
    shutil.copytree(sims["fedavg"].output_dir / "partition", manifests)

    work = tmp_path / "flower"
    work.mkdir()
    with federation(work) as fed:
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
