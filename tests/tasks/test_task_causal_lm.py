"""Causal LM tasks through the loop on the tiny pretrained Llama (stories260K): instruction tuning
(perplexity falls, samples written) and generative classification (label by log-likelihood)."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, shared_data_or_skip

STORIES = REPO.parent / "shared" / "models" / "stories260K"


@pytest.fixture
def stories():
    if not (STORIES / "config.json").is_file():
        pytest.skip("stories260K not present")
    return STORIES


def _lm_experiment(stories, tmp_path, *overrides):
    from fedtune.config import Experiment

    return Experiment.from_overrides([
        f'model.name="{stories}"', 'data.dataset="code_alpaca"', "data.train_size=96", "data.eval_size=32",
        "data.max_length=96", "partition.num_clients=2", "partition.min_examples=1", "federation.rounds=2",
        "train.epochs=1", "train.lr=0.01", "train.batch_size=8", "eval.initial=true", "eval.samples=2",
        "eval.max_new_tokens=8", f'output_dir="{tmp_path / "run"}"', *overrides,
    ])


@pytest.mark.parametrize("mode", ["lora", "partial"])
def test_instruction_tuning_lowers_perplexity_and_writes_samples(stories, tmp_path, monkeypatch, mode):
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(shared_data_or_skip()))
    from fedtune.experiment import run_experiment

    result = run_experiment(_lm_experiment(stories, tmp_path, f'model.mode="{mode}"'), quiet=True)
    ppl = [r["eval_perplexity"] for r in result.history]
    assert len(ppl) == 3 and ppl[-1] < ppl[0] * 0.8, ppl
    assert result.summary["task"] == "causal_lm" and result.summary["higher_is_better"] is False
    assert result.summary["best_perplexity"] == min(ppl)
    samples = [json.loads(line) for line in (result.output_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["round"] for s in samples] == [0, 0, 1, 1, 2, 2]
    assert all(s["prompt"].startswith("### Instruction:") and isinstance(s["generation"], str) for s in samples)


def test_lora_targets_the_attention_projections(stories, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(shared_data_or_skip()))
    from fedtune.models import get_trainable, load_tokenizer
    from fedtune.tasks.causal_lm_task import CausalLMTask

    exp = _lm_experiment(stories, tmp_path)
    task = CausalLMTask(exp.data, exp.eval, load_tokenizer(str(stories)), exp.seed)
    names = list(get_trainable(task.build_model(exp.model, 0)))
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    assert len(task.eval_examples) == 32
    # rows whose prompt fills data.max_length = 96 keep no answer token and are left out (logged)
    assert 0 < len(task.train) <= 96 and all(any(t != -100 for t in row) for row in task.train.token_labels)


def test_generative_classification_learns_labels(stories, tmp_path, tiny_csv):
    from fedtune.config import Experiment
    from fedtune.experiment import run_experiment

    train, evalf = tiny_csv
    exp = Experiment.from_overrides([
        f'model.name="{stories}"', 'data.task="generative_classification"', 'data.dataset="files"',
        f'data.train_file="{train}"', f'data.eval_file="{evalf}"', 'data.text_column="text"',
        'data.label_column="label"', "data.max_length=48", "partition.num_clients=2", "federation.rounds=2",
        "train.epochs=3", "train.lr=0.003", "train.batch_size=16", 'model.mode="full"', "eval.initial=true",
        f'output_dir="{tmp_path / "run"}"',
    ])
    result = run_experiment(exp, quiet=True)
    first, last = result.history[0]["eval_accuracy"], result.history[-1]["eval_accuracy"]
    assert last > 0.9 and last > first + 0.3, (first, last)
    assert result.summary["task"] == "generative_classification"
