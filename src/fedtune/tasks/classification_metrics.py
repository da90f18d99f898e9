"""User-chosen classification metrics (issue 18): names, checks and one pure function computing them.

``eval.metrics`` names (see :data:`CLASSIFICATION_METRICS`):

==============  ============================================================  ===============
name            value                                                         needs
==============  ============================================================  ===============
``accuracy``    fraction of rows predicted right                              -
``macro_f1``    unweighted mean of the per-class F1                           -
``micro_f1``    F1 over all rows pooled (equals accuracy for single-label)    -
``f1``          F1 of the positive label                                      positive label
``precision``   precision of the positive label                               positive label
``recall``      recall of the positive label                                  positive label
``matthews``    Matthews correlation coefficient (multi-class form)           -
``auroc``       area under the ROC curve of the positive label's score        binary task
==============  ============================================================  ===============

All values are plain Python floats computed with scikit-learn (a dependency); higher is better for all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CLASSIFICATION_METRICS: tuple[str, ...] = (
    "accuracy", "macro_f1", "micro_f1", "f1", "precision", "recall", "matthews", "auroc",
)
"""The names ``eval.metrics`` accepts for classification tasks."""

POSITIVE_LABEL_METRICS: frozenset[str] = frozenset({"f1", "precision", "recall"})
"""Metrics defined for one positive label (``eval.positive_label``)."""


def check_metric_names(names: Sequence[str], field: str = "eval.metrics") -> None:
    """Raise ``ValueError`` (one line naming ``field`` and the value) for a name not in the table."""
    for name in names:
        if name not in CLASSIFICATION_METRICS:
            raise ValueError(f"{field}: unknown metric {name!r}; known: {', '.join(CLASSIFICATION_METRICS)}")


def resolve_positive_label(positive: str | int | None, label_names: Sequence[str],
                           field: str = "eval.positive_label") -> int | None:
    """The class id of ``positive`` (a label name or an int id) among ``label_names``; ``None`` stays ``None``.

    Raises ``ValueError`` (one line naming ``field`` and the value) when it is not one of the task's labels.
    """
    if positive is None:
        return None
    if isinstance(positive, bool):
        raise ValueError(f"{field} must be a label name or an int label id, got {positive!r}")
    if isinstance(positive, int):
        if 0 <= positive < len(label_names):
            return positive
    elif positive in label_names:
        return list(label_names).index(positive)
    raise ValueError(f"{field} = {positive!r} is not one of the task's labels: {list(label_names)}")


def check_auroc(num_labels: int, field: str = "eval.metrics") -> None:
    """Refuse AUROC on a task that is not binary, saying why."""
    if num_labels != 2:
        raise ValueError(f"{field}: 'auroc' needs a binary task (one positive-class score per row); "
                         f"this task has {num_labels} labels")


def classification_metrics(labels: Any, predictions: Any, names: Sequence[str], *, num_labels: int,
                           positive: int | None = None, scores: Any = None) -> dict[str, float]:
    """The chosen metrics of integer ``predictions`` against integer ``labels``.

    ``positive`` is the class id for ``f1``/``precision``/``recall`` (required for them); ``scores`` are
    the positive-class probabilities (or logits) per row, required for ``auroc`` on a binary task.
    """
    import numpy as np
    from sklearn import metrics as skm

    check_metric_names(names)
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(predictions).astype(np.int64)
    if y.shape != p.shape or y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels and predictions must be 1-D of one non-zero length, got {y.shape}, {p.shape}")
    all_labels = list(range(num_labels))
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(np.mean(y == p))
        elif name in ("macro_f1", "micro_f1"):
            out[name] = float(skm.f1_score(y, p, labels=all_labels, average=name.split("_")[0], zero_division=0))
        elif name in POSITIVE_LABEL_METRICS:
            if positive is None:
                raise ValueError(f"eval.metrics: {name!r} needs eval.positive_label")
            fn = {"f1": skm.f1_score, "precision": skm.precision_score, "recall": skm.recall_score}[name]
            out[name] = float(fn(y, p, labels=[positive], average="macro", zero_division=0))
        elif name == "matthews":
            out[name] = float(skm.matthews_corrcoef(y, p))
        elif name == "auroc":
            check_auroc(num_labels)
            if scores is None:
                raise ValueError("eval.metrics: 'auroc' needs per-row scores of the positive class")
            pos = 1 if positive is None else positive
            s = np.asarray(scores, dtype=np.float64)
            out[name] = float(skm.roc_auc_score((y == pos).astype(np.int64), s)) if len(set(y)) == 2 else float("nan")
    return out


def per_class_report(labels: Any, predictions: Any, label_names: Sequence[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support plus the confusion matrix (rows: true, columns: predicted).

    Returns ``{"labels": [name], "per_class": {name: {"precision", "recall", "f1", "support"}},
    "confusion_matrix": [[int]]}``, JSON-ready for summary.json.
    """
    from sklearn import metrics as skm

    ids = list(range(len(label_names)))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(labels, predictions, labels=ids, zero_division=0)
    per_class = {
        str(name): {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(sup[i])}
        for i, name in enumerate(label_names)
    }
    cm = skm.confusion_matrix(labels, predictions, labels=ids)
    return {"labels": [str(n) for n in label_names], "per_class": per_class,
            "confusion_matrix": cm.astype(int).tolist()}


@dataclass(frozen=True)
class MetricChoice:
    """The metrics a user chose (``eval.metrics``, ``eval.positive_label``, ``eval.primary``), resolved for a task.

    Built by :meth:`resolve`, which checks them against the task's labels and its dataset metric's keys, so a
    wrong name fails before any training, with a one-line :class:`~fedtune.errors.ConfigError`.
    """

    names: tuple[str, ...]
    """Chosen metric names, in the order given."""
    positive: int | None
    """Class id of ``eval.positive_label`` (``None`` when not set)."""
    primary: str
    """The headline key: ``eval.primary``, else the dataset metric's own headline."""

    @classmethod
    def resolve(cls, eval_cfg: Any, label_names: Sequence[str], official_keys: Sequence[str],
                official_primary: str, *, regression: bool, task: str) -> MetricChoice:
        """Check ``eval_cfg`` (an :class:`~fedtune.config.EvalConfig`) against the task; raise ConfigError."""
        from fedtune.errors import ConfigError

        names = tuple(eval_cfg.metrics)
        if regression and (names or eval_cfg.positive_label):
            raise ConfigError(f"eval.metrics {list(names)} / eval.positive_label: {task} is a regression task (float "
                              "targets), which has no classes to count right or wrong; its metrics are pearson, spearman")
        try:
            if "auroc" in names:
                check_auroc(len(label_names))
            positive = resolve_positive_label(eval_cfg.positive_label or None, [str(n) for n in label_names])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        keys = list(dict.fromkeys([*official_keys, *names]))
        primary = eval_cfg.primary or official_primary
        if primary not in keys:
            raise ConfigError(f"eval.primary = {primary!r} is not a metric this run computes: {', '.join(keys)} "
                              "(add it to eval.metrics)")
        return cls(names, positive, primary)

    def compute(self, labels: Any, predictions: Any, *, num_labels: int, scores: Any = None) -> dict[str, float]:
        """The chosen metrics (see :func:`classification_metrics`); ``scores`` are per-class probabilities."""
        if not self.names:
            return {}
        import numpy as np

        positive_scores = None
        if scores is not None and "auroc" in self.names:
            positive_scores = np.asarray(scores)[:, 1 if self.positive is None else self.positive]
        return classification_metrics(labels, predictions, self.names, num_labels=num_labels,
                                      positive=self.positive, scores=positive_scores)
