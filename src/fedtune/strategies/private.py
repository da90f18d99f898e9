"""DP-FedAvg as a wrapper: clip, sum, noise and average client deltas, then let the inner strategy step."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.lazy_import import lazy_module
from fedtune.strategies.base import Strategy, capabilities_of, registered_strategies
from fedtune.types import ClientUpdate, Metrics, RoundPlan, ServerState, TensorDict

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")
privacy = lazy_module("fedtune.privacy")


@dataclass
class DifferentiallyPrivate:
    """Central DP around a mean-based strategy (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad).

    Each round the client deltas are streamed into a clipped sum (L2 norm ``clip`` each), Gaussian
    noise N(0, (noise_multiplier * clip)^2) is added to the sum, and the result is divided by the
    fixed denominator ``clients_per_round``. The inner strategy then aggregates that one private
    mean as if it were a single update: whatever it does with it (a plain step, server momentum,
    Adam) is post-processing and keeps the guarantee. Epsilon at ``delta`` after each round is
    reported as ``dp_epsilon`` (RDP accountant, q = clients_per_round / num_clients).

    Only a strategy whose capabilities say ``dp_safe`` can be wrapped: not SCAFFOLD (its control
    deltas would leak unprotected), FedDyn (its server state counts the clients) or the robust rules
    (they need the individual updates).
    """

    inner: Strategy
    clip: float
    noise_multiplier: float
    delta: float
    num_clients: int
    clients_per_round: int
    seed: int = 0

    def __post_init__(self) -> None:
        privacy.check_dp_params(clip=self.clip, noise_multiplier=self.noise_multiplier, delta=self.delta)
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(
                f"privacy needs 1 <= clients_per_round <= num_clients (got {self.clients_per_round}, {self.num_clients})")
        if not capabilities_of(self.inner).dp_safe:
            safe = [n for n, s in registered_strategies().items() if s.capabilities.dp_safe]
            raise ValueError(f"differential privacy cannot wrap {type(self.inner).__name__}: it needs a rule on "
                             f"the mean of the updates (capabilities dp_safe: {', '.join(safe)})")

    @property
    def sampling_rate(self) -> float:
        """q = clients_per_round / num_clients."""
        return self.clients_per_round / self.num_clients

    def init(self, params: TensorDict) -> ServerState:
        """The inner strategy's initial state."""
        return self.inner.init(params)

    def configure(self, rnd: int, state: ServerState, clients: Sequence[str]) -> RoundPlan:
        """The inner strategy's plan (clients train as usual; privacy is applied on the server)."""
        return self.inner.configure(rnd, state, clients)

    def aggregate(self, rnd: int, state: ServerState, updates: Iterable[ClientUpdate]) -> tuple[ServerState, Metrics]:
        """Clipped, noised, fixed-denominator mean (streamed), handed to the inner strategy."""
        summed = privacy.ClippedSum(self.clip)
        for update in updates:
            summed.add(update.delta)
        if summed.total is None:
            raise ValueError(f"round {rnd}: no client updates to aggregate")
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/dp/{rnd}".encode()))
        mean = privacy.private_mean(summed.total, clip=self.clip, noise_multiplier=self.noise_multiplier,
                                    denominator=float(self.clients_per_round), generator=generator)
        state, metrics = self.inner.aggregate(rnd, state, [ClientUpdate("dp-mean", mean, 1)])
        eps = privacy.dp_epsilon(noise_multiplier=self.noise_multiplier, sampling_rate=self.sampling_rate,
                                 rounds=rnd, delta=self.delta)
        metrics = {**metrics, "clients_aggregated": float(summed.count),
                   "dp_clipped_fraction": summed.clipped / summed.count, "dp_epsilon": eps}
        return state, metrics
