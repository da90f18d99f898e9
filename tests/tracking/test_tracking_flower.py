"""Tracking on a real Flower federation: the ServerApp's process logs the run (SuperLink + 2 SuperNodes)."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("flwr")
pytest.importorskip("tensorboard")

from flower_processes import LABELS, federation  # noqa: E402
from tracking_runs import tiny_tracked  # noqa: E402
from tracking_test_reader import session_status  # noqa: E402

from fedtune.experiment import run_experiment  # noqa: E402


@pytest.mark.slow
def test_tensorboard_and_mlflow_from_the_serverapp(tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    common = ["partition.num_clients=2", f"data.label_names={LABELS}", "eval.initial=false"]
    sim = run_experiment(tiny_tracked(tiny_model_dir, tiny_csv, tmp_path / "sim", *common), quiet=True)
    manifests = tmp_path / "manifests"
    shutil.copytree(sim.output_dir / "partition", manifests)
    out = tmp_path / "runs" / "flower"
    with federation(tmp_path / "flower") as fed:
        fed.start_superlink()
        for i in range(2):
            fed.start_supernode(f"node{i}", f'manifest="{manifests / f"client_{i:03d}.json"}"')
        exp = tiny_tracked(tiny_model_dir, tiny_csv, out, *common, 'tracking.backends=["tensorboard", "mlflow"]',
                           'runtime.mode="flower"', f'runtime.superlink="{fed.address}"', "runtime.insecure=true",
                           "runtime.connect_timeout=60", "runtime.round_timeout=60")
        try:
            result = run_experiment(exp, quiet=True)
        except Exception as exc:
            raise AssertionError(f"tracked run on Flower failed: {exc}\n{fed.tail()}") from exc
    assert [r["round"] for r in result.history] == [1, 2]
    assert session_status(out / "tensorboard") == "STATUS_SUCCESS"
    client = MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_accuracy")] == [1, 2]
    assert "model" in {a.path for a in client.list_artifacts(run.info.run_id)}
