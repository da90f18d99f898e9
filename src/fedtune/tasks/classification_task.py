"""Sequence classification and regression (GLUE, AG News, local files, hub datasets) as a Task.

Every evaluation computes the dataset's own metric (e.g. GLUE's), the metrics chosen in ``eval.metrics``
(:mod:`fedtune.tasks.classification_metrics`) and, for :meth:`ClassificationTask.details`, each split's
per-class precision/recall/F1 and confusion matrix; ``eval.primary`` picks the headline.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtune import encode_cache
from fedtune.batching import EncodedDataset, encode_texts
from fedtune.config import EvalConfig, ModelConfig
from fedtune.evaluation import predict_outputs
from fedtune.models import load_classifier
from fedtune.tasks.classification_metrics import MetricChoice, per_class_report
from fedtune.tasks.data import TaskData
from fedtune.tasks.metrics import compute_metrics, metric_keys, primary_metric
from fedtune.tasks.task import EvalContext, PartitionUnits, Task


def classification_units(data: TaskData) -> PartitionUnits:
    """Rows as partitioning units, with their class ids (none for regression)."""
    labels = None if data.is_regression else list(data.class_ids(data.train))
    return PartitionUnits(len(data.train), labels, None, data.label_names)


class ClassificationTask(Task):
    """One label per example (or a float target): a classification head scored with the official metric."""

    kind = "classification"

    def __init__(self, data: TaskData, tokenizer, max_length: int, eval_cfg: EvalConfig | None = None) -> None:
        self.data = data
        self.name = data.name
        self.metric = data.metric
        self.choice = MetricChoice.resolve(eval_cfg or EvalConfig(), data.label_names or [], metric_keys(data.metric),
                                           primary_metric(data.metric), regression=data.is_regression, task=data.name)
        self.primary = self.choice.primary
        self._reports: dict[str, dict] = {}
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train = self.encode(data.train)
        self.evals = {split: self.encode(ds) for split, ds in data.evals.items()}
        first = next(iter(self.evals))
        self.headline = f"{first}_{self.primary}" if len(self.evals) > 1 else self.primary

    def encode(self, ds) -> EncodedDataset:
        """Tokenize a TextDataset of this task (through :mod:`fedtune.encode_cache` on a Flower node)."""
        if not encode_cache.is_enabled():
            return encode_texts(self.tokenizer, ds.texts, ds.text_pairs, ds.labels, self.max_length,
                                self.data.is_regression)

        def compute() -> dict:
            enc = encode_texts(self.tokenizer, ds.texts, ds.text_pairs, ds.labels, self.max_length,
                               self.data.is_regression)
            return {"input_ids": enc.input_ids, "token_type_ids": enc.token_type_ids}

        lists = encode_cache.cached_token_lists("classification", self.tokenizer, {"max_length": self.max_length},
                                                encode_cache.inputs_digest(ds.texts, ds.text_pairs), compute)
        dtype = torch.float32 if self.data.is_regression else torch.long
        return EncodedDataset(encode_cache.token_list(lists, "input_ids"), lists["token_type_ids"], torch.as_tensor(list(ds.labels), dtype=dtype))

    @property
    def units(self) -> PartitionUnits:
        """The partitioning units of the training split (see :meth:`Task.units`)."""
        return classification_units(self.data)

    def build_model(self, cfg: ModelConfig, seed: int) -> nn.Module:
        """This task's model for ``cfg`` (see :meth:`Task.build_model`)."""
        return load_classifier(cfg, self.data.num_labels, self.data.is_regression, seed)

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        """This task's metrics of ``model`` on the eval split (see :meth:`Task.evaluate`)."""
        multi = len(self.evals) > 1
        result: dict[str, float] = {}
        self._reports = {}
        for split, data in self.evals.items():
            m = self._score(model, data, ctx, report_as=split)
            result.update({(f"{split}_{k}" if multi else k): v for k, v in m.items()})
        return result

    def details(self) -> dict:
        """Per eval split of the latest evaluation: per-class precision/recall/F1/support and the confusion matrix.

        ``{"classes": {split: {"labels", "per_class", "confusion_matrix"}}}`` (rows of the matrix: true labels,
        columns: predicted); empty for regression.
        """
        return {"classes": self._reports} if self._reports else {}

    def eval_inputs(self) -> EncodedDataset:
        """The encoded eval rows (see :meth:`Task.eval_inputs`)."""
        return next(iter(self.evals.values()))

    def score_rows(self, model: nn.Module, rows: EncodedDataset, ctx: EvalContext) -> float:
        """The headline metric on some training rows (see :meth:`Task.score_rows`)."""
        return self._score(model, rows, ctx)[self.primary]

    def _score(self, model, data, ctx: EvalContext, report_as: str = "") -> dict[str, float]:
        outputs, loss = predict_outputs(model, data, batch_size=ctx.batch_size, pad_id=ctx.pad_id, device=ctx.device,
                                        precision=ctx.precision)
        labels = data.labels.tolist()
        if self.data.is_regression:
            return {**compute_metrics(self.metric, outputs.tolist(), labels), "loss": loss}
        preds = outputs.argmax(-1).tolist()
        result = compute_metrics(self.metric, preds, labels)
        result.update(self.choice.compute(labels, preds, num_labels=self.data.num_labels, scores=outputs.numpy()))
        result["loss"] = loss
        if report_as:
            names = self.data.label_names or [str(i) for i in range(self.data.num_labels)]
            self._reports[report_as] = per_class_report(labels, preds, names)
        return result
