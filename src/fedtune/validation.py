"""Checks on client updates before they reach aggregation: reject, name the client, keep going."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import torch

from fedtune.types import ClientUpdate, TensorDict

log = logging.getLogger(__name__)


def update_problem(update: ClientUpdate, reference: TensorDict) -> str | None:
    """Why ``update`` cannot be aggregated against the global tensors, or None when it can.

    The delta and every extras entry (e.g. SCAFFOLD's control delta) must match the global
    tensors name for name and shape for shape, in a floating point dtype, with no NaN or Inf.
    """
    problem = _tensors_problem(update.delta, reference, "")
    if problem is not None:
        return problem
    for key, extra in update.extras.items():
        if not isinstance(extra, dict):
            return f"extras[{key!r}] is a {type(extra).__name__}, not a dict of tensors"
        problem = _tensors_problem(extra, reference, f"extras[{key!r}]: ")
        if problem is not None:
            return problem
    if not update.num_examples > 0:
        return f"num_examples is {update.num_examples}"
    return None


def _tensors_problem(tensors: TensorDict, reference: TensorDict, where: str) -> str | None:
    missing = reference.keys() - tensors.keys()
    extra = tensors.keys() - reference.keys()
    if missing:
        return f"{where}missing tensors {sorted(missing)[:3]}"
    if extra:
        return f"{where}unexpected tensors {sorted(extra)[:3]}"
    for name, ref in reference.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            return f"{where}tensor {name} is a {type(t).__name__}, not a tensor"
        if t.shape != ref.shape:
            return f"{where}tensor {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
        if not t.is_floating_point():
            return f"{where}tensor {name} has dtype {t.dtype}, expected a floating point dtype"
        if not bool(torch.isfinite(t).all()):
            return f"{where}tensor {name} contains NaN or Inf"
    return None


def accepted_updates(
    updates: Iterable[ClientUpdate],
    reference: TensorDict,
    on_reject: Callable[[ClientUpdate, str], None] | None = None,
) -> Iterator[ClientUpdate]:
    """Pass valid updates through; report each rejected one (client and reason) and drop it."""
    for update in updates:
        problem = update_problem(update, reference)
        if problem is None:
            yield update
            continue
        log.warning("rejected update from %s: %s", update.client_id, problem)
        if on_reject is not None:
            on_reject(update, problem)
