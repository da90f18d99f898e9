"""Extractive question answering (SQuAD v1.1) as a Task: span head, official EM / F1.

Data: ``data.dataset = "squad"`` reads ``$FEDTUNE_DATA_DIR/squad`` (``train-v1.1*.json`` and
``dev-v1.1*.json``), else the hub's ``rajpurkar/squad``; SQuAD-format JSON files work through
``data.train_file`` / ``data.eval_file``. Contexts are cut into windows of ``data.max_length``
tokens overlapping by ``data.doc_stride`` (see :mod:`fedtune.tasks.qa`). The partitioner splits
questions (a client gets every window of its questions); a ``group`` partition keeps whole
articles together.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedtune.batching import EncodedDataset, collate
from fedtune.config import ConfigError, DataConfig, EvalConfig, ModelConfig
from fedtune.models import load_model
from fedtune.precision import autocast
from fedtune.tasks.data import DataError, data_dir, seeded_rng
from fedtune.tasks.qa import (
    QAExample,
    QAFeatures,
    load_squad_json,
    postprocess,
    prepare_eval_features,
    prepare_train_features,
)
from fedtune.tasks.squad_metric import squad_scores
from fedtune.tasks.task import EvalContext, PartitionUnits, Task
from fedtune.token_rows import length_order

SQUAD = ("squad", "squad_v1", "rajpurkar/squad")
"""Dataset names that mean SQuAD v1.1."""


def _pick(folder: Path, prefix: str) -> Path:
    files = sorted(folder.glob(f"{prefix}*.json"))
    if not files:
        raise DataError(f"{folder}: no {prefix}*.json file")
    return files[0]


def load_squad(cfg: DataConfig) -> tuple[list[QAExample], list[QAExample]]:
    """Training and evaluation questions from files, the local SQuAD folder, or the hub."""
    if cfg.train_file:
        if not cfg.eval_file:
            raise DataError("qa from files needs data.eval_file (SQuAD JSON) too")
        return load_squad_json(cfg.train_file), load_squad_json(cfg.eval_file)
    if cfg.dataset.strip().lower() not in SQUAD:
        raise DataError(f"qa: unknown dataset {cfg.dataset!r}; use squad or SQuAD-format data.train_file/eval_file")
    root = data_dir()
    folder = root / "squad" if root else None
    if folder is not None and folder.is_dir():
        return load_squad_json(_pick(folder, "train")), load_squad_json(_pick(folder, "dev"))
    try:
        import datasets

        ds = datasets.load_dataset("rajpurkar/squad")
    except Exception as exc:
        raise DataError(f"could not load SQuAD from the hub ({type(exc).__name__}); without hub access put "
                        "train-v1.1.json and dev-v1.1.json in $FEDTUNE_DATA_DIR/squad") from exc

    def convert(split) -> list[QAExample]:
        return [QAExample(r["id"], r["title"], r["question"], r["context"],
                          tuple(zip(r["answers"]["text"], r["answers"]["answer_start"], strict=True))) for r in split]

    return convert(ds["train"]), convert(ds["validation"])


def _subset(examples: list[QAExample], size: int, rng: np.random.Generator) -> list[QAExample]:
    if size <= 0 or size >= len(examples):
        return examples
    return [examples[i] for i in sorted(rng.choice(len(examples), size=size, replace=False).tolist())]


class QATask(Task):
    """Answer spans in a context: start/end logits, n-best decoding, SQuAD v1.1 exact match and F1."""

    kind = "qa"
    headline = "f1"

    def __init__(self, data_cfg: DataConfig, eval_cfg: EvalConfig, tokenizer, seed: int) -> None:
        if data_cfg.doc_stride >= data_cfg.max_length // 2:
            raise ConfigError(f"data.doc_stride = {data_cfg.doc_stride} must be below half of data.max_length "
                              f"({data_cfg.max_length}) so that windows advance")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("qa needs a fast tokenizer (character offsets); this model's tokenizer is not one")
        train, dev = load_squad(data_cfg)
        self.train_examples = _subset(train, data_cfg.train_size, seeded_rng(seed, 0))
        self.eval_examples = _subset(dev, data_cfg.eval_size, seeded_rng(seed, 1))
        self.name = "squad" if not data_cfg.train_file else "files"
        self.n_best, self.max_answer_length = eval_cfg.n_best, eval_cfg.max_answer_length
        feats = prepare_train_features(tokenizer, self.train_examples, data_cfg.max_length, data_cfg.doc_stride)
        if feats.start_positions is None or feats.end_positions is None:  # (training features always have them)
            raise ValueError("qa: training features without answer positions")
        self.train = EncodedDataset(
            feats.input_ids, feats.token_type_ids,
            torch.tensor(list(zip(feats.start_positions, feats.end_positions, strict=True)), dtype=torch.long),
            label_keys=("start_positions", "end_positions"),
            example_ids=torch.tensor(feats.example_index, dtype=torch.long),
        )
        self._tokenizer, self._max_length, self._stride = tokenizer, data_cfg.max_length, data_cfg.doc_stride
        self._windows: dict[int, list[int]] = defaultdict(list)
        for row, ex in enumerate(feats.example_index):
            self._windows[ex].append(row)
        self.eval_features: QAFeatures = prepare_eval_features(tokenizer, self.eval_examples, data_cfg.max_length,
                                                               data_cfg.doc_stride)
        self._eval_rows = EncodedDataset(self.eval_features.input_ids, self.eval_features.token_type_ids,
                                         torch.zeros(len(self.eval_features), dtype=torch.long))
        titles = sorted({e.title for e in self.train_examples})
        self._groups = [titles.index(e.title) for e in self.train_examples]
        self.predictions: dict[str, str] = {}

    @property
    def units(self) -> PartitionUnits:
        """The partitioning units of the training split (see :meth:`Task.units`)."""
        return PartitionUnits(len(self.train_examples), None, self._groups)

    def rows_of(self, units: Sequence[int]) -> list[int]:
        """The feature rows of these units (see :meth:`Task.rows_of`)."""
        return [row for u in units for row in self._windows[u]]

    def build_model(self, cfg: ModelConfig, seed: int) -> nn.Module:
        """This task's model for ``cfg`` (see :meth:`Task.build_model`)."""
        return load_model(cfg, "question_answering", seed)

    def logits(self, model: nn.Module, ctx: EvalContext) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Start and end logits of every evaluation window (unpadded), in window order."""
        return self._window_logits(model, self._eval_rows, ctx)

    @torch.inference_mode()
    def _window_logits(self, model: nn.Module, data: EncodedDataset,
                       ctx: EvalContext) -> tuple[list[np.ndarray], list[np.ndarray]]:
        model.eval()
        order = length_order(data.input_ids)
        starts: list[np.ndarray] = [np.empty(0)] * len(data)
        ends: list[np.ndarray] = [np.empty(0)] * len(data)
        for start in range(0, len(order), ctx.batch_size):
            idx = order[start : start + ctx.batch_size]
            batch = collate(data, idx, ctx.pad_id)
            batch.pop("labels")
            with autocast(ctx.precision, ctx.device):
                out = model(**{k: v.to(ctx.device) for k, v in batch.items()})
            s, e = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
            for j, i in enumerate(idx):
                n = len(data.input_ids[i])
                starts[i], ends[i] = s[j, :n], e[j, :n]
        return starts, ends

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        """This task's metrics of ``model`` on the eval split (see :meth:`Task.evaluate`)."""
        starts, ends = self.logits(model, ctx)
        self.predictions = postprocess(self.eval_examples, self.eval_features, starts, ends,
                                       n_best=self.n_best, max_answer_length=self.max_answer_length)
        gold = {e.qid: [a for a, _ in e.answers] for e in self.eval_examples}
        return squad_scores(self.predictions, gold)

    def eval_inputs(self) -> EncodedDataset:
        """The encoded eval rows (see :meth:`Task.eval_inputs`)."""
        return self._eval_rows

    def score_rows(self, model: nn.Module, rows: EncodedDataset, ctx: EvalContext) -> float:
        """Official SQuAD F1 on the questions ``rows`` were cut from (a client's own questions).

        The windows of those questions are made again with offsets, as the evaluation's are, and
        decoded the same way (n-best spans, official normalization).
        """
        if rows.example_ids is None:
            raise ValueError("qa score_rows needs rows cut from this task's training questions (example_ids)")
        examples = [self.train_examples[i] for i in sorted(set(rows.example_ids.tolist()))]
        feats = prepare_eval_features(self._tokenizer, examples, self._max_length, self._stride)
        data = EncodedDataset(feats.input_ids, feats.token_type_ids, torch.zeros(len(feats), dtype=torch.long))
        starts, ends = self._window_logits(model, data, ctx)
        answers = postprocess(examples, feats, starts, ends, n_best=self.n_best,
                              max_answer_length=self.max_answer_length)
        return squad_scores(answers, {e.qid: [a for a, _ in e.answers] for e in examples})[self.headline]

    def write_samples(self, model: nn.Module, ctx: EvalContext, path: Path, rnd: int) -> None:
        """Write the latest evaluation's answers (``{question id: text}``) as JSON next to the metrics."""
        import json

        path.with_name("predictions.json").write_text(json.dumps(self.predictions, indent=1, ensure_ascii=False))
