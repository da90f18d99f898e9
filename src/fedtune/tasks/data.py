"""Load raw text-classification / regression data into plain Python lists.

:func:`load_task_data` resolves a :class:`~fedtune.config.DataConfig` in this order:

1. **Local files** — ``data.dataset = "files"`` or ``data.train_file`` set. ``train_file`` and
   ``eval_file`` are read by extension with pandas / pyarrow (not ``datasets``):

   - ``.csv``: comma-separated with a header row, standard CSV quoting;
   - ``.tsv``: tab-separated with a header row, **no quote handling** (``csv.QUOTE_NONE``, as
     the GLUE TSVs need: a ``"`` is an ordinary character);
   - ``.json``: a JSON array of objects, an object of columns, an object with a single list of
     records (``{"data": [...]}``), or JSON lines;
   - ``.jsonl`` / ``.ndjson``: one JSON object per line;
   - ``.parquet`` / ``.pq``: via pyarrow.

   All cells of CSV/TSV are read as strings (``"NA"`` stays text). The text column is
   ``data.text_column`` (default ``"text"``), the optional pair column ``data.text_pair_column``,
   the label column ``data.label_column`` (default ``"label"``). Labels map through
   ``data.label_names`` when given (matched by name; integer labels are taken as indices only
   when no name looks like an integer), else through the sorted set of training labels
   (numerically sorted when all labels are integers). ``data.regression = true`` reads float
   labels. The eval split is called ``"eval"``.
2. **A known task in FEDTUNE_DATA_DIR** — GLUE (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte,
   wnli) or ag_news, when ``$FEDTUNE_DATA_DIR/<name>/`` exists (the GLUE download script's folder
   names such as ``SST-2`` or ``CoLA`` are accepted too). GLUE: ``train.tsv`` and ``dev.tsv``
   (eval split ``"validation"``; MNLI ``dev_matched.tsv`` / ``dev_mismatched.tsv`` ->
   ``"validation_matched"`` / ``"validation_mismatched"``). GLUE ``test.tsv`` files carry no
   labels and are never used. See :func:`_load_ag_news_local` for AG News.
3. **The Hugging Face hub** — ``nyu-mll/glue`` (config = task) for GLUE names,
   ``fancyzhx/ag_news`` for ag_news, else ``data.dataset`` itself as the dataset id. Failure to
   load is reported as a :class:`DataError` that names the id.

Subsetting: ``data.train_size > 0`` keeps a seeded subset of that many training rows,
stratified by label (plain random for regression); ``data.eval_size > 0`` keeps a seeded random
subset of every eval split. Subsets keep the original row order. A size larger than the split
simply keeps every row (no error).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.config import DataConfig
from fedtune.tasks.metrics import METRICS


class DataError(ValueError):
    """Bad or missing data: message names the file, column or value."""


# ----------------------------------------------------------------------------- containers


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
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Number of classes; 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)


# ----------------------------------------------------------------------------- known tasks


@dataclass(frozen=True)
class _LocalSplit:
    file: str
    header: bool
    text: str | int  # column name, or index when there is no header
    pair: str | int | None
    label: str | int


@dataclass(frozen=True)
class _TaskSpec:
    name: str
    folders: tuple[str, ...]  # folder names under FEDTUNE_DATA_DIR, in order of preference
    label_names: tuple[str, ...] | None  # None = regression
    label_kind: str  # "id" (labels are "0".."k-1"), "name" (labels are names), "float"
    metric: str
    hub_path: str
    hub_config: str | None
    hub_text: str
    hub_pair: str | None
    hub_evals: tuple[str, ...]
    local_train: _LocalSplit | None  # None: custom local loader
    local_evals: dict[str, _LocalSplit] | None


def _glue(
    name: str,
    folder: str,
    *,
    labels: tuple[str, ...] | None,
    kind: str,
    metric: str,
    hub_text: str,
    hub_pair: str | None,
    local: _LocalSplit,
    mnli: bool = False,
) -> _TaskSpec:
    def at(file: str) -> _LocalSplit:
        return _LocalSplit(file, local.header, local.text, local.pair, local.label)

    if mnli:
        hub_evals = ("validation_matched", "validation_mismatched")
        local_evals = {
            "validation_matched": at("dev_matched.tsv"),
            "validation_mismatched": at("dev_mismatched.tsv"),
        }
    else:
        hub_evals = ("validation",)
        local_evals = {"validation": at("dev.tsv")}
    return _TaskSpec(
        name=name,
        folders=(name, folder),
        label_names=labels,
        label_kind=kind,
        metric=metric,
        hub_path="nyu-mll/glue",
        hub_config=name,
        hub_text=hub_text,
        hub_pair=hub_pair,
        hub_evals=hub_evals,
        local_train=at("train.tsv"),
        local_evals=local_evals,
    )


_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, _TaskSpec] = {
    spec.name: spec
    for spec in [
        _glue("cola", "CoLA", labels=("unacceptable", "acceptable"), kind="id", metric="matthews",
              hub_text="sentence", hub_pair=None,
              # no header: source, label, original label, sentence
              local=_LocalSplit("", False, 3, None, 1)),
        _glue("sst2", "SST-2", labels=("negative", "positive"), kind="id", metric="accuracy",
              hub_text="sentence", hub_pair=None,
              local=_LocalSplit("", True, "sentence", None, "label")),
        _glue("mrpc", "MRPC", labels=("not_equivalent", "equivalent"), kind="id", metric="f1_accuracy",
              hub_text="sentence1", hub_pair="sentence2",
              local=_LocalSplit("", True, "#1 String", "#2 String", "Quality")),
        _glue("qqp", "QQP", labels=("not_duplicate", "duplicate"), kind="id", metric="f1_accuracy",
              hub_text="question1", hub_pair="question2",
              local=_LocalSplit("", True, "question1", "question2", "is_duplicate")),
        _glue("stsb", "STS-B", labels=None, kind="float", metric="pearson_spearman",
              hub_text="sentence1", hub_pair="sentence2",
              local=_LocalSplit("", True, "sentence1", "sentence2", "score")),
        _glue("mnli", "MNLI", labels=("entailment", "neutral", "contradiction"), kind="name",
              metric="accuracy", hub_text="premise", hub_pair="hypothesis",
              local=_LocalSplit("", True, "sentence1", "sentence2", "gold_label"), mnli=True),
        _glue("qnli", "QNLI", labels=_NLI2, kind="name", metric="accuracy",
              hub_text="question", hub_pair="sentence",
              local=_LocalSplit("", True, "question", "sentence", "label")),
        _glue("rte", "RTE", labels=_NLI2, kind="name", metric="accuracy",
              hub_text="sentence1", hub_pair="sentence2",
              local=_LocalSplit("", True, "sentence1", "sentence2", "label")),
        _glue("wnli", "WNLI", labels=("not_entailment", "entailment"), kind="id", metric="accuracy",
              hub_text="sentence1", hub_pair="sentence2",
              local=_LocalSplit("", True, "sentence1", "sentence2", "label")),
        _TaskSpec(
            name="ag_news",
            folders=("ag_news", "ag_news_csv"),
            label_names=("World", "Sports", "Business", "Sci/Tech"),
            label_kind="name",
            metric="accuracy",
            hub_path="fancyzhx/ag_news",
            hub_config=None,
            hub_text="text",
            hub_pair=None,
            hub_evals=("test",),
            local_train=None,
            local_evals=None,
        ),
    ]
}
"""Known task names (GLUE and ag_news)."""

GLUE_TASKS: tuple[str, ...] = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")

_ALIASES = {
    "sst-2": "sst2", "sts-b": "stsb", "agnews": "ag_news", "ag-news": "ag_news",
    "glue/cola": "cola", "glue/sst2": "sst2", "glue/mrpc": "mrpc", "glue/qqp": "qqp",
    "glue/stsb": "stsb", "glue/mnli": "mnli", "glue/qnli": "qnli", "glue/rte": "rte",
    "glue/wnli": "wnli",
}

_EVAL_ALIASES = {
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
}


def _known_task(dataset: str) -> _TaskSpec | None:
    key = dataset.strip().lower()
    key = _ALIASES.get(key, key)
    return TASKS.get(key)


# ----------------------------------------------------------------------------- public entry


def data_dir() -> Path | None:
    """The local data root from the environment variable ``FEDTUNE_DATA_DIR``, else ``None``."""
    value = os.environ.get("FEDTUNE_DATA_DIR", "").strip()
    return Path(value).expanduser() if value else None


def load_task_data(cfg: DataConfig, *, seed: int = 0) -> TaskData:
    """Load the task described by ``cfg`` (see the module docstring for the resolution order).

    ``seed`` drives the ``train_size`` / ``eval_size`` subsets; the same seed gives the same rows.
    Raises :class:`DataError` for a missing file or column, a bad label, an empty split, or a
    dataset that cannot be fetched from the hub.
    """
    if cfg.dataset.strip() == "files" or cfg.train_file:
        task = _load_files(cfg)
    else:
        spec = _known_task(cfg.dataset)
        folder = _local_folder(spec) if spec is not None else None
        if spec is not None and folder is not None:
            task = _load_local_task(spec, folder)
            task = _select_eval_split(task, cfg.eval_split)
        else:
            task = _load_hub(cfg, spec)
    return _apply_sizes(task, cfg, seed)


# ----------------------------------------------------------------------------- labels


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, np.floating) and np.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _label_key(value: Any) -> str:
    """Canonical string form of a classification label (1, 1.0, "1" and " 1 " all give "1")."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value).strip()


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


