"""The data containers: :class:`TextDataset` (one split), :class:`TaskData` (a task) and
:class:`DataError`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from fedtune.errors import DataError  # noqa: F401  (re-exported: the data modules import it from here)
from fedtune.tasks.metrics import METRICS


@dataclass(frozen=True)
class TextDataset:
    """Rows of one split: texts, optional second texts, and labels (class ids or floats)."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: list[int] | list[float]

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.text_pairs)} text pairs")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "TextDataset":
        """The rows at ``indices``, in that order (duplicates allowed, negatives not)."""
        n = len(self)
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"subset indices out of range [0, {n}): {bad[:5]}")
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in idx],
            labels=[self.labels[i] for i in idx],
        )


@dataclass(frozen=True)
class TaskData:
    """A task: training rows, one or more eval splits, label vocabulary and official metric."""

    name: str
    train: TextDataset
    evals: dict[str, TextDataset]
    label_names: list[str] | None
    metric: str

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        if not self.evals:
            raise ValueError(f"task {self.name!r} has no eval split")

    @property
    def is_regression(self) -> bool:
        """True for a regression task (float labels, no label names)."""
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Number of classes; 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)

    def class_ids(self, ds: TextDataset) -> list[int]:
        """``ds.labels`` (the list itself) as class ids; a ValueError for a regression task (float targets)."""
        if self.label_names is None:
            raise ValueError(f"task {self.name!r} is a regression: its labels are float targets, not class ids")
        return cast("list[int]", ds.labels)  # (a task with label names has class-id labels)
