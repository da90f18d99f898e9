"""Multi-label classification (GoEmotions and local files) as a Task: sigmoid head, BCE loss.

Data: ``data.dataset = "goemotions"`` reads ``$FEDTUNE_DATA_DIR/goemotions`` (``train.tsv``,
``dev.tsv``, ``test.tsv`` with a ``text``/``label`` header, labels as comma-separated ids, and
``labels.txt``), else the hub's ``google-research-datasets/go_emotions`` (config ``simplified``).
Local files (``data.train_file``/``eval_file``) hold one row per text with the labels in
``data.label_column`` as a list or a ``,``/``;``-separated string of names or ids.

Scores: micro and macro F1, subset accuracy (every label right) and per-label F1 (in the run
summary) at ``eval.threshold``, or at the threshold with the best micro F1 on the validation
split when ``eval.tune_threshold`` is set. Partitioners see each example's primary (first) label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedtune.batching import EncodedDataset, collate
from fedtune.config import DataConfig, EvalConfig, ModelConfig
from fedtune.models import load_classifier
from fedtune.precision import autocast
from fedtune.tasks.data import DataError, data_dir, seeded_rng, stratified_indices
from fedtune.tasks.data.files import _read_table
from fedtune.tasks.multilabel_metrics import multilabel_scores, tune_threshold
from fedtune.tasks.task import EvalContext, PartitionUnits, Task
from fedtune.token_rows import length_order

GOEMOTIONS = ("goemotions", "go_emotions", "google-research-datasets/go_emotions")
"""Dataset names that mean GoEmotions."""


@dataclass(frozen=True)
class MultiLabelRows:
    """Texts and, per text, the ids of its labels (at least one)."""

    texts: list[str]
    labels: list[list[int]]

    def subset(self, idx: Sequence[int]) -> "MultiLabelRows":
        """The rows at ``idx`` in that order."""
        return MultiLabelRows([self.texts[i] for i in idx], [self.labels[i] for i in idx])


@dataclass(frozen=True)
class MultiLabelData:
    """Training rows, eval splits and the label vocabulary."""

    name: str
    train: MultiLabelRows
    evals: dict[str, MultiLabelRows]
    label_names: list[str]


def _parse_labels(value: Any, names: list[str], source: str, row: int) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    if isinstance(value, (list, tuple, np.ndarray)):
        parts = list(value)
    elif isinstance(value, (int, np.integer)):
        parts = [int(value)]
    elif isinstance(value, str):
        parts = [p.strip() for p in value.replace(";", ",").split(",") if p.strip()]
    else:
        parts = []
    ids = []
    for p in parts:
        key = str(p).strip()
        if key in index:
            ids.append(index[key])
        elif key.lstrip("-").isdigit() and 0 <= int(key) < len(names):
            ids.append(int(key))
        else:
            raise DataError(f"{source}: row {row}: label {key!r} is not one of the {len(names)} labels "
                            f"({', '.join(names[:5])}, ...)")
    if not ids:
        raise DataError(f"{source}: row {row}: no label (value {value!r})")
    return sorted(set(ids))


def _rows_from_table(table: dict[str, list[Any]], text_col: str, label_col: str, names: list[str],
                     source: str) -> MultiLabelRows:
    for col, option in ((text_col, "text_column"), (label_col, "label_column")):
        if col not in table:
            raise DataError(f"{source}: no column {col!r} (data.{option}); columns: {', '.join(table)}")
    texts = [str(t) for t in table[text_col]]
    labels = [_parse_labels(v, names, source, i) for i, v in enumerate(table[label_col])]
    if not texts:
        raise DataError(f"{source}: no rows")
    return MultiLabelRows(texts, labels)


def _label_vocabulary(tables: Sequence[dict[str, list[Any]]], label_col: str) -> list[str]:
    seen: set[str] = set()
    for t in tables:
        for v in t.get(label_col, []):
            parts = list(v) if isinstance(v, (list, tuple)) else str(v).replace(";", ",").split(",")
            seen.update(str(p).strip() for p in parts if str(p).strip())
    return sorted(seen)


def load_multilabel_data(cfg: DataConfig) -> MultiLabelData:
    """GoEmotions (local folder or hub) or local files; errors name the file, column and value."""
    if cfg.train_file:
        if not cfg.eval_file:
            raise DataError("multilabel from files needs data.eval_file too")
        text_col, label_col = cfg.text_column or "text", cfg.label_column or "labels"
        tables = {s: _read_table(Path(f)) for s, f in (("train", cfg.train_file), ("validation", cfg.eval_file))}
        names = list(cfg.label_names) or _label_vocabulary(list(tables.values()), label_col)
        rows = {s: _rows_from_table(t, text_col, label_col, names, f) for (s, t), f in
                zip(tables.items(), (cfg.train_file, cfg.eval_file), strict=True)}
        return MultiLabelData("files", rows["train"], {"validation": rows["validation"]}, names)
    if cfg.dataset.strip().lower() not in GOEMOTIONS:
        raise DataError(f"multilabel: unknown dataset {cfg.dataset!r}; use goemotions or data.train_file/eval_file")
    root = data_dir()
    folder = root / "goemotions" if root else None
    if folder is not None and (folder / "train.tsv").is_file():
        names = [n.strip() for n in (folder / "labels.txt").read_text().splitlines() if n.strip()]
        split_files = {"train": "train.tsv", "test": "test.tsv", "validation": "dev.tsv"}
        rows = {s: _rows_from_table(_read_table(folder / f), "text", "label", names, str(folder / f))
                for s, f in split_files.items()}
    else:
        try:
            import datasets

            ds = datasets.load_dataset("google-research-datasets/go_emotions", "simplified")
        except Exception as exc:
            raise DataError(f"could not load GoEmotions from the hub ({type(exc).__name__}); without hub access put "
                            "train.tsv/dev.tsv/test.tsv/labels.txt in $FEDTUNE_DATA_DIR/goemotions") from exc
        names = list(ds["train"].features["labels"].feature.names)
        rows = {s: MultiLabelRows(list(ds[h]["text"]), [sorted(set(x)) for x in ds[h]["labels"]])
                for s, h in (("train", "train"), ("test", "test"), ("validation", "validation"))}
    evals = {k: rows[k] for k in ("test", "validation")}
    if cfg.eval_split:
        key = {"dev": "validation"}.get(cfg.eval_split, cfg.eval_split)
        if key not in evals:
            raise DataError(f"goemotions: eval split {cfg.eval_split!r} not found; available: test, validation")
        evals = {key: evals[key]}
    return MultiLabelData("goemotions", rows["train"], evals, names)


class MultiLabelTask(Task):
    """Several labels per text: sigmoid outputs, BCE loss, F1 scores at a (tuned) threshold."""

    kind = "multilabel"
    headline = "micro_f1"

    def __init__(self, data_cfg: DataConfig, eval_cfg: EvalConfig, tokenizer, seed: int) -> None:
        data = load_multilabel_data(data_cfg)
        train = data.train
        primary = [lab[0] for lab in train.labels]
        if data_cfg.train_size > 0:
            train = train.subset(stratified_indices(primary, data_cfg.train_size, seeded_rng(seed, 0)))
        evals = data.evals
        if data_cfg.eval_size > 0:
            evals = {k: v.subset(sorted(seeded_rng(seed, 1 + j).choice(len(v.texts), min(data_cfg.eval_size, len(v.texts)),
                                                                  replace=False).tolist()))
                     for j, (k, v) in enumerate(evals.items())}
        self.name, self.label_names = data.name, data.label_names
        self.tokenizer, self.max_length = tokenizer, data_cfg.max_length
        self.threshold, self.tune = eval_cfg.threshold, eval_cfg.tune_threshold
        self.primary_labels = [lab[0] for lab in train.labels]
        self.train = self.encode(train)
        self.evals = {k: self.encode(v) for k, v in evals.items()}
        self.headline = f"{next(iter(self.evals))}_micro_f1" if len(self.evals) > 1 else "micro_f1"
        self._details: dict = {}

    def encode(self, rows: MultiLabelRows) -> EncodedDataset:
        """Tokenize and turn label ids into 0/1 float vectors."""
        enc = self.tokenizer(rows.texts, truncation=True, max_length=self.max_length, padding=False)
        targets = torch.zeros(len(rows.texts), len(self.label_names))
        for i, ids in enumerate(rows.labels):
            targets[i, ids] = 1.0
        return EncodedDataset(list(enc["input_ids"]),
                              list(enc["token_type_ids"]) if "token_type_ids" in enc else None, targets)

    @property
    def units(self) -> PartitionUnits:
        """The partitioning units of the training split (see :meth:`Task.units`)."""
        return PartitionUnits(len(self.train), self.primary_labels, None, self.label_names)

    def build_model(self, cfg: ModelConfig, seed: int) -> nn.Module:
        """The multi-label head, its biases set to the training labels' log-odds (prior initialization).

        With 28 mostly rare labels, a head starting at p = 0.5 spends its first steps learning
        "no" for everything; starting at each label's base rate lets the steps go to the text.
        """
        model = load_classifier(cfg, len(self.label_names), regression=False, seed=seed, multilabel=True)
        prior = self.train.labels.mean(0).clamp(1e-4, 1 - 1e-4)
        heads = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None
                 and m.out_features == len(self.label_names) and {"classifier", "score"} & set(n.split("."))]
        with torch.no_grad():
            for head in heads:
                head.bias.copy_(torch.log(prior / (1 - prior)))
        return model

    @torch.inference_mode()
    def probabilities(self, model: nn.Module, data: EncodedDataset, ctx: EvalContext) -> tuple[np.ndarray, float]:
        """Sigmoid outputs (n, labels) in the data's order, and the mean BCE loss."""
        model.eval()
        order = length_order(data.input_ids)
        probs = torch.empty(len(data), len(self.label_names))
        loss_sum = 0.0
        for start in range(0, len(order), ctx.batch_size):
            idx = order[start : start + ctx.batch_size]
            batch = {k: v.to(ctx.device) for k, v in collate(data, idx, ctx.pad_id).items()}
            with autocast(ctx.precision, ctx.device):
                out = model(**batch)
            loss_sum += float(out.loss) * len(idx)
            probs[torch.as_tensor(idx)] = torch.sigmoid(out.logits.float()).cpu()
        return probs.numpy(), loss_sum / len(data)

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        """This task's metrics of ``model`` on the eval split (see :meth:`Task.evaluate`)."""
        scored = {k: (*self.probabilities(model, v, ctx), v.labels.numpy()) for k, v in self.evals.items()}
        threshold = self.threshold
        if self.tune:
            tune_on = "validation" if "validation" in scored else next(iter(scored))
            threshold = tune_threshold(scored[tune_on][0], scored[tune_on][2])
        multi = len(scored) > 1
        result: dict[str, float] = {"threshold": threshold}
        self._details = {"threshold": threshold, "label_names": self.label_names}
        for split, (probs, loss, targets) in scored.items():
            s = multilabel_scores(probs, targets, threshold)
            self._details[f"{split}_per_label_f1"] = dict(zip(self.label_names, s["per_label_f1"], strict=True))
            scalars = {"micro_f1": s["micro_f1"], "macro_f1": s["macro_f1"], "subset_accuracy": s["subset_accuracy"],
                       "loss": loss}
            result.update({(f"{split}_{k}" if multi else k): v for k, v in scalars.items() if not math.isnan(v)})
        return result

    def eval_inputs(self) -> EncodedDataset:
        """The encoded eval rows (see :meth:`Task.eval_inputs`)."""
        return next(iter(self.evals.values()))

    def score_rows(self, model: nn.Module, rows: EncodedDataset, ctx: EvalContext) -> float:
        """Micro F1 on some training rows (a client's own) at the configured ``eval.threshold``.

        Not at a tuned threshold: that one is chosen on the server's validation split, which a
        client does not have, so every runtime scores a client at the same fixed threshold.
        """
        probs, _ = self.probabilities(model, rows, ctx)
        return float(multilabel_scores(probs, rows.labels.numpy(), self.threshold)["micro_f1"])

    def details(self) -> dict:
        """Non-scalar results of the latest evaluation (see :meth:`Task.details`)."""
        return dict(self._details)