# ----------------------------------------------------------------------------- local files


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
    out = []
    for i, value in enumerate(values):
        if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
            raise DataError(f"{source}, row {i + 1}: missing text in column {column!r}")
        out.append(value if isinstance(value, str) else str(value))
    return out


@dataclass
class _RawSplit:
    source: str  # file path or hub id + split, for messages
    texts: list[str]
    pairs: list[str] | None
    raw_labels: list[Any]
    label_column: str


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
        names = [str(n) for n in label_names]
        if len(set(names)) != len(names):
            raise DataError(f"{names_source} has duplicate entries: {names}")
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


# ----------------------------------------------------------------------------- local layouts


def _local_folder(spec: _TaskSpec) -> Path | None:
    root = data_dir()
    if root is None:
        return None
    for folder in spec.folders:
        if (root / folder).is_dir():
            return root / folder
    return None


def _read_tsv_lines(path: Path, hint: str) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of every non-blank line, split on tabs only (no quoting)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found{hint}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # strips MRPC's byte order mark
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text ({exc})") from None
    return [
        (lineno, line.rstrip("\r").split("\t"))
        for lineno, line in enumerate(text.split("\n"), start=1)
        if line.strip()
    ]


def _read_local_split(spec: _TaskSpec, folder: Path, split: _LocalSplit) -> TextDataset:
    path = folder / split.file
    hint = (
        f" (needed for {spec.name}; put the GLUE file there, or unset FEDTUNE_DATA_DIR to use "
        "the Hugging Face hub)"
    )
    lines = _read_tsv_lines(path, hint)
    if split.header:
        if not lines:
            raise DataError(f"{path}: file is empty (no header)")
        header = [h.strip() for h in lines[0][1]]
        lines = lines[1:]

        def col(name: str | int | None) -> int | None:
            if name is None or isinstance(name, int):
                return name
            if name not in header:
                raise DataError(
                    f"{path}: column {name!r} not found; available columns: "
                    + ", ".join(repr(h) for h in header)
                )
            return header.index(name)

        width = len(header)
    else:
        col = lambda name: name  # noqa: E731
        width = len(lines[0][1]) if lines else 0
    text_i, pair_i, label_i = col(split.text), col(split.pair), col(split.label)
    if not lines:
        raise DataError(f"{path}: no rows (empty split)")
    label_col = split.label if isinstance(split.label, str) else f"column {split.label + 1}"
    names = spec.label_names or ()
    by_name = {n: i for i, n in enumerate(names)}
    texts: list[str] = []
    pairs: list[str] | None = [] if pair_i is not None else None
    labels: list[Any] = []
    for lineno, fields in lines:
        if len(fields) != width:
            raise DataError(
                f"{path}, line {lineno}: expected {width} tab-separated fields, found {len(fields)}"
            )
        texts.append(fields[text_i])
        if pairs is not None:
            pairs.append(fields[pair_i])
        raw = fields[label_i].strip()
        if spec.label_kind == "float":
            value = _float_label(raw)
        elif spec.label_kind == "id":
            value = int(raw) if raw.isdigit() and int(raw) < len(names) else None
        else:
            value = by_name.get(raw)
        if value is None:
            expected = (
                "a finite number" if spec.label_kind == "float"
                else f"one of {list(range(len(names)))}" if spec.label_kind == "id"
                else f"one of {list(names)}"
            )
            raise DataError(f"{path}, line {lineno}: label {raw!r} in {label_col!r} is not {expected}")
        labels.append(value)
    return TextDataset(texts, pairs, labels)


