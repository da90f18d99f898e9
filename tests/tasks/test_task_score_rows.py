"""Task.score_rows for every task kind: a client's own rows scored exactly as the server scores its eval split.

Each case trains one client whose training file is also the evaluation file, with
``eval.per_client = true``: the client then scores the very rows the server evaluates, so the
per-client score must equal the server's headline metric exactly, after a round that moved it.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from fedtune.config import Experiment
from fedtune.experiment import run_experiment

STORIES = REPO.parent / "shared" / "models" / "stories260K"


def _one_client(tmp_path, *options: str):
    exp = Experiment.from_overrides([*options, "partition.num_clients=1", "partition.min_examples=1",
                                     "federation.rounds=1", "eval.per_client=true", "eval.initial=true",
                                     'model.mode="full"', "train.batch_size=16", f'output_dir="{tmp_path / "run"}"'])
    result = run_experiment(exp, quiet=True)
    headline = result.summary["headline_metric"]
    first, last = result.history[0], result.history[-1]
    assert last[f"eval_{headline}"] != first[f"eval_{headline}"]  # training moved the score: not a constant
    return headline, last


def test_qa_scores_a_clients_questions_with_the_official_f1(tiny_model_dir, tmp_path):
    from builders import squad_file

    squad_file(tmp_path / "train.json", 3, 20, 1)
    headline, last = _one_client(
        tmp_path, f'model.name="{tiny_model_dir}"', 'data.task="qa"', f'data.train_file="{tmp_path / "train.json"}"',
        f'data.eval_file="{tmp_path / "train.json"}"', "data.max_length=24", "data.doc_stride=4", "train.epochs=4",
        "train.lr=0.01")
    assert headline == "f1" and last["eval_f1"] > 20
    assert last["eval_client_f1_mean"] == pytest.approx(last["eval_f1"], abs=1e-9)


def test_multilabel_scores_micro_f1_at_the_configured_threshold(tiny_model_dir, tmp_path):
    from builders import multilabel_rows

    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in multilabel_rows(120, 1)) + "\n")
    headline, last = _one_client(
        tmp_path, f'model.name="{tiny_model_dir}"', 'data.task="multilabel"',
        f'data.train_file="{tmp_path / "train.jsonl"}"', f'data.eval_file="{tmp_path / "train.jsonl"}"',
        "data.max_length=16", "train.epochs=5", "train.lr=0.003")
    assert headline == "micro_f1" and 0 < last["eval_micro_f1"] <= 1
    assert last["eval_client_micro_f1_mean"] == pytest.approx(last["eval_micro_f1"], abs=1e-9)


def test_generative_classification_scores_by_label_likelihood(tmp_path):
    from builders import make_rows

    if not (STORIES / "config.json").is_file():
        pytest.skip("stories260K not present")
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "\n".join(f"{t},{lab}" for t, lab in make_rows(60, 1)) + "\n")
    headline, last = _one_client(
        tmp_path, f'model.name="{STORIES}"', 'data.task="generative_classification"', 'data.dataset="files"',
        f'data.train_file="{train}"', f'data.eval_file="{train}"', 'data.text_column="text"',
        'data.label_column="label"', "data.max_length=48", "train.epochs=2", "train.lr=0.003")
    assert headline == "accuracy" and 0 < last["eval_accuracy"] <= 1
    assert last["eval_client_accuracy_mean"] == pytest.approx(last["eval_accuracy"], abs=1e-9)
