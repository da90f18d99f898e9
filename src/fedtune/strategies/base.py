"""The Strategy contract (DESIGN.md): init, configure, aggregate."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from fedtune.types import ClientUpdate, Metrics, RoundPlan, ServerState, TensorDict


@runtime_checkable
class Strategy(Protocol):
    """A federated algorithm. The server loop calls these three methods and nothing else."""

    def init(self, params: TensorDict) -> ServerState:
        """The state before round 1, from the initial global trainable tensors."""
        ...

    def configure(self, rnd: int, state: ServerState, clients: Sequence[str]) -> RoundPlan:
        """The plan sent to this round's sampled clients."""
        ...

    def aggregate(
        self, rnd: int, state: ServerState, updates: Iterable[ClientUpdate]
    ) -> tuple[ServerState, Metrics]:
        """Fold the round's client updates (consumed once, as a stream) into a new state."""
        ...