def _load_local_task(spec: _TaskSpec, folder: Path) -> TaskData:
    if spec.name == "ag_news":
        return _load_ag_news_local(spec, folder)
    assert spec.local_train is not None and spec.local_evals is not None
    train = _read_local_split(spec, folder, spec.local_train)
    evals = {key: _read_local_split(spec, folder, s) for key, s in spec.local_evals.items()}
    return TaskData(
        name=spec.name,
        train=train,
        evals=evals,
        label_names=list(spec.label_names) if spec.label_names else None,
        metric=spec.metric,
    )


def _load_ag_news_local(spec: _TaskSpec, folder: Path) -> TaskData:
    """AG News from ``$FEDTUNE_DATA_DIR/ag_news/``.

    - train: ``train_subset_alps_10k.tsv`` when present (no header, ``description<TAB>LabelName``,
      the 10,001-row split cut by the ALPS authors), else the official ``train.csv``;
    - eval ``"test"``: the official ``test.csv`` (no header; ``"class","title","description"``
      with class 1-4 = World, Sports, Business, Sci/Tech, the ``classes.txt`` order).

    The text is the **description only** in both splits, so train and test match (the 10k subset
    has no titles). The Hugging Face ``ag_news`` text is "title description" instead. Label ids:
    0 World, 1 Sports, 2 Business, 3 Sci/Tech. Text is kept verbatim (AG News' ``\\`` line-break
    markers and ``#39;`` entities included).
    """
    names = list(spec.label_names or ())
    by_name = {n: i for i, n in enumerate(names)}
    subset = folder / "train_subset_alps_10k.tsv"
    if subset.is_file():
        texts, labels = [], []
        for lineno, fields in _read_tsv_lines(subset, ""):
            if len(fields) != 2:
                raise DataError(
                    f"{subset}, line {lineno}: expected 2 tab-separated fields, found {len(fields)}"
                )
            label = by_name.get(fields[1].strip())
            if label is None:
                raise DataError(f"{subset}, line {lineno}: label {fields[1]!r} is not one of {names}")
            texts.append(fields[0])
            labels.append(label)
        if not texts:
            raise DataError(f"{subset}: no rows (empty split)")
        train = TextDataset(texts, None, labels)
    else:
        train = _read_ag_news_csv(folder / "train.csv", names)
    test = _read_ag_news_csv(folder / "test.csv", names)
    return TaskData(name="ag_news", train=train, evals={"test": test}, label_names=names, metric="accuracy")


