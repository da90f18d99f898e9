"""FedPer: any strategy, with some tensors (the task head) kept by each client."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from fedtune.strategies.base import Strategy
from fedtune.types import ClientUpdate, Metrics, RoundPlan, ServerState, TensorDict


@dataclass
class PersonalLayers:
    """Wraps a strategy; its plans declare ``names`` as personal (clients keep and train their own copy)."""

    inner: Strategy
    names: frozenset[str]

    def init(self, params: TensorDict) -> ServerState:
        """The inner strategy's initial state."""
        unknown = self.names - params.keys()
        if unknown:
            raise KeyError(f"personal tensors not among the trainable ones: {sorted(unknown)[:3]}")
        return self.inner.init(params)

    def configure(self, rnd: int, state: ServerState, clients: Sequence[str]) -> RoundPlan:
        """The inner plan, with the personal tensors named."""
        return replace(self.inner.configure(rnd, state, clients), personal=self.names)

    def aggregate(self, rnd: int, state: ServerState, updates: Iterable[ClientUpdate]) -> tuple[ServerState, Metrics]:
        """The inner aggregation (personal tensors arrive as zero change)."""
        return self.inner.aggregate(rnd, state, updates)
