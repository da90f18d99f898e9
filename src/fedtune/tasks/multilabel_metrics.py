"""Multi-label classification metrics: micro/macro F1, subset accuracy, per-label F1, threshold tuning.

Predictions are per-label probabilities (sigmoid outputs); a label is predicted when its
probability is at least the threshold. Computed with scikit-learn (zero_division=0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np


class MultilabelScores(TypedDict):
    """What :func:`multilabel_scores` returns (a plain dict at run time)."""

    micro_f1: float
    macro_f1: float
    subset_accuracy: float
    per_label_f1: list[float]


def _check(probs: np.ndarray, targets: np.ndarray) -> None:
    if probs.ndim != 2 or probs.shape != targets.shape:
        raise ValueError(f"probabilities {probs.shape} and targets {targets.shape} must be the same (n, labels) shape")
    if probs.shape[0] == 0:
        raise ValueError("no examples to score")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("multi-label targets must be 0/1")


def multilabel_scores(probs, targets, threshold: float = 0.5) -> MultilabelScores:
    """micro_f1, macro_f1, subset_accuracy (all labels right) and per_label_f1 at ``threshold``."""
    probs, targets = np.asarray(probs, dtype=float), np.asarray(targets).astype(int)
    _check(probs, targets)
    from sklearn.metrics import f1_score  # (imported here: a node that only trains never pays for scikit-learn)

    preds = (probs >= threshold).astype(int)
    return {
        "micro_f1": float(f1_score(targets, preds, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(targets, preds, average="macro", zero_division=0)),
        "subset_accuracy": float((preds == targets).all(axis=1).mean()),
        "per_label_f1": [float(x) for x in f1_score(targets, preds, average=None, zero_division=0)],
    }


def tune_threshold(probs, targets, grid: Sequence[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))) -> float:
    """The threshold in ``grid`` with the best micro F1 (the first such on ties)."""
    probs, targets = np.asarray(probs, dtype=float), np.asarray(targets).astype(int)
    _check(probs, targets)
    from sklearn.metrics import f1_score

    scores = [f1_score(targets, (probs >= t).astype(int), average="micro", zero_division=0) for t in grid]
    return float(grid[int(np.argmax(scores))])
