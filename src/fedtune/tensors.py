"""Pure operations on TensorDicts (name -> tensor maps). Only torch is imported."""

from __future__ import annotations

import torch

from fedtune.types import TensorDict


def clone(a: TensorDict) -> TensorDict:
    """Deep copy, detached."""
    return {k: v.detach().clone() for k, v in a.items()}


def zeros_like(a: TensorDict) -> TensorDict:
    """A TensorDict of zeros with the same names, shapes and dtypes."""
    return {k: torch.zeros_like(v) for k, v in a.items()}


def add(a: TensorDict, b: TensorDict) -> TensorDict:
    """a + b, name by name."""
    return {k: a[k] + b[k] for k in a}


def sub(a: TensorDict, b: TensorDict) -> TensorDict:
    """a - b, name by name."""
    return {k: a[k] - b[k] for k in a}


def scale(a: TensorDict, factor: float) -> TensorDict:
    """factor * a."""
    return {k: v * factor for k, v in a.items()}


def add_scaled_(acc: TensorDict, a: TensorDict, factor: float) -> None:
    """In place: acc += factor * a (float64-free, float32 accumulation)."""
    for k, v in a.items():
        acc[k].add_(v.to(acc[k].dtype), alpha=factor)


def sq_norm(a: TensorDict) -> float:
    """Squared L2 norm over all tensors."""
    return float(sum(v.double().pow(2).sum() for v in a.values()))


def norm(a: TensorDict) -> float:
    """L2 norm over all tensors."""
    return sq_norm(a) ** 0.5


def clip_by_norm(a: TensorDict, max_norm: float) -> TensorDict:
    """Scale a so that its global L2 norm is at most max_norm."""
    n = norm(a)
    if n <= max_norm or n == 0.0:
        return a
    return scale(a, max_norm / n)


def numel(a: TensorDict) -> int:
    """Total number of elements."""
    return sum(v.numel() for v in a.values())


def all_finite(a: TensorDict) -> bool:
    """True when no tensor holds NaN or Inf."""
    return all(bool(torch.isfinite(v).all()) for v in a.values())
