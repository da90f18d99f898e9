"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, Krum, Multi-Krum.

These rules need every update of the round at once (a median or a nearest-neighbour score cannot
be computed from a running sum), so each strategy collects the round's deltas in a list — memory
grows with the number of clients per round, unlike FedAvg. Updates are not weighted by their
self-reported example counts, which a Byzantine client could inflate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from fedtune.errors import ConfigError
from fedtune.lazy_import import lazy_module
from fedtune.strategies.base import BuildContext, Capabilities, NoOptions, option_error, register_strategy
from fedtune.strategies.fedavg import FedAvg
from fedtune.types import ClientUpdate, Metrics, ServerState, TensorDict

aggregate = lazy_module("fedtune.aggregate")
tensors = lazy_module("fedtune.tensors")


@dataclass(kw_only=True)
class _Robust(FedAvg):
    """Collect the round's deltas, apply a robust rule, add the result to the global tensors."""

    capabilities: ClassVar[Capabilities] = Capabilities(streams=False, secagg_safe=False, dp_safe=False,
                                                        client_state=False)

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


# ---------------------------------------------------------------------------------------------
# [strategy] options and registration.


@dataclass(frozen=True)
class TrimmedMeanOptions:
    """``[strategy]`` keys of trimmed_mean."""

    trim_beta: float = field(default=0.1, metadata={"help": "trimmed_mean: fraction trimmed from each end, "
                                                            "in [0, 0.5)."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.trim_beta < 0.5:
            raise option_error("trim_beta", "in [0, 0.5)", self.trim_beta)


@dataclass(frozen=True)
class KrumOptions:
    """``[strategy]`` keys of krum (and the shared part of multikrum's)."""

    krum_f: int = field(default=0, metadata={"help": "krum, multikrum: number of Byzantine clients tolerated."})

    def __post_init__(self) -> None:
        if self.krum_f < 0:
            raise option_error("krum_f", ">= 0", self.krum_f)


@dataclass(frozen=True)
class MultiKrumOptions(KrumOptions):
    """``[strategy]`` keys of multikrum."""

    krum_m: int = field(default=1, metadata={"help": "multikrum: number of best-scored updates averaged."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.krum_m < 1:
            raise option_error("krum_m", ">= 1", self.krum_m)


@register_strategy("median", NoOptions, Median.capabilities)
def build_median(options: NoOptions, ctx: BuildContext) -> Median:
    """``strategy.name = "median"``."""
    return Median(local=ctx.local)


@register_strategy("trimmed_mean", TrimmedMeanOptions, TrimmedMean.capabilities)
def build_trimmed_mean(options: TrimmedMeanOptions, ctx: BuildContext) -> TrimmedMean:
    """``strategy.name = "trimmed_mean"``: ``trim_beta``."""
    return TrimmedMean(local=ctx.local, beta=options.trim_beta)


def _check_cohort(name: str, f: int, ctx: BuildContext) -> None:
    """Krum's n >= 2f + 3 (Blanchard et al. 2017), checked when the strategy is built, before any training."""
    if ctx.clients_per_round and ctx.clients_per_round < 2 * f + 3:
        raise ConfigError(f"strategy.name = {name!r} with strategy.krum_f = {f} needs at least {2 * f + 3} clients "
                          f"per round (2f + 3), but rounds sample {ctx.clients_per_round} (partition.num_clients, "
                          "federation.clients_per_round / fraction)")


@register_strategy("krum", KrumOptions, Krum.capabilities)
def build_krum(options: KrumOptions, ctx: BuildContext) -> Krum:
    """``strategy.name = "krum"``: ``krum_f``."""
    _check_cohort("krum", options.krum_f, ctx)
    return Krum(local=ctx.local, f=options.krum_f)


@register_strategy("multikrum", MultiKrumOptions, MultiKrum.capabilities)
def build_multikrum(options: MultiKrumOptions, ctx: BuildContext) -> MultiKrum:
    """``strategy.name = "multikrum"``: ``krum_f``, ``krum_m``."""
    _check_cohort("multikrum", options.krum_f, ctx)
    if ctx.clients_per_round and options.krum_m > ctx.clients_per_round:
        raise ConfigError(f"strategy.krum_m = {options.krum_m} averages more updates than a round has "
                          f"({ctx.clients_per_round} clients per round)")
    return MultiKrum(local=ctx.local, f=options.krum_f, m=options.krum_m)
