"""Turning raw label values (from files or the hub) into class ids or floats."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedtune.tasks.data.containers import DataError, TextDataset


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, np.floating) and np.isnan(value):
        return True
    # A CSV cell "NaN" is read as text (the readers keep every cell as written): it is a missing
    # value, as the JSON readers' NaN is, never a class of its own.
    return isinstance(value, str) and (not value.strip() or value.strip().lower() == "nan")


def _label_key(value: Any) -> str:
    """Canonical string form of a classification label, by value.

    1, 1.0, "1", " 1 ", "1.0" and "1e0" all give "1"; "2.50" gives "2.5". Integer text keeps its
    digits ("007" stays "007": a code, not a number).
    """
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip()
    if not _is_int_text(text) and any(c in text for c in ".eE"):
        number = _float_label(text)
        if number is not None:
            return str(int(number)) if number.is_integer() else repr(number)
    return text


def _is_int_text(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _infer_label_names(keys: Sequence[str]) -> list[str]:
    distinct = set(keys)
    if all(_is_int_text(k) for k in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


class _LabelMap:
    """Maps label keys to ids through ``names`` (by name; by index when no name is an integer)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.allow_index = not any(_is_int_text(n) for n in self.names)

    def __call__(self, key: str) -> int | None:
        if key in self.index:
            return self.index[key]
        if self.allow_index and _is_int_text(key) and 0 <= int(key) < len(self.names):
            return int(key)
        return None


def _float_label(value: Any) -> float | None:
    try:
        out = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


@dataclass
class _RawSplit:
    source: str  # file path or hub id + split, for messages
    texts: list[str]
    pairs: list[str] | None
    raw_labels: list[Any]
    label_column: str


def _resolve_labels(
    train: _RawSplit,
    evals: Mapping[str, _RawSplit],
    *,
    regression: bool,
    label_names: Sequence[str],
    names_source: str,
) -> tuple[list[str] | None, TextDataset, dict[str, TextDataset]]:
    """Turn raw labels into ids (or floats) for train and every eval split."""

    def missing(split: _RawSplit, i: int, value: Any) -> DataError:
        return DataError(
            f"{split.source}, row {i + 1}: missing label in column {split.label_column!r} "
            f"(value {value!r})"
        )

    for split in (train, *evals.values()):
        for i, value in enumerate(split.raw_labels):
            if isinstance(value, (list, tuple, np.ndarray)):
                raise DataError(f"{split.source}, row {i + 1}: the label in column {split.label_column!r} is a list "
                                f"({list(value)[:3]}): several labels per text need data.task = \"multilabel\"")
            if _is_missing(value):
                raise missing(split, i, value)

    if regression:
        if label_names:
            raise DataError("data.label_names must be empty when data.regression = true")

        def convert(split: _RawSplit) -> TextDataset:
            out = []
            for i, value in enumerate(split.raw_labels):
                number = _float_label(value)
                if number is None:
                    raise DataError(
                        f"{split.source}, row {i + 1}: label {value!r} in column "
                        f"{split.label_column!r} is not a finite number (data.regression = true)"
                    )
                out.append(number)
            return TextDataset(split.texts, split.pairs, out)

        return None, convert(train), {k: convert(v) for k, v in evals.items()}

    if label_names:
        names = [_label_key(n) for n in label_names]
        if len(set(names)) != len(names):
            same = sorted({str(n) for n, k in zip(label_names, names, strict=True) if names.count(k) > 1})
            raise DataError(f"{names_source} names one value twice: {same} (labels are matched by value)")
        where = f"{names_source} {names}"
    else:
        names = _infer_label_names([_label_key(v) for v in train.raw_labels])
        where = f"the labels of the training split {train.source} {names}"
    mapping = _LabelMap(names)

    def convert_ids(split: _RawSplit) -> TextDataset:
        ids = []
        for i, value in enumerate(split.raw_labels):
            label = mapping(_label_key(value))
            if label is None:
                raise DataError(
                    f"{split.source}, row {i + 1}: label {value!r} in column "
                    f"{split.label_column!r} is not one of {where}"
                )
            ids.append(label)
        return TextDataset(split.texts, split.pairs, ids)

    return names, convert_ids(train), {k: convert_ids(v) for k, v in evals.items()}