def _read_ag_news_csv(path: Path, names: list[str]) -> TextDataset:
    if not path.is_file():
        raise DataError(f"{path}: file not found (AG News; unset FEDTUNE_DATA_DIR to use the hub)")
    texts, labels = [], []
    with path.open(encoding="utf-8", newline="") as f:
        for rowno, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != 3:
                raise DataError(f"{path}, row {rowno}: expected 3 fields (class, title, description), found {len(row)}")
            cls = row[0].strip()
            if not (cls.isdigit() and 1 <= int(cls) <= len(names)):
                raise DataError(f"{path}, row {rowno}: class {row[0]!r} is not one of 1..{len(names)}")
            texts.append(row[2])
            labels.append(int(cls) - 1)
    if not texts:
        raise DataError(f"{path}: no rows (empty split)")
    return TextDataset(texts, None, labels)


def _select_eval_split(task: TaskData, eval_split: str) -> TaskData:
    if not eval_split:
        return task
    key = eval_split if eval_split in task.evals else _EVAL_ALIASES.get(eval_split, eval_split)
    if key not in task.evals:
        extra = " (GLUE test files have no labels)" if eval_split == "test" else ""
        raise DataError(
            f"data.eval_split = {eval_split!r} is not an eval split of {task.name}{extra}; "
            f"available: {', '.join(task.evals)}"
        )
    return TaskData(task.name, task.train, {key: task.evals[key]}, task.label_names, task.metric)


# ----------------------------------------------------------------------------- hub


