"""From ``[data]`` to a Task object: the only place task kinds become classes."""

from __future__ import annotations

from typing import Literal

from fedtune.config import ConfigError, Experiment
from fedtune.tasks.task import Task

KINDS = ("classification", "multilabel", "qa", "causal_lm", "generative_classification")
"""Task kinds (``data.task``; ``auto`` resolves to one of these)."""


_OWN_METRICS = {"multilabel": "micro_f1, macro_f1, per-label F1, with eval.threshold", "qa": "exact_match, f1",
                "causal_lm": "perplexity, loss"}


TaskKind = Literal["classification", "multilabel", "qa", "causal_lm", "generative_classification"]
"""What ``data.task`` resolves to (``auto`` resolved)."""


def task_kind(exp: Experiment) -> TaskKind:
    """``data.task``, with ``auto`` resolved from the dataset name."""
    from fedtune.tasks.causal_lm_task import CODE_ALPACA
    from fedtune.tasks.multilabel_task import GOEMOTIONS
    from fedtune.tasks.qa_task import SQUAD

    kind = exp.data.task
    if kind != "auto":
        return kind
    name = exp.data.dataset.strip().lower()
    if name in SQUAD:
        return "qa"
    if name in GOEMOTIONS:
        return "multilabel"
    if name in CODE_ALPACA:
        return "causal_lm"
    return "classification"


def build_task(exp: Experiment, tokenizer) -> Task:
    """Load and encode the task ``exp`` describes (data errors name the file, column or value)."""
    kind = task_kind(exp)
    d, e = exp.data, exp.eval
    if (e.metrics or e.positive_label or e.primary) and kind not in ("classification", "generative_classification"):
        raise ConfigError(f"eval.metrics / eval.positive_label / eval.primary choose single-label classification "
                          f"metrics; a {kind} task reports its own ({_OWN_METRICS[kind]})")
    if kind == "classification":
        from fedtune.tasks.classification_task import ClassificationTask
        from fedtune.tasks.data import load_task_data

        return ClassificationTask(load_task_data(d, seed=exp.seed), tokenizer, d.max_length, e)
    if kind == "multilabel":
        from fedtune.tasks.multilabel_task import MultiLabelTask

        return MultiLabelTask(d, e, tokenizer, exp.seed)
    if kind == "qa":
        from fedtune.tasks.qa_task import QATask

        return QATask(d, e, tokenizer, exp.seed)
    if kind == "causal_lm":
        from fedtune.tasks.causal_lm_task import CausalLMTask

        return CausalLMTask(d, e, tokenizer, exp.seed)
    if kind == "generative_classification":
        from fedtune.tasks.causal_lm_task import GenerativeClassificationTask
        from fedtune.tasks.data import load_task_data

        return GenerativeClassificationTask(load_task_data(d, seed=exp.seed), d, e, tokenizer)
    raise ConfigError(f"data.task = {kind!r} is not one of {', '.join(KINDS)}")
