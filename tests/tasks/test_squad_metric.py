"""The SQuAD v1.1 metric on hand-made cases."""

import pytest

from fedtune.tasks.squad_metric import exact_match, f1, normalize_answer, squad_scores


def test_normalization_like_the_official_script():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theory") == "theory"  # 'the' only as a whole word


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Broncos", "Broncos.") == 1.0
    assert exact_match("Denver", "Denver Broncos") == 0.0
    # pred {denver}, gold {denver, broncos}: P=1, R=1/2, F1=2/3
    assert f1("Denver", "Denver Broncos") == pytest.approx(2 / 3)
    assert f1("Carolina Panthers", "Denver Broncos") == 0.0
    # repeated tokens count with multiplicity: pred [a1 a1], gold [a1]: P=1/2, R=1
    assert f1("x x", "x") == pytest.approx(2 / 3)


def test_best_gold_answer_counts_and_missing_prediction_scores_zero():
    answers = {"q1": ["Denver Broncos", "Broncos"], "q2": ["Santa Clara"]}
    scores = squad_scores({"q1": "broncos"}, answers)
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(50.0)


def test_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="no questions"):
        squad_scores({}, {})
    with pytest.raises(ValueError, match="q9"):
        squad_scores({"q9": "x"}, {"q9": []})
