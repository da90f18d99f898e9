"""End to end on the tiny model: outputs, reproducibility, baselines, manifests, errors."""

import json

import pytest
import torch

from fedtune.experiment import run_experiment


def test_federated_run_writes_outputs_and_learns(tiny_experiment):
    exp = tiny_experiment("federation.rounds=3", "eval.every=1")
    res = run_experiment(exp, quiet=True)
    out = res.output_dir
    assert (out / "config.toml").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert r["clients"] == 3 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["train_loss"] > 0 and "eval_accuracy" in r and r["wall_time"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_metrics"]["accuracy"] == res.final_metrics["accuracy"]
    assert len(list((out / "partition").glob("client_*.json"))) == 3
    # The tiny keyword task is learnable: well above chance (1/3).
    assert res.final_metrics["accuracy"] > 0.6
    assert (out / "model" / "adapter_config.json").is_file()  # (its predictions: the next test)


def test_saved_adapter_reloads_with_peft(tiny_experiment, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    res = run_experiment(tiny_experiment("federation.rounds=1"), quiet=True)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    model = PeftModel.from_pretrained(base, res.output_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(res.output_dir / "model")
    from fedtune.tasks.data import load_task_data

    data = load_task_data(tiny_experiment().data)
    ev = data.evals[next(iter(data.evals))]
    enc = tok(ev.texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        preds = model(**enc).logits.argmax(-1)
    acc = float((preds == torch.tensor(ev.labels)).float().mean())
    assert abs(acc - res.final_metrics["accuracy"]) < 1e-6


def test_same_config_and_seed_same_metrics(tiny_experiment, tmp_path):
    a = run_experiment(tiny_experiment(f'output_dir="{tmp_path / "a"}"'), quiet=True)
    b = run_experiment(tiny_experiment(f'output_dir="{tmp_path / "b"}"'), quiet=True)
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    c = run_experiment(tiny_experiment(f'output_dir="{tmp_path / "c"}"', "seed=1"), quiet=True)
    assert strip(c.history) != strip(a.history)


def test_client_sampling_fraction(tiny_experiment):
    res = run_experiment(tiny_experiment("partition.num_clients=4", "federation.fraction=0.5"), quiet=True)
    assert all(r["clients"] == 2 for r in res.history)


@pytest.mark.parametrize("mode", ["full", "partial"])
def test_full_and_partial_modes(tiny_experiment, mode):
    res = run_experiment(tiny_experiment(f"model.mode={mode}", "model.last_layers=1", "train.lr=0.001"), quiet=True)
    assert (res.output_dir / "model" / "config.json").is_file()
    assert res.history[0]["bytes_up"] > 0


def test_centralized_baseline(tiny_experiment):
    res = run_experiment(tiny_experiment("mode=centralized"), quiet=True)
    assert all(r["clients"] == 1 for r in res.history)
    assert res.summary["train_rows"] == 240


def test_local_baseline_scores_each_client(tiny_experiment):
    res = run_experiment(tiny_experiment("mode=local"), quiet=True)
    assert set(res.summary["per_client"]) == {"client_000", "client_001", "client_002"}
    f = res.final_metrics
    assert f["accuracy_min"] <= f["accuracy_mean"] <= f["accuracy_max"]
    lines = (res.output_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2 and all('"client"' in x for x in lines)


def test_manifest_dir_reused(tiny_experiment, tmp_path):
    first = run_experiment(tiny_experiment("federation.rounds=1", "partition.method=dirichlet",
                                           "partition.alpha=0.5"), quiet=True)
    again = run_experiment(tiny_experiment("federation.rounds=1", f'output_dir="{tmp_path / "again"}"',
                                           f'partition.manifest_dir="{first.output_dir / "partition"}"'), quiet=True)
    for name in ("client_000.json", "client_001.json", "client_002.json"):
        a = json.loads((first.output_dir / "partition" / name).read_text())["indices"]
        b = json.loads((again.output_dir / "partition" / name).read_text())["indices"]
        assert a == b


def test_fedprox_runs_and_differs_from_fedavg(tiny_experiment, tmp_path):
    avg = run_experiment(tiny_experiment(f'output_dir="{tmp_path / "avg"}"'), quiet=True)
    prox = run_experiment(tiny_experiment(f'output_dir="{tmp_path / "prox"}"', "strategy.name=fedprox",
                                          "strategy.mu=1.0"), quiet=True)
    assert avg.history[-1]["train_loss"] != prox.history[-1]["train_loss"]
    from safetensors.torch import load_file

    a, p = (load_file(r.output_dir / "model" / "adapter_model.safetensors") for r in (avg, prox))
    gap = sum(float((a[k] - p[k]).pow(2).sum()) for k in a) ** 0.5
    size = sum(float(a[k].pow(2).sum()) for k in a) ** 0.5
    assert gap > 0.01 * size, (gap, size)  # the proximal term changed the global model, not float noise


def test_missing_data_file_is_named(tiny_experiment, tmp_path):
    from fedtune.tasks.data import DataError

    with pytest.raises(DataError, match="nope.csv"):
        run_experiment(tiny_experiment(f'data.train_file="{tmp_path / "nope.csv"}"'), quiet=True)


def test_impossible_partition_is_explained(tiny_experiment):
    from fedtune.partition import PartitionError

    with pytest.raises(PartitionError, match="100"):
        run_experiment(tiny_experiment("partition.num_clients=100", "partition.min_examples=10"), quiet=True)


def test_per_client_evaluation(tiny_experiment):
    res = run_experiment(tiny_experiment("federation.rounds=1", "eval.per_client=true"), quiet=True)
    m = res.final_metrics
    assert 0.0 <= m["client_accuracy_min"] <= m["client_accuracy_mean"] <= 1.0


def test_cosine_learning_rate_is_recorded_per_round(tiny_experiment):
    res = run_experiment(tiny_experiment("federation.rounds=3", "train.epochs=1", "train.lr_schedule=\"cosine\"",
                                         "train.lr_min=0.002"), quiet=True)
    assert [r["lr"] for r in res.history] == pytest.approx([0.02, 0.011, 0.002])


def test_communication_budget_warns_or_stops_cleanly(tiny_experiment, tmp_path, caplog):
    one = run_experiment(tiny_experiment("federation.rounds=1", f'output_dir="{tmp_path / "one"}"'), quiet=True)
    per_round = one.history[0]["bytes_down"] + one.history[0]["bytes_up"]
    budget = int(1.5 * per_round)  # passed in round 2
    stopped = run_experiment(tiny_experiment("federation.rounds=4", "eval.every=3", f"federation.comm_budget_bytes={budget}",
                                             'federation.budget_action="stop"', f'output_dir="{tmp_path / "stop"}"'),
                             quiet=True)
    assert [r["round"] for r in stopped.history] == [1, 2]
    assert stopped.history[-1]["stopped"].startswith(f"communication budget federation.comm_budget_bytes = {budget:,} "
                                                     "passed in round 2")
    assert "eval_accuracy" in stopped.history[-1]  # the last round is evaluated although eval.every = 3
    assert json.loads((stopped.output_dir / "summary.json").read_text())["stopped"] == stopped.history[-1]["stopped"]
    assert (stopped.output_dir / "model" / "adapter_model.safetensors").is_file()
    with caplog.at_level("WARNING", logger="fedtune.budget"):
        warned = run_experiment(tiny_experiment("federation.rounds=3", f"federation.comm_budget_bytes={budget}",
                                                f'output_dir="{tmp_path / "warn"}"'), quiet=True)
    assert [r["round"] for r in warned.history] == [1, 2, 3] and "stopped" not in warned.history[-1]
    assert [r.getMessage() for r in caplog.records if r.name == "fedtune.budget"] == [
        f"communication budget federation.comm_budget_bytes = {budget:,} passed in round 2 "
        f"({warned.history[0]['bytes_down'] + warned.history[0]['bytes_up'] + warned.history[1]['bytes_down'] + warned.history[1]['bytes_up']:,} "
        "bytes moved both ways); the run goes on (federation.budget_action = 'warn')"]
