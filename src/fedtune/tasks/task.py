"""The Task contract: what a learning problem gives the round loop.

A Task turns ``[data]`` into encoded training rows, tells the partitioner what to split (its
*units*: rows for classification, questions for QA, instructions for causal LM), builds the
model with the right head, and scores a model with the task's official metric(s). The round
loop, strategies, transports and local training are the same for every task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedtune.batching import EncodedDataset
from fedtune.config import ModelConfig


@dataclass(frozen=True)
class EvalContext:
    """How to run a model for scoring: batch size, padding id, device and autocast precision."""

    batch_size: int
    pad_id: int
    device: torch.device
    precision: str = "fp32"


@dataclass(frozen=True)
class PartitionUnits:
    """What the partitioner splits: ``count`` units, with a class id and/or a group id each."""

    count: int
    labels: list[int] | None = None
    """Class id per unit (``label`` and ``dirichlet`` partitions; the primary label for multi-label)."""
    groups: list[int] | None = None
    """Group id per unit (``group`` partitions; QA: the article)."""
    label_names: list[str] | None = None


class Task(ABC):
    """One learning problem: data, head, metric. Subclasses fill in the abstract parts."""

    kind: str = ""
    """classification, multilabel, qa, causal_lm or generative_classification."""
    name: str = ""
    """The dataset's name (for summaries)."""
    headline: str = ""
    """The metric key that summarizes a run (e.g. accuracy, f1, micro_f1, perplexity)."""
    higher_is_better: bool = True
    train: EncodedDataset
    """Encoded training rows (QA: windows; several may belong to one question)."""

    @property
    @abstractmethod
    def units(self) -> PartitionUnits:
        """The partitioning units of the training set."""

    def rows_of(self, units: Sequence[int]) -> list[int]:
        """Training rows that belong to the given units (identity unless a unit spans rows)."""
        return list(units)

    @abstractmethod
    def build_model(self, cfg: ModelConfig, seed: int) -> nn.Module:
        """The pretrained model with this task's head, configured for training (LoRA/full/partial)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        """Scalar metrics of ``model`` on every eval split (keys prefixed by split when several)."""

    def eval_inputs(self) -> EncodedDataset:
        """Encoded model inputs of the (first) eval split, e.g. to time a model per example."""
        return self.train

    def details(self) -> dict:
        """Non-scalar results of the latest evaluation (e.g. per-label F1) for the run summary."""
        return {}

    def meta_fields(self) -> dict:
        """:class:`~fedtune.artifacts.ModelMeta` fields this task resolves itself (e.g. its prompt's template)."""
        return {}

    def write_samples(self, model: nn.Module, ctx: EvalContext, path: Path, rnd: int) -> None:
        """Append example outputs of ``model`` after round ``rnd`` to ``path`` (tasks that generate text)."""
        return  # (most tasks generate no text: nothing to write)

    def score_rows(self, model: nn.Module, rows: EncodedDataset, ctx: EvalContext) -> float:
        """The headline metric on some training rows (per-client evaluation, personalization)."""
        raise NotImplementedError(f"{self.kind}: this task cannot score a client's own rows (Task.score_rows)")
