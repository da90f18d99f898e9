"""The entry point :func:`load_task_data`: local files, else a local known task, else the hub."""

from __future__ import annotations

from fedtune.config import DataConfig
from fedtune.tasks.data.containers import TaskData
from fedtune.tasks.data.files import _load_files
from fedtune.tasks.data.hub import _load_hub
from fedtune.tasks.data.known_tasks import _known_task
from fedtune.tasks.data.local_layouts import _load_local_task, _local_folder, _select_eval_split
from fedtune.tasks.data.subsets import _apply_sizes


def load_task_data(cfg: DataConfig, *, seed: int = 0) -> TaskData:
    """Load the task described by ``cfg`` (see the :mod:`fedtune.tasks.data` package docstring for the resolution order).

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
