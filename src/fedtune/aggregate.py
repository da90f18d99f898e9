"""Pure aggregation rules over client tensors. Imports only torch: no I/O, no logging, no globals."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fedtune.types import TensorDict


def weighted_mean(items: Sequence[TensorDict], weights: Sequence[float]) -> TensorDict:
    """sum_i w_i x_i / sum_i w_i, name by name (float32 accumulation)."""
    if len(items) != len(weights) or not items:
        raise ValueError(f"weighted_mean needs as many weights as items (got {len(items)} items, {len(weights)} weights)")
    acc = WeightedMean()
    for x, w in zip(items, weights):
        acc.add(x, w)
    return acc.result()


class WeightedMean:
    """Streaming weighted mean: memory is one TensorDict whatever the number of clients."""

    def __init__(self) -> None:
        self._sum: TensorDict | None = None
        self._total = 0.0
        self.count = 0

    def add(self, x: TensorDict, weight: float) -> None:
        """Fold one client's tensors in with ``weight`` (> 0)."""
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        if self._sum is None:
            self._sum = {k: v.detach().to(torch.float32).mul(weight) for k, v in x.items()}
        else:
            if x.keys() != self._sum.keys():
                raise KeyError("all items must have the same tensor names")
            for k, v in x.items():
                self._sum[k].add_(v.to(torch.float32), alpha=weight)
        self._total += weight
        self.count += 1

    @property
    def total_weight(self) -> float:
        """Sum of the weights folded in so far."""
        return self._total

    def result(self) -> TensorDict:
        """The mean of everything added; an error when nothing was."""
        if self._sum is None:
            raise ValueError("no items to average")
        return {k: v / self._total for k, v in self._sum.items()}

