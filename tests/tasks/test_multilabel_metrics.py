"""Multi-label metrics on hand-made cases."""

import numpy as np
import pytest

from fedtune.tasks.multilabel_metrics import multilabel_scores, tune_threshold

TARGETS = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])


def test_perfect_and_by_hand():
    perfect = multilabel_scores(TARGETS * 0.9, TARGETS)
    assert perfect["micro_f1"] == 1.0 and perfect["subset_accuracy"] == 1.0
    probs = np.array([[0.9, 0.1, 0.2], [0.1, 0.8, 0.1], [0.7, 0.6, 0.6]])
    s = multilabel_scores(probs, TARGETS)
    # predicted: [1,0,0], [0,1,0], [1,1,1]; TP=4, FP=1, FN=1 -> micro F1 = 8/10
    assert s["micro_f1"] == pytest.approx(0.8)
    # label 0: P=1,R=1 -> 1; label 1: 1; label 2: TP=0 -> 0; macro = 2/3
    assert s["per_label_f1"] == pytest.approx([1.0, 1.0, 0.0])
    assert s["macro_f1"] == pytest.approx(2 / 3)
    assert s["subset_accuracy"] == pytest.approx(1 / 3)


def test_threshold_tuning_finds_separating_value():
    probs = np.array([[0.35, 0.1, 0.32], [0.1, 0.4, 0.1], [0.33, 0.31, 0.2]])
    t = tune_threshold(probs, TARGETS)
    assert multilabel_scores(probs, TARGETS, t)["micro_f1"] == 1.0 and 0.2 < t <= 0.3


def test_errors():
    with pytest.raises(ValueError, match="shape"):
        multilabel_scores(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="0/1"):
        multilabel_scores(np.zeros((1, 2)), np.array([[2, 0]]))
