"""Loading a task from the Hugging Face hub (``datasets.load_dataset``)."""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.config import DataConfig
from fedtune.tasks.data.containers import DataError, TaskData
from fedtune.tasks.data.files import _column, _texts
from fedtune.tasks.data.known_tasks import _TaskSpec
from fedtune.tasks.data.labels import _is_missing, _RawSplit, _resolve_labels
from fedtune.tasks.data.local_layouts import data_dir


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
