"""Extractive QA through the whole loop: windows, span head, n-best decoding, EM/F1, partitions."""

from __future__ import annotations

import json

import pytest
from builders import squad_file
from conftest import shared_data_or_skip

from fedtune.config import ConfigError


@pytest.fixture
def qa_experiment(tiny_model_dir, tmp_path):
    from fedtune.config import Experiment

    squad_file(tmp_path / "train.json", 6, 40, 1)
    squad_file(tmp_path / "dev.json", 2, 30, 2)

    def make(*overrides: str) -> Experiment:
        return Experiment.from_overrides([
            f'model.name="{tiny_model_dir}"', 'data.task="qa"', f'data.train_file="{tmp_path / "train.json"}"',
            f'data.eval_file="{tmp_path / "dev.json"}"', "data.max_length=24", "data.doc_stride=4",
            'partition.method="group"', "partition.num_clients=2", "partition.min_examples=1",
            "federation.rounds=2", "train.epochs=4", "train.lr=0.01", "train.batch_size=16",
            'model.mode="full"', "eval.initial=true", f'output_dir="{tmp_path / "run"}"', *overrides,
        ])

    return make


def test_federated_qa_learns_spans_and_writes_predictions(qa_experiment):
    from fedtune.experiment import run_experiment

    result = run_experiment(qa_experiment(), quiet=True)
    first, last = result.history[0], result.history[-1]
    assert first["round"] == 0 and {"eval_exact_match", "eval_f1"} <= set(last)
    assert last["eval_f1"] > first["eval_f1"] + 30.0, (first["eval_f1"], last["eval_f1"])
    assert result.summary["task"] == "qa" and result.summary["headline_metric"] == "f1"
    preds = json.loads((result.output_dir / "predictions.json").read_text())
    assert len(preds) == 60 and all(isinstance(v, str) for v in preds.values())
    manifest = json.loads((result.output_dir / "partition" / "summary.json").read_text())
    assert manifest["method"] == "group"


def test_group_partition_keeps_articles_whole(qa_experiment, tiny_model_dir):
    from fedtune.models import load_tokenizer
    from fedtune.partition import partition_indices
    from fedtune.tasks.registry import build_task

    task = build_task(qa_experiment(), load_tokenizer(str(tiny_model_dir)))
    units = task.units
    shards = partition_indices(None, 2, "group", seed=0, num_rows=units.count, groups=units.groups, min_examples=1)
    titles = [{task.train_examples[i].title for i in s} for s in shards]
    assert not titles[0] & titles[1] and len(titles[0] | titles[1]) == 6
    # every window belongs to exactly one question, so the clients' windows split the training rows
    rows = [task.rows_of(s) for s in shards]
    assert sorted(rows[0] + rows[1]) == list(range(len(task.train)))


def test_stride_not_below_half_the_window_is_refused(qa_experiment, tiny_model_dir):
    from fedtune.models import load_tokenizer
    from fedtune.tasks.registry import build_task

    with pytest.raises(ConfigError, match="data.doc_stride = 12 must be below half of data.max_length"):
        build_task(qa_experiment("data.doc_stride=12"), load_tokenizer(str(tiny_model_dir)))


def test_local_squad_layout_builds_windows_with_stride(monkeypatch):
    root = shared_data_or_skip()
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(root))
    from fedtune.config import Experiment
    from fedtune.models import load_tokenizer
    from fedtune.tasks.registry import build_task, task_kind

    exp = Experiment.from_overrides(['data.dataset="squad"', "data.train_size=200", "data.eval_size=50",
                                     "data.max_length=128", "data.doc_stride=32"])
    assert task_kind(exp) == "qa"
    task = build_task(exp, load_tokenizer("embedded"))
    assert len(task.train_examples) == 200 and len(task.eval_examples) == 50
    assert len(task.train) > 200  # long contexts give several windows
    assert len(set(task.units.groups)) > 1  # articles
