"""The per-class part of ``fedtune report``: each run's final metrics, per-class table and confusion matrix.

Reads ``task_details.classes`` of ``summary.json`` (written by classification and generative
classification runs, see :mod:`fedtune.tasks.classification_metrics`) and turns every eval split into a
Markdown table of per-class precision, recall, F1 and support, and a confusion-matrix PNG.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def per_class_table(report: dict[str, Any]) -> str:
    """A Markdown table of one split's ``per_class`` entries (label, precision, recall, F1, support)."""
    lines = ["| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for label in report["labels"]:
        c = report["per_class"][str(label)]
        lines.append(f"| {label} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    return "\n".join(lines)


def plot_confusion(report: dict[str, Any], title: str, path: Path) -> Path:
    """Write the confusion matrix (rows: true labels, columns: predicted) with its counts as a PNG."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    matrix = np.asarray(report["confusion_matrix"], dtype=np.int64)
    labels = [str(x) for x in report["labels"]]
    n = len(labels)
    size = min(3.0 + 0.55 * n, 14.0)
    fig = Figure(figsize=(size + 1.2, size), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8, label="rows")
    ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title, fontsize=11)
    if n <= 30:
        high = matrix.max() if matrix.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if high and matrix[i, j] > high / 2 else "black")
    fig.savefig(path)
    return path


def class_sections(runs: list[Any], out: Path) -> list[str]:
    """Report lines for every run (a :class:`fedtune.report.RunData`) whose summary has per-class results.

    Each run gets its final metrics in one line, and per eval split the per-class table and a confusion-matrix
    plot written into ``out`` (``confusion_<split>.png``, prefixed by the run's name when there are several runs).
    """
    with_classes = [r for r in runs if (r.summary.get("task_details") or {}).get("classes")]
    lines: list[str] = []
    for run in with_classes:
        lines += [f"## Per-class results: {run.name}" if len(runs) > 1 else "## Per-class results", ""]
        final = {k: v for k, v in (run.summary.get("final_metrics") or {}).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if final:
            lines += ["Final metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()) + ".", ""]
        for split, report in run.summary["task_details"]["classes"].items():
            stem = f"confusion_{_safe(split)}" if len(runs) == 1 else f"confusion_{_safe(run.name)}_{_safe(split)}"
            png = plot_confusion(report, f"{run.name}: {split} (rows: true, columns: predicted)", out / f"{stem}.png")
            lines += [f"### {split}", "", per_class_table(report), "",
                      f"![confusion matrix, {split}]({os.path.relpath(png, out)})", ""]
    return lines
