"""The official SQuAD v1.1 metric: exact match and token F1 over normalized answers.

Normalization follows the official evaluation script (evaluate-v1.1.py): lower-case, remove
punctuation, remove the articles a/an/the, collapse whitespace. A prediction is scored against
every gold answer of its question and the best score counts; EM and F1 are averaged over
questions and reported in percent, as the official script does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    """1.0 when the normalized strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    """Token-overlap F1 of the normalized strings."""
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """EM and F1 in percent over every question in ``answers`` (a missing prediction scores 0)."""
    if not answers:
        raise ValueError("no questions to score")
    em_total = f1_total = 0.0
    for qid, golds in answers.items():
        if not golds:
            raise ValueError(f"question {qid} has no gold answers")
        pred = predictions.get(qid)
        if pred is None:
            continue
        em_total += max(exact_match(pred, g) for g in golds)
        f1_total += max(f1(pred, g) for g in golds)
    n = len(answers)
    return {"exact_match": 100.0 * em_total / n, "f1": 100.0 * f1_total / n}
