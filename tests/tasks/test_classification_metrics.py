"""Tests of the user-chosen classification metrics (hand-computed cases)."""

import math

import pytest

from fedtune.tasks.classification_metrics import (
    check_auroc,
    check_metric_names,
    classification_metrics,
    per_class_report,
    resolve_positive_label,
)

# 10 rows, positive class 1 is rare (3 rows): TP=2, FN=1, FP=1, TN=6
Y = [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
P = [0, 0, 0, 0, 0, 0, 1, 1, 1, 0]


def test_hand_computed_binary_values():
    m = classification_metrics(Y, P, ["accuracy", "f1", "precision", "recall", "macro_f1", "micro_f1", "matthews"],
                               num_labels=2, positive=1)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    f1_neg = 2 * 6 / (2 * 6 + 1 + 1)  # class 0: TP=6, FP=1, FN=1
    assert m["macro_f1"] == pytest.approx((f1_neg + 2 / 3) / 2)
    assert m["micro_f1"] == pytest.approx(0.8)
    mcc = (2 * 6 - 1 * 1) / math.sqrt(3 * 3 * 7 * 7)
    assert m["matthews"] == pytest.approx(mcc)


def test_auroc_hand_computed_and_refused_on_multiclass():
    # positives scored 0.9, 0.4; negatives 0.1, 0.5 -> 3 of 4 pairs ordered right
    m = classification_metrics([1, 1, 0, 0], [1, 0, 0, 1], ["auroc"], num_labels=2, scores=[0.9, 0.4, 0.1, 0.5])
    assert m["auroc"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="needs a binary task.*3 labels"):
        check_auroc(3)


def test_unknown_metric_and_positive_label_errors_name_field_and_value():
    with pytest.raises(ValueError, match=r"eval.metrics: unknown metric 'f2'"):
        check_metric_names(["accuracy", "f2"])
    assert resolve_positive_label("fraud", ["ok", "fraud"]) == 1
    assert resolve_positive_label(0, ["ok", "fraud"]) == 0
    with pytest.raises(ValueError, match=r"eval.positive_label = 'spam' is not one of"):
        resolve_positive_label("spam", ["ok", "fraud"])
    with pytest.raises(ValueError, match=r"eval.positive_label = 2 is not one of"):
        resolve_positive_label(2, ["ok", "fraud"])
    with pytest.raises(ValueError, match="needs eval.positive_label"):
        classification_metrics(Y, P, ["f1"], num_labels=2)


def test_per_class_report_and_confusion_matrix():
    r = per_class_report(Y, P, ["ok", "fraud"])
    assert r["confusion_matrix"] == [[6, 1], [1, 2]]
    assert r["per_class"]["fraud"]["support"] == 3
    assert r["per_class"]["ok"]["recall"] == pytest.approx(6 / 7)
    # a class never predicted nor present: zeros, no warning-driven NaN
    r3 = per_class_report([0, 1], [0, 1], ["a", "b", "c"])
    assert r3["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r3["confusion_matrix"][2] == [0, 0, 0]
