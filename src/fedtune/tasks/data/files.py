"""Local data files (CSV/TSV/JSON/JSONL/Parquet): reading tables, column checks, missing values."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.config import DataConfig
from fedtune.tasks.data.containers import DataError, TaskData
from fedtune.tasks.data.labels import _RawSplit, _resolve_labels

log = logging.getLogger(__name__)


_FILE_TYPES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def _read_table(path: Path) -> dict[str, list[Any]]:
    """Read a CSV/TSV/JSON/JSONL/Parquet file into ``{column: values}``."""
    kind = _FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_FILE_TYPES)}"
        )
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    import pandas as pd

    try:
        if kind in ("csv", "tsv"):
            frame = pd.read_csv(
                path,
                sep="," if kind == "csv" else "\t",
                quoting=csv.QUOTE_MINIMAL if kind == "csv" else csv.QUOTE_NONE,
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
            )
        elif kind == "parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.DataFrame(_read_json_records(path, lines=kind == "jsonl"))
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty (no header, no rows)") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text ({exc})") from None
    except Exception as exc:  # parser errors, corrupt parquet, ...
        raise DataError(f"{path}: could not read as {kind}: {exc}") from None
    return {str(col): frame[col].tolist() for col in frame.columns}


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file (blank lines skipped); errors name the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return _read_json_records(path, lines=True)


def _read_json_records(path: Path, *, lines: bool) -> Any:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if not lines:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON lines with a .json extension
        if data is not None:
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(data) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
                    data = lists[0]  # {"data": [{...}, ...]}
                elif not all(isinstance(v, list) for v in data.values()):
                    raise DataError(f"{path}: expected a list of objects or an object of columns")
            elif not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"{path}: expected a list of objects or an object of columns")
            return data
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _column(table: Mapping[str, list[Any]], column: str, source: str, option: str) -> list[Any]:
    if column not in table:
        available = ", ".join(repr(c) for c in table) or "(none)"
        raise DataError(
            f"{source}: column {column!r} (data.{option}) not found; available columns: {available}"
        )
    return table[column]


def _texts(values: list[Any], source: str, column: str) -> list[str]:
    """The column's texts. One rule for every format: a missing value (null, NaN) is an error naming
    the row; an empty text and a non-text value (a number, read as its text) are kept, and how many
    rows each touched is logged once per file and column."""
    out, empty, converted = [], 0, 0
    for i, value in enumerate(values):
        if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
            raise DataError(f"{source}, row {i + 1}: missing text in column {column!r}")
        if not isinstance(value, str):
            converted += 1
            value = str(value)
        empty += not value.strip()
        out.append(value)
    if empty or converted:
        log.warning("%s, column %r: %d empty text(s) and %d non-text value(s) read as text, of %d rows (kept)",
                    source, column, empty, converted, len(out))
    return out


def _raw_split(
    table: Mapping[str, list[Any]], source: str, text_col: str, pair_col: str, label_col: str
) -> _RawSplit:
    texts = _texts(_column(table, text_col, source, "text_column"), source, text_col)
    pairs = None
    if pair_col:
        pairs = _texts(_column(table, pair_col, source, "text_pair_column"), source, pair_col)
    labels = list(_column(table, label_col, source, "label_column"))
    if not texts:
        raise DataError(f"{source}: no rows (empty split)")
    return _RawSplit(source, texts, pairs, labels, label_col)


def _load_files(cfg: DataConfig) -> TaskData:
    if not cfg.train_file:
        raise DataError('data.train_file must be set when data.dataset = "files"')
    if not cfg.eval_file:
        raise DataError("data.eval_file must be set when loading local files (data.train_file)")
    text_col = cfg.text_column or "text"
    label_col = cfg.label_column or "label"
    splits = {}
    for key, file in (("train", cfg.train_file), ("eval", cfg.eval_file)):
        path = Path(file).expanduser()
        table = _read_table(path)
        splits[key] = _raw_split(table, str(path), text_col, cfg.text_pair_column, label_col)
    label_names, train, evals = _resolve_labels(
        splits["train"],
        {"eval": splits["eval"]},
        regression=cfg.regression,
        label_names=cfg.label_names,
        names_source="data.label_names",
    )
    if cfg.eval_split and cfg.eval_split != "eval":
        raise DataError(
            f"data.eval_split = {cfg.eval_split!r}: local files have a single eval split 'eval' "
            "(data.eval_file)"
        )
    return TaskData(
        name=Path(cfg.train_file).stem,
        train=train,
        evals=evals,
        label_names=label_names,
        metric="pearson_spearman" if cfg.regression else "accuracy",
    )
