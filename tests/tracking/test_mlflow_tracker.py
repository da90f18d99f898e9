"""MLflow: a tiny run logged to a real ``mlflow server`` (SQLite backend) on localhost, read back with MlflowClient."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from tracking_runs import numeric_keys, tiny_tracked

from fedtune.experiment import run_experiment
from fedtune.runtime.flower.site import free_port

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite store and a local artifact folder; its URL."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # (no GenAI job runners: a faster start)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # (the server and its uvicorn worker: this test's own processes)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_params_metric_history_and_artifacts_on_a_server(mlflow_server, tiny_model_dir, tiny_csv, tmp_path):
    exp = tiny_tracked(tiny_model_dir, tiny_csv, tmp_path / "run", 'tracking.backends=["mlflow"]',
                       f'tracking.mlflow_uri="{mlflow_server}"', 'tracking.experiment="tiny-study"',
                       'tracking.group="g"')
    result = run_experiment(exp, quiet=True)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("tiny-study")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.tags["fedtune.group"] == "g"
    params = run.data.params
    assert params["train.lr"] == "0.02" and params["strategy.name"] == "fedavg"
    assert params["tracking.backends"] == '["mlflow"]'  # (lists as JSON text)
    assert numeric_keys(records) == set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "eval_accuracy")
    assert sorted((m.step, m.value) for m in history) == [
        (r["round"], pytest.approx(r["eval_accuracy"])) for r in records]
    assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)] \
        == [1, 2]  # (one point per round, step = round; round 0 has no training)

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "config.toml", "metrics.jsonl", "model", "plots"} <= top
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/adapter_model.safetensors", "model/fedtune.json"} <= model
    local = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(open(local).read())["final_metrics"] == result.summary["final_metrics"]


def test_default_store_is_sqlite_beside_the_run_folders(tmp_path, monkeypatch):
    from fedtune.config import Experiment
    from fedtune.tracking import open_trackers

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "runs" / "one"
    out.mkdir(parents=True)
    (out / "summary.json").write_text("{}\n")
    (out / "model").mkdir()
    exp = Experiment.from_overrides(['name="one"', 'tracking.backends=["mlflow"]', "tracking.log_model=false"])
    with open_trackers(exp, out) as trackers:  # (no federation needed: the store is what this test is about)
        trackers(None, {"round": 1, "eval_accuracy": 0.5, "stopped": "budget"})
        trackers.finish(out, log_model=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("one").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics == {"eval_accuracy": 0.5}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_accuracy")] == [1]
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())

    summary = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert open(summary).read() == "{}\n"
    assert "model" not in {a.path for a in client.list_artifacts(run.info.run_id)}  # (log_model = false)


def test_tracking_uri_config_then_environment_then_sqlite(tmp_path, monkeypatch):
    from fedtune.config import Experiment
    from fedtune.tracking.mlflow_tracker import artifact_location, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    exp = Experiment.from_overrides(['tracking.backends=["mlflow"]'])
    assert tracking_uri(exp, tmp_path / "runs" / "x") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert artifact_location(f"sqlite:///{tmp_path / 'mlflow.db'}") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None  # (the server decides)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert tracking_uri(exp, tmp_path) == "http://127.0.0.1:5001"
    configured = Experiment.from_overrides(['tracking.backends=["mlflow"]', 'tracking.mlflow_uri="sqlite:///a.db"'])
    assert tracking_uri(configured, tmp_path) == "sqlite:///a.db"
