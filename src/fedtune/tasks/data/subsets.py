"""Seeded ``train_size`` / ``eval_size`` subsets (stratified by label for classification)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedtune.config import DataConfig
from fedtune.tasks.data.containers import TaskData


def seeded_rng(seed: int, stream: int) -> np.random.Generator:
    """The NumPy generator of (seed, stream): every seeded draw of the data (subsets, held-out rows) uses one."""
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
    for c, q in zip(classes, quota, strict=True):
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
        train = train.subset(pick(arg, cfg.train_size, seeded_rng(seed, 0)))
    if cfg.eval_size > 0:
        evals = {
            key: split.subset(_random_indices(len(split), cfg.eval_size, seeded_rng(seed, 1 + k)))
            for k, (key, split) in enumerate(evals.items())
        }
    if train is task.train and evals is task.evals:
        return task
    return TaskData(task.name, train, evals, task.label_names, task.metric)
