"""Tests for fedtune.tasks.metrics: hand-checked values for every GLUE metric."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune.tasks.metrics import METRICS, compute_metrics, primary_metric


def test_accuracy() -> None:
    out = compute_metrics("accuracy", [0, 1, 2, 2], [0, 1, 1, 2])
    assert out == {"accuracy": 0.75}
    assert type(out["accuracy"]) is float
    assert compute_metrics("accuracy", np.array([1, 1]), np.array([1, 1]))["accuracy"] == 1.0


def test_matthews_by_hand() -> None:
    # refs  : 1 1 1 1 0 0 0 0 0 0
    # preds : 1 1 1 0 1 0 0 0 0 0  -> TP=3 FN=1 FP=1 TN=5
    refs = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    expected = (3 * 5 - 1 * 1) / math.sqrt((3 + 1) * (3 + 1) * (5 + 1) * (5 + 1))  # 14/24
    out = compute_metrics("matthews", preds, refs)
    assert set(out) == {"matthews_correlation"}
    assert out["matthews_correlation"] == pytest.approx(expected) == pytest.approx(7 / 12)
    assert compute_metrics("matthews", refs, refs)["matthews_correlation"] == pytest.approx(1.0)
    inverted = [1 - r for r in refs]
    assert compute_metrics("matthews", inverted, refs)["matthews_correlation"] == pytest.approx(-1.0)
    # one predicted class only: sklearn (and GLUE) give 0
    assert compute_metrics("matthews", [1] * 10, refs)["matthews_correlation"] == 0.0


def test_f1_accuracy_by_hand() -> None:
    # TP=2 (idx 0,1), FP=1 (idx 2), FN=1 (idx 3), TN=1 (idx 4)
    preds = [1, 1, 1, 0, 0]
    refs = [1, 1, 0, 1, 0]
    out = compute_metrics("f1_accuracy", preds, refs)
    assert set(out) == {"accuracy", "f1"}
    assert out["accuracy"] == pytest.approx(3 / 5)
    # precision 2/3, recall 2/3 -> f1 = 2*TP / (2*TP + FP + FN) = 4/6
    assert out["f1"] == pytest.approx(2 / 3)
    # f1 is for class 1, not class 0: swapping the classes changes it
    swapped = compute_metrics("f1_accuracy", [1 - p for p in preds], [1 - r for r in refs])
    assert swapped["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    with pytest.raises(ValueError, match="binary"):
        compute_metrics("f1_accuracy", [0, 2], [0, 1])


def test_pearson_spearman() -> None:
    refs = [0.0, 1.0, 2.5, 4.0, 5.0]
    linear = [2 * r + 1 for r in refs]
    out = compute_metrics("pearson_spearman", linear, refs)
    assert set(out) == {"pearson", "spearman"}
    assert out["pearson"] == pytest.approx(1.0) and out["spearman"] == pytest.approx(1.0)
    # monotone but not linear: spearman 1, pearson < 1
    cubic = np.array(refs) ** 3
    out = compute_metrics("pearson_spearman", cubic, refs)
    assert out["spearman"] == pytest.approx(1.0) and out["pearson"] < 0.99
    assert compute_metrics("pearson_spearman", [-x for x in refs], refs)["pearson"] == pytest.approx(-1.0)
    # (n, 1) predictions from a regression head are accepted
    assert compute_metrics("pearson_spearman", np.array(linear)[:, None], refs)["pearson"] == pytest.approx(1.0)
    # by hand: x = 1,2,3 ; y = 1,3,2 -> r = 0.5, spearman 0.5
    out = compute_metrics("pearson_spearman", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert out["pearson"] == pytest.approx(0.5) and out["spearman"] == pytest.approx(0.5)
    out = compute_metrics("pearson_spearman", [2.0, 2.0, 2.0], refs[:3])
    assert math.isnan(out["pearson"]) and math.isnan(out["spearman"])


def test_primary_metric() -> None:
    assert [primary_metric(m) for m in METRICS] == ["accuracy", "matthews_correlation", "f1", "pearson"]
    for metric, (preds, refs) in {
        "accuracy": ([0, 1], [0, 1]),
        "matthews": ([0, 1], [0, 1]),
        "f1_accuracy": ([0, 1], [0, 1]),
        "pearson_spearman": ([0.0, 1.0], [0.0, 1.0]),
    }.items():
        assert primary_metric(metric) in compute_metrics(metric, preds, refs)
    with pytest.raises(ValueError, match="unknown metric"):
        primary_metric("bleu")


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics("bleu", [1], [1])
    for metric in METRICS:
        with pytest.raises(ValueError, match="empty"):
            compute_metrics(metric, [], [])
        with pytest.raises(ValueError, match="differ in length"):
            compute_metrics(metric, [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="argmax"):
        compute_metrics("accuracy", np.zeros((3, 2)), [0, 1, 1])
    with pytest.raises(ValueError, match="integer class ids"):
        compute_metrics("accuracy", [0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics("pearson_spearman", [float("nan"), 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="at least 2"):
        compute_metrics("pearson_spearman", [1.0], [1.0])
