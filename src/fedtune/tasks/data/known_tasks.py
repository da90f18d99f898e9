"""The known tasks (GLUE and AG News): local file layouts, hub ids, label names and metrics."""

from __future__ import annotations

from dataclasses import dataclass


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

    hub_evals: tuple[str, ...]
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
"""The GLUE task names, in the benchmark's order."""

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
