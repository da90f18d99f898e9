"""Known tasks laid out under ``$FEDTUNE_DATA_DIR``: GLUE TSV folders and the AG News files."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from fedtune.tasks.data.containers import DataError, TaskData, TextDataset
from fedtune.tasks.data.known_tasks import _EVAL_ALIASES, _LocalSplit, _TaskSpec
from fedtune.tasks.data.labels import _float_label


def data_dir() -> Path | None:
    """The local data root from the environment variable ``FEDTUNE_DATA_DIR``, else ``None``."""
    value = os.environ.get("FEDTUNE_DATA_DIR", "").strip()
    return Path(value).expanduser() if value else None


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

        def col(name: str | int) -> int:
            if isinstance(name, int):
                return name
            if name not in header:
                raise DataError(
                    f"{path}: column {name!r} not found; available columns: "
                    + ", ".join(repr(h) for h in header)
                )
            return header.index(name)

        width = len(header)
    else:
        def col(name: str | int) -> int:
            if isinstance(name, str):  # a layout bug: without a header the columns are indices
                raise DataError(f"{path}: column {name!r} named, but the file has no header")
            return name

        width = len(lines[0][1]) if lines else 0
    text_i, label_i = col(split.text), col(split.label)
    pair_i = None if split.pair is None else col(split.pair)
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
        if pairs is not None and pair_i is not None:  # (both or neither)
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
