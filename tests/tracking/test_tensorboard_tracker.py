"""TensorBoard: a tiny run's event file read back with TensorBoard's own reader (EventAccumulator)."""

from __future__ import annotations

import json

import pytest
from tracking_runs import numeric_keys, tiny_tracked

from fedtune.experiment import run_experiment

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2  # noqa: E402


def read_events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def hparams(events: EventAccumulator) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
            for tag, content in events.PluginTagToContent("hparams").items()}


def test_every_metric_per_round_hparams_and_plots(tiny_model_dir, tiny_csv, tmp_path):
    exp = tiny_tracked(tiny_model_dir, tiny_csv, tmp_path / "run", 'tracking.backends=["tensorboard"]')
    result = run_experiment(exp, quiet=True)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    events = read_events(result.output_dir / "tensorboard")  # (the default folder)

    tags = set(events.Tags()["scalars"])
    assert numeric_keys(records) == tags and {"eval_accuracy", "train_loss", "bytes_up"} <= tags
    for key in tags:
        expected = [(r["round"], float(r[key])) for r in records if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected], key
    assert [e.step for e in events.Scalars("eval_accuracy")] == [0, 1, 2]  # (eval.initial: round 0)

    data = hparams(events)
    start = data["_hparams_/session_start_info"].session_start_info
    assert start.hparams["train.lr"].number_value == pytest.approx(0.02)
    assert start.hparams["strategy.name"].string_value == "fedavg"
    assert start.hparams["eval.initial"].bool_value is True
    experiment = data["_hparams_/experiment"].experiment
    assert "train.lr" in {h.name for h in experiment.hparam_infos}
    assert {m.name.tag for m in experiment.metric_infos} == tags
    assert data["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS

    images = set(events.Tags()["images"])
    assert {"plots/metric", "plots/loss"} <= images  # the final plots (fedtune report's, in <run>/plots)
    assert events.Images("plots/metric")[0].width > 100
    assert "[train]" in events.Tensors("config")[0].tensor_proto.string_val[0].decode()  # the config as text
    assert (result.output_dir / "summary.json").is_file()


def test_sweep_runs_are_separate_runs_in_one_folder(tiny_model_dir, tiny_csv, tmp_path):
    from fedtune import sweep as sw

    base = tiny_tracked(tiny_model_dir, tiny_csv, tmp_path / "unused", 'tracking.backends=["tensorboard"]',
                        "federation.rounds=1", "eval.initial=false")
    (tmp_path / "base.toml").write_text(base.to_toml())
    path = tmp_path / "study.toml"
    path.write_text(f'base = "base.toml"\noutput_dir = "{tmp_path / "study"}"\n'
                    '[grid]\n"strategy.name" = ["fedavg", "fedprox"]\n')
    runs = sw.plan(sw.load_sweep(path))
    assert [(r.experiment.tracking.experiment, r.experiment.tracking.group, r.experiment.tracking.run_name)
            for r in runs] == [("study", "study", "fedavg"), ("study", "study", "fedprox")]
    records = sw.run_sweep(sw.load_sweep(path), quiet=True)
    assert [r["status"] for r in records] == ["finished", "finished"]
    folder = tmp_path / "study" / "tensorboard"
    assert sorted(p.name for p in folder.iterdir()) == ["fedavg", "fedprox"]
    for name in ("fedavg", "fedprox"):
        events = read_events(folder / name)
        assert [e.step for e in events.Scalars("eval_accuracy")] == [1]
        start = hparams(events)["_hparams_/session_start_info"].session_start_info
        assert start.group_name == "study" and start.hparams["strategy.name"].string_value == name


def test_sweep_without_tracking_leaves_the_config_alone(tiny_model_dir, tiny_csv, tmp_path):
    from fedtune import sweep as sw

    base = tiny_tracked(tiny_model_dir, tiny_csv, tmp_path / "unused")
    (tmp_path / "base.toml").write_text(base.to_toml())
    path = tmp_path / "study.toml"
    path.write_text(f'base = "base.toml"\noutput_dir = "{tmp_path / "study"}"\n[grid]\n"train.lr" = [0.01]\n')
    (run,) = sw.plan(sw.load_sweep(path))
    assert run.experiment.tracking == base.tracking  # (finished sweeps made before [tracking] still match)


def test_local_baseline_logs_each_client(tiny_model_dir, tiny_csv, tmp_path):
    exp = tiny_tracked(tiny_model_dir, tiny_csv, tmp_path / "run", 'tracking.backends=["tensorboard"]',
                       'mode="local"', "federation.rounds=1", "eval.initial=false")
    result = run_experiment(exp, quiet=True)
    events = read_events(result.output_dir / "tensorboard")
    tags = set(events.Tags()["scalars"])
    clients = {r["client"] for r in result.history}
    assert {f"{c}/eval_accuracy" for c in clients} <= tags and len(clients) == 3
    assert hparams(events)["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS
