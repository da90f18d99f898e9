"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, Krum, Multi-Krum.

These rules need every update of the round at once (a median or a nearest-neighbour score cannot
be computed from a running sum), so each strategy collects the round's deltas in a list — memory
grows with the number of clients per round, unlike FedAvg. Updates are not weighted by their
self-reported example counts, which a Byzantine client could inflate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedtune import aggregate, tensors
from fedtune.strategies.fedavg import FedAvg
from fedtune.types import ClientUpdate, Metrics, ServerState, TensorDict


@dataclass(kw_only=True)
class _Robust(FedAvg):
    """Collect the round's deltas, apply a robust rule, add the result to the global tensors."""

    def _rule(self, deltas: Sequence[TensorDict]) -> tuple[TensorDict, Metrics]:
        raise NotImplementedError

    def aggregate(self, rnd: int, state: ServerState, updates: Iterable[ClientUpdate]) -> tuple[ServerState, Metrics]:
        """Gather all deltas (inherent to the rule), combine them robustly, step the global tensors."""
        deltas = [u.delta for u in updates]
        if not deltas:
            raise ValueError(f"round {rnd}: no client updates to aggregate")
        combined, metrics = self._rule(deltas)
        new_params = tensors.add(state.params, combined)
        return ServerState(round=rnd, params=new_params, buffers=state.buffers), {
            "clients_aggregated": float(len(deltas)), **metrics}


@dataclass(kw_only=True)
class Median(_Robust):
    """Coordinate-wise median of the clients' deltas."""

    def _rule(self, deltas):
        return aggregate.coordinate_median(deltas), {}


@dataclass(kw_only=True)
class TrimmedMean(_Robust):
    """Coordinate-wise mean after trimming a fraction ``beta`` of the values from each end."""

    beta: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 0.5:
            raise ValueError(f"TrimmedMean beta must be in [0, 0.5), got {self.beta}")

    def _rule(self, deltas):
        return aggregate.trimmed_mean(deltas, self.beta), {}


@dataclass(kw_only=True)
class MultiKrum(_Robust):
    """Multi-Krum: mean of the ``m`` deltas with the best Krum scores, tolerating ``f`` Byzantine clients."""

    f: int = 0
    m: int = 1

    def __post_init__(self) -> None:
        if self.f < 0:
            raise ValueError(f"{type(self).__name__} f must be >= 0, got {self.f}")
        if self.m < 1:
            raise ValueError(f"{type(self).__name__} m must be >= 1, got {self.m}")

    def _rule(self, deltas):
        m = min(self.m, len(deltas))  # multi_krum averages exactly the m best-scored deltas
        return aggregate.multi_krum(deltas, self.f, m), {"krum_selected": float(m)}


@dataclass(kw_only=True)
class Krum(MultiKrum):
    """Krum: the single delta closest to its n - f - 2 nearest neighbours (Multi-Krum with m = 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.m != 1:
            raise ValueError(f"Krum selects one update (m = 1); use MultiKrum for m = {self.m}")
