"""eval.metrics / eval.positive_label / eval.primary wired through a real (tiny) run, and their one-line errors."""

from __future__ import annotations

import json

import pytest
from builders import make_rows

from fedtune.config import ConfigError, Experiment
from fedtune.experiment import run_experiment
from fedtune.report import build_report


@pytest.fixture(scope="module")
def rare_csv(tmp_path_factory):
    """A binary file whose positive label ("money") is about 1 row in 8: an imbalanced task."""
    d = tmp_path_factory.mktemp("rare")
    for name, n, seed in (("train.csv", 420, 1), ("eval.csv", 140, 2)):
        rows = [(t, "money" if lab == "money" else "other") for i, (t, lab) in enumerate(make_rows(n, seed))
                if lab != "money" or i % 7 < 2]
        (d / name).write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    return d / "train.csv", d / "eval.csv"


def overrides(tiny_model_dir, rare_csv, out, *extra):
    train, evalf = rare_csv
    return [f'model.name="{tiny_model_dir}"', 'data.dataset="files"', f'data.train_file="{train}"',
            f'data.eval_file="{evalf}"', 'data.text_column="text"', 'data.label_column="label"',
            "data.max_length=16", "partition.num_clients=2", 'partition.method="iid"', "federation.rounds=2",
            "train.batch_size=16", "train.lr=0.02", "train.epochs=2", "model.lora.r=4", f'output_dir="{out}"',
            *extra]


def test_chosen_metrics_are_logged_and_agree_with_the_confusion_matrix(tiny_model_dir, rare_csv, tmp_path):
    exp = Experiment.from_overrides(overrides(
        tiny_model_dir, rare_csv, tmp_path / "run", 'eval.metrics=["f1", "precision", "recall", "macro_f1", "auroc"]',
        'eval.positive_label="money"', 'eval.primary="f1"', "eval.initial=true"))
    result = run_experiment(exp, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_f1" in r]
    assert [r["round"] for r in evals] == [0, 1, 2]
    assert all({"eval_accuracy", "eval_precision", "eval_recall", "eval_macro_f1", "eval_auroc"} <= r.keys()
               for r in evals)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_f1"] == max(r["eval_f1"] for r in evals)  # eval.primary is the headline
    final = summary["final_metrics"]
    report = summary["task_details"]["classes"]["eval"]
    assert report["labels"] == ["money", "other"]
    (tp, fn), (fp, tn) = report["confusion_matrix"]  # rows: true money, other; columns: predicted
    assert tp + fn == sum(1 for line in rare_csv[1].read_text().splitlines()[1:] if line.endswith(",money"))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn)
    assert final["precision"] == pytest.approx(precision)
    assert final["recall"] == pytest.approx(recall)
    assert final["f1"] == pytest.approx(2 * precision * recall / (precision + recall) if tp else 0.0)
    assert final["accuracy"] == pytest.approx((tp + tn) / (tp + fn + fp + tn))
    assert report["per_class"]["money"]["f1"] == pytest.approx(final["f1"])
    assert report["per_class"]["other"]["support"] == fp + tn
    assert 0.0 <= final["auroc"] <= 1.0
    assert result.final_metrics["f1"] == final["f1"]
    text = build_report([tmp_path / "run"]).read_text()  # the report shows the table and the matrix
    assert f"| money | {report['per_class']['money']['precision']:.4f} | {recall:.4f} |" in text
    assert (tmp_path / "run" / "confusion_eval.png").is_file()


@pytest.mark.parametrize(("extra", "message"), [
    (['eval.metrics=["f2"]'], "eval.metrics: unknown metric 'f2'; known: accuracy"),
    (['eval.metrics=["f1"]'], "eval.metrics: f1 (of one label) need eval.positive_label"),
    (['eval.metrics=["f1", "f1"]', 'eval.positive_label="money"'], "eval.metrics names a metric twice"),
])
def test_config_errors_name_the_field(tiny_model_dir, rare_csv, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Experiment.from_overrides(overrides(tiny_model_dir, rare_csv, tmp_path / "run", *extra))


@pytest.mark.parametrize(("extra", "message"), [
    (['eval.metrics=["f1"]', 'eval.positive_label="fraud"'],
     r"eval.positive_label = 'fraud' is not one of the task's labels: \['money', 'other'\]"),
    (['eval.primary="recall"'], "eval.primary = 'recall' is not a metric this run computes: accuracy"),
])
def test_task_errors_fail_before_training(tiny_model_dir, rare_csv, tmp_path, extra, message):
    exp = Experiment.from_overrides(overrides(tiny_model_dir, rare_csv, tmp_path / "run", *extra))
    with pytest.raises(ConfigError, match=message):
        run_experiment(exp, quiet=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_auroc_is_refused_on_three_labels_with_the_reason(tiny_experiment):
    with pytest.raises(ConfigError, match="'auroc' needs a binary task .* this task has 3 labels"):
        run_experiment(tiny_experiment('eval.metrics=["auroc"]'), quiet=True)


def test_other_task_kinds_say_which_metrics_they_report(tiny_experiment):
    with pytest.raises(ConfigError, match="a qa task reports its own \\(exact_match, f1\\)"):
        run_experiment(tiny_experiment('data.task="qa"', 'eval.primary="f1"'), quiet=True)