def _load_hub(cfg: DataConfig, spec: _TaskSpec | None) -> TaskData:
    if spec is not None:
        path, config = spec.hub_path, spec.hub_config
        text_col = cfg.text_column or spec.hub_text
        pair_col = cfg.text_pair_column or (spec.hub_pair or "")
        label_col = cfg.label_column or "label"
        eval_keys: tuple[str, ...] = (cfg.eval_split,) if cfg.eval_split else spec.hub_evals
        regression = spec.label_names is None
        name = spec.name
    else:
        path, config = cfg.dataset.strip(), None
        text_col = cfg.text_column or "text"
        pair_col = cfg.text_pair_column
        label_col = cfg.label_column or "label"
        eval_keys = (cfg.eval_split,) if cfg.eval_split else ()
        regression = cfg.regression
        name = path
    hub_id = path if config is None else f"{path} (config {config!r})"

    try:
        import datasets

        ds = datasets.load_dataset(path, config) if config else datasets.load_dataset(path)
    except Exception as exc:  # network, offline mode, unknown id, missing config ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        local = ""
        root = data_dir()
        if spec is not None:
            local = (
                f" or put the files in $FEDTUNE_DATA_DIR/{spec.name}/"
                + (f" (FEDTUNE_DATA_DIR={root} has no such folder)" if root else " (FEDTUNE_DATA_DIR is not set)")
            )
        raise DataError(
            f"could not load dataset {hub_id} from the Hugging Face hub "
            f"({type(exc).__name__}: {reason}). Without hub access, use local data: "
            f'set data.dataset = "files" with data.train_file / data.eval_file{local}.'
        ) from exc

    available = list(ds.keys()) if hasattr(ds, "keys") else []
    if not eval_keys:
        preferred = [s for s in ("validation", "validation_matched", "dev", "test") if s in available]
        if not preferred:
            raise DataError(
                f"{hub_id}: no eval split found (looked for validation, dev, test); available "
                f"splits: {', '.join(available)}; set data.eval_split"
            )
        eval_keys = (preferred[0],)
    for split in (cfg.train_split, *eval_keys):
        if split not in available:
            raise DataError(
                f"{hub_id}: split {split!r} not found; available splits: {', '.join(available)}"
            )

    def raw(split: str) -> _RawSplit:
        part = ds[split]
        source = f"{path} [{split}]"
        table = {c: part[c] for c in part.column_names}  # lazy columns; indexed below
        texts = _texts(list(_column(table, text_col, source, "text_column")), source, text_col)
        pairs = None
        if pair_col:
            pairs = _texts(list(_column(table, pair_col, source, "text_pair_column")), source, pair_col)
        labels = list(_column(table, label_col, source, "label_column"))
        if not texts:
            raise DataError(f"{source}: no rows (empty split)")
        feature = part.features.get(label_col)
        class_names = getattr(feature, "names", None)
        if class_names and not regression:
            if any(int(v) < 0 for v in labels if not _is_missing(v)):
                raise DataError(
                    f"{source}: split has unlabeled rows (label -1 in column {label_col!r}); "
                    "choose a labeled split with data.eval_split"
                )
            labels = [class_names[int(v)] if not _is_missing(v) else v for v in labels]
        return _RawSplit(source, texts, pairs, labels, label_col)

    train_raw = raw(cfg.train_split)
    evals_raw = {split: raw(split) for split in eval_keys}
    if spec is not None:
        given_names: Sequence[str] = spec.label_names or ()
        names_source = f"the {spec.name} label names"
    else:
        feature = ds[cfg.train_split].features.get(label_col)
        given_names = cfg.label_names
        if not given_names and not regression:
            given_names = getattr(feature, "names", None) or ()  # a ClassLabel's own order
        names_source = "data.label_names" if cfg.label_names else f"the label names of {path}"
    label_names, train, evals = _resolve_labels(
        train_raw, evals_raw, regression=regression, label_names=given_names, names_source=names_source
    )
    metric = spec.metric if spec is not None else ("pearson_spearman" if regression else "accuracy")
    return TaskData(name=name, train=train, evals=evals, label_names=label_names, metric=metric)


# ----------------------------------------------------------------------------- subsets


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, stream])


def stratified_indices(labels: Sequence[int], size: int, rng: np.random.Generator) -> list[int]:
    """``size`` sorted row indices, each class keeping its share (largest-remainder rounding)."""
    n = len(labels)
    if size >= n:
        return list(range(n))
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    classes = sorted(by_class)
    exact = [size * len(by_class[c]) / n for c in classes]
    quota = [math.floor(e) for e in exact]
    order = sorted(range(len(classes)), key=lambda k: (-(exact[k] - quota[k]), k))
    for k in order[: size - sum(quota)]:
        quota[k] += 1
    picked: list[int] = []
    for c, q in zip(classes, quota):
        if q:
            picked.extend(rng.choice(by_class[c], size=q, replace=False).tolist())
    return sorted(picked)


def _random_indices(n: int, size: int, rng: np.random.Generator) -> list[int]:
    if size >= n:
        return list(range(n))
    return sorted(rng.choice(n, size=size, replace=False).tolist())


def _apply_sizes(task: TaskData, cfg: DataConfig, seed: int) -> TaskData:
    train, evals = task.train, task.evals
    if cfg.train_size > 0:
        pick: Callable[..., list[int]] = _random_indices if task.is_regression else stratified_indices
        arg: Any = len(train) if task.is_regression else train.labels
        train = train.subset(pick(arg, cfg.train_size, _rng(seed, 0)))
    if cfg.eval_size > 0:
        evals = {
            key: split.subset(_random_indices(len(split), cfg.eval_size, _rng(seed, 1 + k)))
            for k, (key, split) in enumerate(evals.items())
        }
    if train is task.train and evals is task.evals:
        return task
    return TaskData(task.name, train, evals, task.label_names, task.metric)
