"""Pure aggregation rules over client tensors. Imports only torch: no I/O, no logging, no globals."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fedtune.types import ClientUpdate, TensorDict


def mean_delta(rnd: int, updates: Iterable[ClientUpdate]) -> tuple[TensorDict, int]:
    """Streamed example-weighted mean of the updates' deltas and how many there were; error when none."""
    mean = WeightedMean()
    for update in updates:
        mean.add(update.delta, float(update.num_examples))
    if mean.count == 0:
        raise ValueError(f"round {rnd}: no client updates to aggregate")
    return mean.result(), mean.count


def weighted_mean(items: Sequence[TensorDict], weights: Sequence[float]) -> TensorDict:
    """sum_i w_i x_i / sum_i w_i, name by name (float32 accumulation)."""
    if len(items) != len(weights) or not items:
        raise ValueError(f"weighted_mean needs as many weights as items (got {len(items)} items, {len(weights)} weights)")
    acc = WeightedMean()
    for x, w in zip(items, weights, strict=True):
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



# --- Robust rules. Unlike the weighted mean these need every update of the round at once
# (a median or a nearest-neighbour score cannot be streamed), so they take a Sequence.
# They are unweighted: example counts are self-reported and a Byzantine client could inflate them.


def _check_same_names(items: Sequence[TensorDict], rule: str) -> None:
    if not items:
        raise ValueError(f"{rule} needs at least one item")
    names = items[0].keys()
    if any(x.keys() != names for x in items[1:]):
        raise KeyError(f"{rule}: all items must have the same tensor names")


def _sorted_stack(items: Sequence[TensorDict], name: str) -> torch.Tensor:
    """The items' tensor ``name`` stacked on a new dim 0 and sorted along it (float32)."""
    return torch.stack([x[name].detach().to(torch.float32) for x in items]).sort(dim=0).values


def coordinate_median(items: Sequence[TensorDict]) -> TensorDict:
    """Coordinate-wise median; with an even count, the mean of the two middle values.

    Needs all of the round's updates at once (not streamable). Exactly permutation invariant.
    """
    _check_same_names(items, "coordinate_median")
    n = len(items)
    out: TensorDict = {}
    for name in items[0]:
        s = _sorted_stack(items, name)
        out[name] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return out


def trimmed_mean(items: Sequence[TensorDict], beta: float) -> TensorDict:
    """Coordinate-wise mean after dropping the ``floor(beta * n)`` smallest and largest values.

    ``beta`` is the fraction trimmed from each end, in [0, 0.5); at least one value must remain.
    Needs all of the round's updates at once (not streamable). Exactly permutation invariant.
    """
    _check_same_names(items, "trimmed_mean")
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean beta must be in [0, 0.5), got {beta}")
    n = len(items)
    k = int(beta * n)
    out: TensorDict = {}
    for name in items[0]:
        out[name] = _sorted_stack(items, name)[k : n - k].mean(dim=0)
    return out


def pairwise_sq_distances(items: Sequence[TensorDict]) -> torch.Tensor:
    """n x n matrix of squared L2 distances between items (all tensors together), float64.

    Computed from explicit differences (not the Gram trick) so d[i, j] == d[j, i] exactly.
    """
    _check_same_names(items, "pairwise_sq_distances")
    n = len(items)
    d = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            v = sum(float((items[i][k].double() - items[j][k].double()).pow(2).sum()) for k in items[i])
            d[i, j] = d[j, i] = v
    return d


def krum_scores(items: Sequence[TensorDict], f: int) -> torch.Tensor:
    """Krum score of each item: sum of squared distances to its n - f - 2 nearest other items.

    Requires n >= 2f + 3 (Blanchard et al. 2017), so each item has at least one neighbour counted.
    """
    n = len(items)
    if f < 0:
        raise ValueError(f"krum f must be >= 0, got {f}")
    if n < 2 * f + 3:
        raise ValueError(f"krum with f={f} byzantine clients needs at least {2 * f + 3} updates, got {n}")
    d = pairwise_sq_distances(items)
    nearest = n - f - 2
    scores = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        others = torch.cat([d[i, :i], d[i, i + 1 :]]).sort().values
        scores[i] = others[:nearest].sum()
    return scores


def multi_krum_select(items: Sequence[TensorDict], f: int, m: int) -> list[int]:
    """Indices of the ``m`` items with the lowest Krum scores (ties: lower index first)."""
    n = len(items)
    if not 1 <= m <= n:
        raise ValueError(f"multi-krum m must be in [1, {n}] for {n} updates, got {m}")
    scores = krum_scores(items, f)
    order = sorted(range(n), key=lambda i: (float(scores[i]), i))
    return order[:m]


def krum(items: Sequence[TensorDict], f: int) -> TensorDict:
    """Krum (Blanchard et al. 2017): the single item closest to its n - f - 2 nearest neighbours.

    Needs all of the round's updates at once (pairwise distances; not streamable).
    """
    (i,) = multi_krum_select(items, f, 1)
    return {k: v.detach().to(torch.float32).clone() for k, v in items[i].items()}


def multi_krum(items: Sequence[TensorDict], f: int, m: int) -> TensorDict:
    """Multi-Krum: the unweighted mean of the ``m`` items with the best Krum scores (m=1 is Krum).

    Needs all of the round's updates at once (pairwise distances; not streamable).
    """
    chosen = multi_krum_select(items, f, m)
    acc = WeightedMean()
    for i in chosen:
        acc.add(items[i], 1.0)
    return acc.result()


def scaffold_server_step(
    params: TensorDict,
    control: TensorDict,
    mean_delta: TensorDict,
    mean_delta_c: TensorDict,
    *,
    num_sampled: int,
    num_clients: int,
    server_lr: float,
) -> tuple[TensorDict, TensorDict]:
    """SCAFFOLD server step: x + server_lr * mean(delta), c + (|S| / N) * mean(delta_c)."""
    if not 0 < num_sampled <= num_clients:
        raise ValueError(f"SCAFFOLD needs 0 < sampled clients <= num_clients (got {num_sampled}, {num_clients})")
    frac = num_sampled / num_clients
    new_params = {k: params[k] + server_lr * mean_delta[k].to(params[k].dtype) for k in params}
    new_control = {k: control[k] + frac * mean_delta_c[k].to(control[k].dtype) for k in control}
    return new_params, new_control
