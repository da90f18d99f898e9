"""FedAvg (McMahan et al. 2017): the example-weighted mean of client updates."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from fedtune.client.kinds import ClientKind
from fedtune.lazy_import import lazy_module
from fedtune.strategies.base import BuildContext, Capabilities, NoOptions, register_strategy
from fedtune.types import ClientUpdate, LocalTrainConfig, Metrics, RoundPlan, ServerState, TensorDict

aggregate = lazy_module("fedtune.aggregate")
tensors = lazy_module("fedtune.tensors")


@dataclass
class FedAvg:
    """Average the clients' deltas weighted by their example counts; add to the global tensors."""

    capabilities: ClassVar[Capabilities] = Capabilities(streams=True, secagg_safe=True, dp_safe=True,
                                                        client_state=False)
    local: LocalTrainConfig = field(default_factory=lambda: LocalTrainConfig(1.0, 0, 5e-4, 16))

    def objective(self) -> ClientKind | None:
        """The client-side term this strategy declares (none for FedAvg)."""
        return None

    def init(self, params: TensorDict) -> ServerState:
        """Round 0 state: the initial tensors."""
        return ServerState(round=0, params=tensors.clone(params))

    def configure(self, rnd: int, state: ServerState, clients: Sequence[str]) -> RoundPlan:
        """Every client gets the global tensors, the local config and the objective."""
        return RoundPlan(round=rnd, params=state.params, local=self.local, objective=self.objective())

    def aggregate(self, rnd: int, state: ServerState, updates: Iterable[ClientUpdate]) -> tuple[ServerState, Metrics]:
        """Streamed weighted mean of deltas (memory independent of the number of clients)."""
        mean, count = aggregate.mean_delta(rnd, updates)
        new_params = tensors.add(state.params, mean)
        return ServerState(round=rnd, params=new_params, buffers=state.buffers), {"clients_aggregated": float(count)}


@register_strategy("fedavg", NoOptions, FedAvg.capabilities)
def build_fedavg(options: NoOptions, ctx: BuildContext) -> FedAvg:
    """``strategy.name = "fedavg"``."""
    return FedAvg(local=ctx.local)
