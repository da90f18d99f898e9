"""SCAFFOLD (Karimireddy et al. 2020, option II control variates)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedtune import tensors
from fedtune.aggregate import WeightedMean, scaffold_server_step
from fedtune.strategies.fedavg import FedAvg
from fedtune.types import CONTROL_DELTA, ClientUpdate, ControlVariate, Metrics, RoundPlan, ServerState, TensorDict

CONTROL = "c"
"""ServerState.buffers entry holding the server control variate c."""


@dataclass(kw_only=True)
class Scaffold(FedAvg):
    """SCAFFOLD: clients correct every local gradient by ``c - c_i``; the server keeps ``c``.

    Plans carry :class:`~fedtune.types.ControlVariate` (the server's ``c``); ``local_train``
    applies the correction and returns ``c_i+ - c_i`` under extras :data:`~fedtune.types.CONTROL_DELTA`.
    Server: ``x += server_lr * mean(delta)`` (example-weighted, as FedAvg) and
    ``c += (|S| / N) * mean(delta_c)`` (unweighted), both streamed.

    The option II control update divides by ``steps * lr``, which is exact for plain SGD
    (``train.optimizer = "sgd"``); with AdamW it is the usual heuristic.
    """

    num_clients: int
    """N, the total number of clients in the federation (for the |S|/N control step)."""
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ValueError(f"Scaffold num_clients must be >= 1, got {self.num_clients}")
        if not self.server_lr > 0:
            raise ValueError(f"Scaffold server_lr must be > 0, got {self.server_lr}")

    def init(self, params: TensorDict) -> ServerState:
        """Round 0: the initial tensors and c = 0."""
        return ServerState(round=0, params=tensors.clone(params), buffers={CONTROL: tensors.zeros_like(params)})

    def configure(self, rnd: int, state: ServerState, clients: Sequence[str]) -> RoundPlan:
        """The global tensors plus the server control variate as the plan's objective."""
        return RoundPlan(round=rnd, params=state.params, local=self.local,
                         objective=ControlVariate(c=state.buffers[CONTROL]))

    def aggregate(self, rnd: int, state: ServerState, updates: Iterable[ClientUpdate]) -> tuple[ServerState, Metrics]:
        """Stream the deltas (example-weighted) and control deltas (unweighted) into two running means."""
        mean_delta, mean_dc = WeightedMean(), WeightedMean()
        for update in updates:
            if CONTROL_DELTA not in update.extras:
                raise ValueError(f"round {rnd}: client {update.client_id} sent no {CONTROL_DELTA!r} (not a SCAFFOLD client?)")
            mean_delta.add(update.delta, float(update.num_examples))
            mean_dc.add(update.extras[CONTROL_DELTA], 1.0)
        if mean_delta.count == 0:
            raise ValueError(f"round {rnd}: no client updates to aggregate")
        params, control = scaffold_server_step(
            state.params, state.buffers[CONTROL], mean_delta.result(), mean_dc.result(),
            num_sampled=mean_delta.count, num_clients=self.num_clients, server_lr=self.server_lr,
        )
        buffers = {**state.buffers, CONTROL: control}
        metrics = {"clients_aggregated": float(mean_delta.count), "control_norm": tensors.norm(control)}
        return ServerState(round=rnd, params=params, buffers=buffers), metrics
