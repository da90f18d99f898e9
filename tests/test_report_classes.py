"""The per-class section of fedtune report: table, confusion-matrix plot, final metrics line."""

from __future__ import annotations

import json

from fedtune.report import build_report

CLASSES = {"eval": {"labels": ["fraud", "ok"],
                    "per_class": {"fraud": {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "support": 8},
                                  "ok": {"precision": 0.9, "recall": 0.96, "f1": 0.929, "support": 50}},
                    "confusion_matrix": [[2, 6], [2, 48]]}}


def write_run(folder, name, classes):
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(f'name = "{name}"\n')
    summary = {"headline_metric": "f1", "final_metrics": {"accuracy": 50 / 58, "f1": 1 / 3}, "best_f1": 0.4,
               "rounds": 1, "task_details": {"classes": classes} if classes else {}}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "metrics.jsonl").write_text(json.dumps({"round": 1, "eval_f1": 1 / 3}) + "\n")


def test_per_class_table_and_confusion_plot(tmp_path):
    write_run(tmp_path / "run", "rare", CLASSES)
    text = build_report([tmp_path / "run"]).read_text()
    assert "## Per-class results" in text
    assert "Final metrics: accuracy 0.8621, f1 0.3333." in text
    assert "| fraud | 0.5000 | 0.2500 | 0.3333 | 8 |" in text and "| ok | 0.9000 | 0.9600 | 0.9290 | 50 |" in text
    assert "![confusion matrix, eval](confusion_eval.png)" in text
    from PIL import Image

    with Image.open(tmp_path / "run" / "confusion_eval.png") as image:
        assert image.size[0] > 300 and image.size[1] > 300


def test_several_runs_get_their_own_plots_and_runs_without_classes_none(tmp_path):
    write_run(tmp_path / "a", "a", CLASSES)
    write_run(tmp_path / "b", "b", CLASSES)
    write_run(tmp_path / "c", "c", None)
    text = build_report([tmp_path]).read_text()
    assert text.count("## Per-class results") == 2
    assert (tmp_path / "confusion_a_eval.png").is_file() and (tmp_path / "confusion_b_eval.png").is_file()
    assert not list(tmp_path.glob("confusion_c*"))
