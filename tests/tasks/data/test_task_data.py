"""Tests for fedtune.tasks.data: local GLUE / AG News layouts, local files, subsets, hub errors."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
from conftest import REPO

from fedtune.config import DataConfig
from fedtune.tasks.data import DataError, TaskData, TextDataset, data_dir, load_task_data

SHARED_DATA = Path(os.environ.get("FEDTUNE_DATA_DIR") or (REPO / ".." / "shared" / "data")).resolve()
HAVE_SHARED = SHARED_DATA.is_dir()
needs_shared = pytest.mark.skipif(not HAVE_SHARED, reason=f"shared data folder {SHARED_DATA} not found")


@lru_cache(maxsize=None)
def shared(name: str, train_size: int = 0, eval_size: int = 0, seed: int = 0) -> TaskData:
    """Load a task from the shared data folder once per test session."""
    with mock.patch.dict(os.environ, {"FEDTUNE_DATA_DIR": str(SHARED_DATA)}):
        cfg = DataConfig(dataset=name, train_size=train_size, eval_size=eval_size)
        return load_task_data(cfg, seed=seed)


# ----------------------------------------------------------------------------- shared GLUE data

GLUE_COUNTS = {
    "sst2": (67349, 872),
    "cola": (8551, 1043),
    "mrpc": (3667, 408),
    "rte": (2490, 277),
    "stsb": (5749, 1500),
    "wnli": (635, 71),
}


@needs_shared
@pytest.mark.parametrize("name", sorted(GLUE_COUNTS))
def test_glue_row_counts(name: str) -> None:
    if not (SHARED_DATA / name).is_dir():
        pytest.skip(f"{name} not in {SHARED_DATA}")
    task = shared(name)
    n_train, n_eval = GLUE_COUNTS[name]
    assert task.name == name
    assert len(task.train) == n_train
    assert list(task.evals) == ["validation"]
    assert len(task.evals["validation"]) == n_eval
    assert all(isinstance(t, str) and t for t in task.train.texts[:100])


@needs_shared
def test_glue_labels_and_metrics() -> None:
    sst2, cola, mrpc, rte, stsb, wnli = (shared(n) for n in ("sst2", "cola", "mrpc", "rte", "stsb", "wnli"))
    # label balance from SOURCES.md
    assert Counter(sst2.train.labels) == {1: 37569, 0: 29780}
    assert Counter(sst2.evals["validation"].labels) == {1: 444, 0: 428}
    assert Counter(cola.train.labels) == {1: 6023, 0: 2528}
    assert Counter(mrpc.train.labels) == {1: 2473, 0: 1194}
    assert Counter(mrpc.evals["validation"].labels) == {1: 279, 0: 129}
    # rte: entailment = 0, not_entailment = 1
    assert Counter(rte.train.labels) == {0: 1249, 1: 1241}
    assert Counter(rte.evals["validation"].labels) == {0: 146, 1: 131}
    assert Counter(wnli.evals["validation"].labels) == {0: 40, 1: 31}

    assert cola.label_names == ["unacceptable", "acceptable"] and cola.metric == "matthews"
    assert sst2.label_names == ["negative", "positive"] and sst2.metric == "accuracy"
    assert mrpc.label_names == ["not_equivalent", "equivalent"] and mrpc.metric == "f1_accuracy"
    assert rte.label_names == ["entailment", "not_entailment"] and rte.num_labels == 2
    assert wnli.label_names == ["not_entailment", "entailment"]
    assert sst2.train.text_pairs is None and cola.train.text_pairs is None
    assert mrpc.train.text_pairs is not None and len(mrpc.train.text_pairs) == 3667

    assert stsb.is_regression and stsb.num_labels == 1 and stsb.label_names is None
    assert stsb.metric == "pearson_spearman"
    scores = stsb.train.labels
    assert all(isinstance(s, float) and 0.0 <= s <= 5.0 for s in scores)
    assert sum(scores) / len(scores) == pytest.approx(2.701, abs=1e-3)
    assert sum(stsb.evals["validation"].labels) / 1500 == pytest.approx(2.364, abs=1e-3)


@needs_shared
def test_glue_text_is_verbatim() -> None:
    mrpc = shared("mrpc")
    # quotes are ordinary characters (no quote swallowing), the BOM header is handled
    assert mrpc.train.texts[0].startswith("Amrozi accused his brother , whom he called \" the witness \"")
    assert mrpc.train.text_pairs[0].startswith("Referring to him as only \" the witness \"")
    cola = shared("cola")
    assert cola.train.texts[0] == "Our friends won't buy this analysis, let alone the next one we propose."


@needs_shared
def test_qnli_without_train_file_names_it() -> None:
    with pytest.raises(DataError) as err:
        shared("qnli")
    assert str(SHARED_DATA / "qnli" / "train.tsv") in str(err.value)


@needs_shared
def test_ag_news_local() -> None:
    task = shared("ag_news")
    assert task.name == "ag_news"
    assert task.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert task.metric == "accuracy" and task.num_labels == 4
    assert len(task.train) == 10001
    assert Counter(task.train.labels) == {0: 2509, 1: 2458, 2: 2496, 3: 2538}
    assert list(task.evals) == ["test"]
    test = task.evals["test"]
    assert len(test) == 7600
    assert Counter(test.labels) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    # description only: first official test row is class 3 (Business)
    assert test.labels[0] == 2
    assert test.texts[0].startswith("Unions representing workers at Turner")
    assert task.train.text_pairs is None


@needs_shared
def test_eval_split_selects_local_split() -> None:
    with mock.patch.dict(os.environ, {"FEDTUNE_DATA_DIR": str(SHARED_DATA)}):
        task = load_task_data(DataConfig(dataset="rte", eval_split="dev"))
        assert list(task.evals) == ["validation"]
        with pytest.raises(DataError, match="no labels"):
            load_task_data(DataConfig(dataset="rte", eval_split="test"))


def test_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FEDTUNE_DATA_DIR", raising=False)
    assert data_dir() is None
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path


# ----------------------------------------------------------------------------- subsets


@needs_shared
def test_train_size_is_stratified_and_deterministic() -> None:
    full = shared("sst2")
    a = shared("sst2", train_size=1000, seed=1)
    again = _fresh_sst2_subset(seed=1)
    other = _fresh_sst2_subset(seed=2)
    assert len(a.train) == 1000
    # 37569 / 67349 * 1000 = 557.8 -> 558 positive
    assert Counter(a.train.labels) == {1: 558, 0: 442}
    assert a.train == again.train
    assert a.train.texts != other.train.texts
    assert Counter(other.train.labels) == {1: 558, 0: 442}
    # rows keep their original order and come from the full set
    # (an ordered subsequence; SST-2 has duplicate sentences, so texts are not unique keys)
    rows = iter(zip(full.train.texts, full.train.labels, strict=True))
    assert all(row in rows for row in zip(a.train.texts, a.train.labels, strict=True))
    # eval untouched without eval_size
    assert len(a.evals["validation"]) == 872


def _fresh_sst2_subset(seed: int) -> TaskData:
    with mock.patch.dict(os.environ, {"FEDTUNE_DATA_DIR": str(SHARED_DATA)}):
        return load_task_data(DataConfig(dataset="sst2", train_size=1000), seed=seed)


def _write_rows(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_subsets_on_files(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": ["a", "b", "c"][i % 3] if i < 60 else "a"} for i in range(90)]
    train = _write_rows(tmp_path / "tr.csv", rows)
    ev = _write_rows(tmp_path / "ev.csv", rows[:50])
    cfg = DataConfig(dataset="files", train_file=str(train), eval_file=str(ev), train_size=30, eval_size=10)
    task = load_task_data(cfg, seed=5)
    # a: 20 + 30 = 50 of 90, b: 20, c: 20 -> 16.67, 6.67, 6.67 -> 17, 7, 6 or 17, 6, 7
    counts = Counter(task.train.labels)
    assert sum(counts.values()) == 30 and counts[0] == 17 and {counts[1], counts[2]} == {6, 7}
    ev_texts = task.evals["eval"].texts
    assert len(ev_texts) == 10 and ev_texts == sorted(ev_texts, key=lambda t: int(t[1:]))
    assert load_task_data(cfg, seed=5) == task
    # sizes above the split size keep everything, without error
    big = load_task_data(DataConfig(dataset="files", train_file=str(train), eval_file=str(ev),
                                    train_size=1000, eval_size=1000))
    assert len(big.train) == 90 and len(big.evals["eval"]) == 50


def test_regression_subset_is_random(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "score": i / 10} for i in range(40)]
    train = _write_rows(tmp_path / "tr.csv", rows)
    cfg = DataConfig(dataset="files", train_file=str(train), eval_file=str(train), label_column="score",
                     regression=True, train_size=7)
    task = load_task_data(cfg, seed=0)
    assert len(task.train) == 7 and task.is_regression and task.metric == "pearson_spearman"
    assert task.train.labels == sorted(task.train.labels)


# ----------------------------------------------------------------------------- local files

ROWS = [
    {"sentence": 'he said "hi', "other": "x1", "target": "pos"},
    {"sentence": "plain text", "other": "x2", "target": "neg"},
    {"sentence": "more, with comma", "other": "x3", "target": "pos"},
]
EVAL_ROWS = [{"sentence": "eval one", "other": "y1", "target": "neg"}]


def _write(path: Path, rows: list[dict]) -> Path:
    ext = path.suffix
    if ext == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif ext == ".tsv":  # GLUE-style: raw tabs, no quoting
        cols = list(rows[0])
        lines = ["\t".join(cols)] + ["\t".join(str(r[c]) for c in cols) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif ext == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif ext == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        raise AssertionError(ext)
    return path


def _files_cfg(train: Path, ev: Path, **kw) -> DataConfig:
    base = dict(dataset="files", train_file=str(train), eval_file=str(ev), text_column="sentence",
                label_column="target")
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_local_files_each_format(tmp_path: Path, ext: str) -> None:
    train = _write(tmp_path / f"mytask{ext}", ROWS)
    ev = _write(tmp_path / f"dev{ext}", EVAL_ROWS)
    task = load_task_data(_files_cfg(train, ev, text_pair_column="other"))
    assert task.name == "mytask"
    assert task.label_names == ["neg", "pos"]  # sorted training labels
    assert task.metric == "accuracy" and not task.is_regression and task.num_labels == 2
    assert task.train.texts == [r["sentence"] for r in ROWS]
    assert task.train.text_pairs == ["x1", "x2", "x3"]
    assert task.train.labels == [1, 0, 1]
    assert list(task.evals) == ["eval"]
    assert task.evals["eval"] == TextDataset(["eval one"], ["y1"], [0])


def test_files_json_variants(tmp_path: Path) -> None:
    columns = tmp_path / "cols.json"
    columns.write_text(json.dumps({"sentence": ["a", "b"], "target": [1, 0]}))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"sentence": "c", "target": 0}]}))
    task = load_task_data(_files_cfg(columns, wrapped))
    assert task.label_names == ["0", "1"] and task.train.labels == [1, 0]
    assert task.evals["eval"].labels == [0]


def test_files_label_names_and_ints(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 2}, {"text": "b", "label": 0}, {"text": "c", "label": 10}]
    train = _write(tmp_path / "tr.jsonl", rows)
    # inferred: integer labels sorted numerically
    task = load_task_data(DataConfig(dataset="files", train_file=str(train), eval_file=str(train)))
    assert task.label_names == ["0", "2", "10"] and task.train.labels == [1, 0, 2]
    # label_names given as words: integer labels are indices
    rows2 = [{"text": "a", "label": 1}, {"text": "b", "label": "neg"}]
    train2 = _write(tmp_path / "tr2.jsonl", rows2)
    task = load_task_data(DataConfig(dataset="files", train_file=str(train2), eval_file=str(train2),
                                     label_names=["neg", "pos"]))
    assert task.label_names == ["neg", "pos"] and task.train.labels == [1, 0]
    # label_names in an order other than sorted
    task = load_task_data(_files_cfg(_write(tmp_path / "t.csv", ROWS), _write(tmp_path / "e.csv", EVAL_ROWS),
                                     label_names=["pos", "neg"]))
    assert task.train.labels == [0, 1, 0] and task.evals["eval"].labels == [1]


def test_files_regression(tmp_path: Path) -> None:
    rows = [{"text": "a", "score": "1.5"}, {"text": "b", "score": "4"}]
    train = _write(tmp_path / "r.csv", rows)
    task = load_task_data(DataConfig(dataset="files", train_file=str(train), eval_file=str(train),
                                     label_column="score", regression=True))
    assert task.train.labels == [1.5, 4.0] and task.label_names is None and task.num_labels == 1


# ----------------------------------------------------------------------------- errors


def test_error_missing_file(tmp_path: Path) -> None:
    ev = _write(tmp_path / "dev.csv", EVAL_ROWS)
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="nope.csv: file not found"):
        load_task_data(_files_cfg(missing, ev))
    with pytest.raises(DataError, match="train_file"):
        load_task_data(DataConfig(dataset="files"))
    with pytest.raises(DataError, match="eval_file"):
        load_task_data(DataConfig(dataset="files", train_file=str(ev)))
    with pytest.raises(DataError, match="unsupported file type"):
        load_task_data(_files_cfg(tmp_path / "x.xlsx", ev))


def test_error_missing_column_lists_columns(tmp_path: Path) -> None:
    train = _write(tmp_path / "t.csv", ROWS)
    ev = _write(tmp_path / "e.csv", EVAL_ROWS)
    with pytest.raises(DataError) as err:
        load_task_data(_files_cfg(train, ev, text_column="body"))
    msg = str(err.value)
    assert "t.csv" in msg and "'body'" in msg and "text_column" in msg
    assert "'sentence', 'other', 'target'" in msg
    with pytest.raises(DataError, match="label_column"):
        load_task_data(_files_cfg(train, ev, label_column="y"))
    with pytest.raises(DataError, match="text_pair_column"):
        load_task_data(_files_cfg(train, ev, text_pair_column="zzz"))


def test_error_unknown_label_with_label_names(tmp_path: Path) -> None:
    train = _write(tmp_path / "t.csv", ROWS)
    ev = _write(tmp_path / "e.csv", EVAL_ROWS)
    with pytest.raises(DataError) as err:
        load_task_data(_files_cfg(train, ev, label_names=["pos", "neutral"]))
    msg = str(err.value)
    assert "t.csv" in msg and "row 2" in msg and "'neg'" in msg and "label_names" in msg


def test_error_eval_label_unseen_in_train(tmp_path: Path) -> None:
    train = _write(tmp_path / "t.csv", ROWS)
    ev = _write(tmp_path / "e.csv", [{"sentence": "z", "other": "z", "target": "meh"}])
    with pytest.raises(DataError) as err:
        load_task_data(_files_cfg(train, ev))
    msg = str(err.value)
    assert "e.csv" in msg and "'meh'" in msg and "row 1" in msg


@pytest.mark.parametrize("content", ["", "sentence,target\n"])
def test_error_empty_file(tmp_path: Path, content: str) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text(content)
    ev = _write(tmp_path / "e.csv", EVAL_ROWS)
    with pytest.raises(DataError, match="empty.csv.*empty"):
        load_task_data(_files_cfg(empty, ev))


def test_error_missing_label_value(tmp_path: Path) -> None:
    train = tmp_path / "t.csv"
    train.write_text("sentence,target\nok,pos\nbad,\n")
    ev = _write(tmp_path / "e.csv", EVAL_ROWS)
    with pytest.raises(DataError, match=r"t.csv, row 2: missing label in column 'target'"):
        load_task_data(_files_cfg(train, ev))
    nan_train = _write(tmp_path / "n.parquet", [{"sentence": "a", "target": 1.0}, {"sentence": "b", "target": None}])
    with pytest.raises(DataError, match="row 2: missing label"):
        load_task_data(_files_cfg(nan_train, nan_train))


def test_error_bad_regression_value(tmp_path: Path) -> None:
    train = tmp_path / "t.csv"
    train.write_text("text,label\na,1.0\nb,high\n")
    with pytest.raises(DataError, match="'high'.*not a finite number"):
        load_task_data(DataConfig(dataset="files", train_file=str(train), eval_file=str(train), regression=True))


def test_error_local_glue_bad_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rte").mkdir()
    header = "index\tsentence1\tsentence2\tlabel\n"
    (tmp_path / "rte" / "train.tsv").write_text(header + "0\ta\tb\tentailment\n1\tc\td\tmaybe\n")
    (tmp_path / "rte" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"train.tsv, line 3: label 'maybe'"):
        load_task_data(DataConfig(dataset="rte"))
    (tmp_path / "rte" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\n")
    with pytest.raises(DataError, match=r"line 2: expected 4 tab-separated fields, found 3"):
        load_task_data(DataConfig(dataset="rte"))


def test_local_mnli_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "MNLI"  # glue_data folder name works too
    folder.mkdir()
    header = "index\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    (folder / "train.tsv").write_text(header + "0\tg\tp1\th1\tneutral\tneutral\n1\tg\tp2\th2\tx\tcontradiction\n")
    (folder / "dev_matched.tsv").write_text(header + "0\tg\tp\th\te\tentailment\n")
    (folder / "dev_mismatched.tsv").write_text(header + "0\tg\tp\th\tc\tcontradiction\n")
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(tmp_path))
    task = load_task_data(DataConfig(dataset="mnli"))
    assert task.label_names == ["entailment", "neutral", "contradiction"]
    assert task.train.labels == [1, 2] and task.train.text_pairs == ["h1", "h2"]
    assert set(task.evals) == {"validation_matched", "validation_mismatched"}
    assert task.evals["validation_mismatched"].labels == [2]
    only = load_task_data(DataConfig(dataset="mnli", eval_split="validation_matched"))
    assert list(only.evals) == ["validation_matched"]


# ----------------------------------------------------------------------------- hub


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make the hub fail fast: offline mode in the environment and in the already-imported modules."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(tmp_path))  # no task folders here


@pytest.mark.parametrize(
    "dataset, hub_id",
    [("mnli", "nyu-mll/glue (config 'mnli')"), ("ag_news", "fancyzhx/ag_news"),
     ("someone/not-a-real-dataset", "someone/not-a-real-dataset")],
)
def test_hub_failure_is_clean(offline: None, dataset: str, hub_id: str) -> None:
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_task_data(DataConfig(dataset=dataset, text_column="text", label_column="label"))
    assert time.monotonic() - start < 15
    msg = str(err.value)
    assert hub_id in msg and "Hugging Face hub" in msg
    assert "FEDTUNE_DATA_DIR" in msg or 'dataset = "files"' in msg
    assert 'data.dataset = "files"' in msg


def test_datasets_loader_path_with_class_labels(offline: None, tmp_path: Path) -> None:
    """A non-GLUE id goes through datasets.load_dataset; a local folder exercises that path offline."""
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    folder = tmp_path / "myset"
    folder.mkdir()
    Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]}, features=features).to_parquet(
        str(folder / "train.parquet"))
    Dataset.from_dict({"text": ["x"], "label": [0]}, features=features).to_parquet(
        str(folder / "validation.parquet"))
    Dataset.from_dict({"text": ["y"], "label": [-1]}, features=features).to_parquet(str(folder / "test.parquet"))

    task = load_task_data(DataConfig(dataset=str(folder)))
    assert task.label_names == ["neg", "pos"] and task.metric == "accuracy"
    assert task.train == TextDataset(["a", "b", "c"], None, [1, 0, 1])
    assert task.evals == {"validation": TextDataset(["x"], None, [0])}
    with pytest.raises(DataError, match="unlabeled"):
        load_task_data(DataConfig(dataset=str(folder), eval_split="test"))
    with pytest.raises(DataError, match="split 'nope' not found; available splits: train, validation, test"):
        load_task_data(DataConfig(dataset=str(folder), eval_split="nope"))
    with pytest.raises(DataError, match="column 'body' .* available columns: 'text', 'label'"):
        load_task_data(DataConfig(dataset=str(folder), text_column="body"))


def test_csv_nan_label_is_missing_not_a_class(tmp_path: Path) -> None:
    train = tmp_path / "t.csv"
    train.write_text("sentence,target\nok,pos\nfine,neg\nodd,NaN\n")
    with pytest.raises(DataError, match=r"t.csv, row 3: missing label in column 'target' \(value 'NaN'\)"):
        load_task_data(_files_cfg(train, train))


def test_labels_are_matched_by_value_not_spelling(tmp_path: Path) -> None:
    """Training labels 1.0 / 2.0 and an eval file that writes 1: the same class, not position 1."""
    train = tmp_path / "t.csv"
    train.write_text("sentence,target\na,1.0\nb,2.0\nc,1.0\n")
    ev = tmp_path / "e.csv"
    ev.write_text("sentence,target\nx,1\ny,2\n")
    data = load_task_data(_files_cfg(train, ev))
    assert data.label_names == ["1", "2"]
    assert list(data.train.labels) == [0, 1, 0] and list(next(iter(data.evals.values())).labels) == [0, 1]
    with pytest.raises(DataError, match=r"names one value twice: \['1', '1.0'\]"):
        load_task_data(_files_cfg(train, ev, label_names=["1", "1.0", "2"]))


def test_empty_and_numeric_texts_are_kept_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One rule for texts: null is an error (above); empty and numbers are kept, and the rows are counted."""
    import logging

    train = _write(tmp_path / "t.jsonl", [{"sentence": "fine", "target": "pos"}, {"sentence": "", "target": "neg"},
                                          {"sentence": 42, "target": "pos"}, {"sentence": 7.5, "target": "neg"}])
    with caplog.at_level(logging.WARNING):
        data = load_task_data(_files_cfg(train, train))
    assert data.train.texts == ["fine", "", "42", "7.5"]
    assert "column 'sentence': 1 empty text(s) and 2 non-text value(s) read as text, of 4 rows (kept)" in caplog.text
    null = _write(tmp_path / "n.jsonl", [{"sentence": "fine", "target": "pos"}, {"sentence": None, "target": "neg"}])
    with pytest.raises(DataError, match=r"n.jsonl, row 2: missing text in column 'sentence'"):
        load_task_data(_files_cfg(null, null))


def test_list_labels_hint_at_multilabel(tmp_path: Path) -> None:
    train = _write(tmp_path / "t.jsonl", [{"sentence": "a", "target": ["x", "y"]}, {"sentence": "b", "target": ["y"]}])
    with pytest.raises(DataError, match=r't.jsonl, row 1: the label .* is a list .*need data.task = "multilabel"'):
        load_task_data(_files_cfg(train, train))
