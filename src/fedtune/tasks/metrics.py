"""Evaluation metrics, computed as the official GLUE metric does.

The GLUE metric of Hugging Face ``evaluate`` (``evaluate.load("glue", task)``) and the GLUE
leaderboard compute these with scikit-learn and SciPy; ``evaluate.load`` needs the hub, so the
same formulas are called here directly:

===================  ==========================================  =====================
metric               keys returned                               tasks
===================  ==========================================  =====================
``accuracy``         ``accuracy``                                SST-2, MNLI, QNLI, RTE,
                                                                 WNLI, AG News, files
``matthews``         ``matthews_correlation``                    CoLA
``f1_accuracy``      ``accuracy``, ``f1`` (binary, class 1)      MRPC, QQP
``pearson_spearman`` ``pearson``, ``spearman``                   STS-B, regression files
===================  ==========================================  =====================

(``evaluate``'s GLUE metric calls the Spearman key ``spearmanr``; here it is ``spearman``.)
Values are plain Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

METRICS: tuple[str, ...] = ("accuracy", "matthews", "f1_accuracy", "pearson_spearman")
"""The metric names a :class:`~fedtune.tasks.data.TaskData` may carry."""

_PRIMARY = {
    "accuracy": "accuracy",
    "matthews": "matthews_correlation",
    "f1_accuracy": "f1",
    "pearson_spearman": "pearson",
}


_KEYS = {
    "accuracy": ("accuracy",),
    "matthews": ("matthews_correlation",),
    "f1_accuracy": ("accuracy", "f1"),
    "pearson_spearman": ("pearson", "spearman"),
}


def metric_keys(metric: str) -> tuple[str, ...]:
    """The keys :func:`compute_metrics` returns for ``metric`` (e.g. ``("accuracy", "f1")`` for MRPC)."""
    _check_metric(metric)
    return _KEYS[metric]


def _check_metric(metric: str) -> None:
    if metric not in _PRIMARY:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(METRICS)}")


def primary_metric(metric: str) -> str:
    """The key of :func:`compute_metrics`'s result used as the headline / "best" value.

    ``accuracy`` -> ``"accuracy"``, ``matthews`` -> ``"matthews_correlation"``,
    ``f1_accuracy`` -> ``"f1"``, ``pearson_spearman`` -> ``"pearson"``. Higher is better for all.
    """
    _check_metric(metric)
    return _PRIMARY[metric]


def _as_1d(values: Any, what: str, *, regression: bool) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] == 1 and regression:
        arr = arr[:, 0]
    if arr.ndim != 1:
        hint = "" if regression else " (class ids; take the argmax of logits first)"
        raise ValueError(f"{what} must be one-dimensional{hint}, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty")
    if regression:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be numbers, got dtype {arr.dtype}") from None
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what} contains NaN or infinite values")
        return arr
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{what} must be integer class ids, got non-integer floats")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integer class ids, got dtype {arr.dtype}")
    return arr


def _pair(predictions: Any, references: Any, *, regression: bool) -> tuple[np.ndarray, np.ndarray]:
    preds = _as_1d(predictions, "predictions", regression=regression)
    refs = _as_1d(references, "references", regression=regression)
    if preds.shape != refs.shape:
        raise ValueError(
            f"predictions and references differ in length: {preds.shape[0]} vs {refs.shape[0]}"
        )
    return preds, refs


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of exact matches (GLUE ``simple_accuracy``: ``(preds == labels).mean()``)."""
    preds, refs = _pair(predictions, references, regression=False)
    return float((preds == refs).mean())


def matthews_correlation(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation coefficient, CoLA's official metric (``sklearn.metrics.matthews_corrcoef``).

    As in scikit-learn, a degenerate confusion matrix (e.g. one predicted class only) gives 0.0.
    """
    from sklearn.metrics import matthews_corrcoef

    preds, refs = _pair(predictions, references, regression=False)
    return float(matthews_corrcoef(refs, preds))


def f1_binary(predictions: Sequence[int], references: Sequence[int]) -> float:
    """F1 of the positive class 1, MRPC/QQP's official metric (``sklearn.metrics.f1_score``,
    ``average="binary"``). Labels must be 0/1. No predicted and no true positives gives 0.0."""
    from sklearn.metrics import f1_score

    preds, refs = _pair(predictions, references, regression=False)
    bad = sorted(set(np.unique(np.concatenate([preds, refs])).tolist()) - {0, 1})
    if bad:
        raise ValueError(f"f1 is binary: labels must be 0 or 1, got {bad}")
    return float(f1_score(refs, preds, pos_label=1, average="binary", zero_division=0.0))


def pearson_spearman(predictions: Sequence[float], references: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation, STS-B's official metrics (``scipy.stats.pearsonr`` and
    ``scipy.stats.spearmanr``).

    Needs at least 2 values. A constant input has no defined correlation: the value is NaN (as
    SciPy returns), without SciPy's warning.
    """
    import warnings

    from scipy.stats import pearsonr, spearmanr

    preds, refs = _pair(predictions, references, regression=True)
    if preds.size < 2:
        raise ValueError("pearson/spearman need at least 2 values")
    if np.all(preds == preds[0]) or np.all(refs == refs[0]):
        return {"pearson": math.nan, "spearman": math.nan}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = float(pearsonr(preds, refs)[0])
        spearman = float(spearmanr(preds, refs)[0])
    return {"pearson": pearson, "spearman": spearman}


def compute_metrics(metric: str, predictions: Any, references: Any) -> dict[str, float]:
    """Compute ``metric`` for 1-D ``predictions`` against ``references``.

    - ``"accuracy"`` -> ``{"accuracy"}``
    - ``"matthews"`` -> ``{"matthews_correlation"}`` (CoLA)
    - ``"f1_accuracy"`` -> ``{"accuracy", "f1"}`` (MRPC, QQP; binary F1 of class 1)
    - ``"pearson_spearman"`` -> ``{"pearson", "spearman"}`` (STS-B; float predictions)

    Classification metrics take integer class ids (lists, NumPy arrays or tensors converted with
    ``.numpy()``); a 2-D array (logits) is rejected. Raises ``ValueError`` for an unknown metric,
    empty input, mismatched lengths or non-finite values.
    """
    _check_metric(metric)
    if metric == "accuracy":
        return {"accuracy": accuracy(predictions, references)}
    if metric == "matthews":
        return {"matthews_correlation": matthews_correlation(predictions, references)}
    if metric == "f1_accuracy":
        return {
            "accuracy": accuracy(predictions, references),
            "f1": f1_binary(predictions, references),
        }
    return pearson_spearman(predictions, references)
