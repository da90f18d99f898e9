"""FedProx (Li et al. 2020): FedAvg whose clients add a proximal term to their loss.

One file, both halves: :class:`FedProx` is the server side (FedAvg's aggregation);
:class:`ProxTerm` is the client side, typed data in every RoundPlan whose hooks add
``mu * (w - w_global)`` to each local gradient, in the sequential and the batched trainer alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedtune.client.kinds import (
    ClientHooks,
    ClientKind,
    LocalContext,
    LocalResult,
    StackedContext,
    StackedHooks,
    register_kind,
)
from fedtune.lazy_import import lazy_module
from fedtune.strategies.base import BuildContext, option_error, register_strategy
from fedtune.strategies.fedavg import FedAvg

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    torch = lazy_module("torch")


@register_kind
@dataclass(frozen=True)
class ProxTerm(ClientKind):
    """FedProx's client half: add ``mu / 2 * ||w - w_global||^2`` to the local loss."""

    wire = "prox"
    mu: float

    def start(self, ctx: LocalContext) -> ClientHooks:
        """Hooks adding the term's gradient before clipping; reports its mean value as ``prox_term``."""
        return _Prox(self.mu, ctx.reference)

    def start_stacked(self, ctx: StackedContext) -> StackedHooks:
        """The same term for K clients trained together (one value per slot)."""
        return _StackedProx(self.mu, ctx.reference, len(ctx.client_ids))


class _Prox(ClientHooks):
    def __init__(self, mu: float, reference) -> None:
        self.mu, self.reference, self.total = mu, reference, 0.0

    def before_clip(self, params: Mapping[str, nn.Parameter]) -> None:
        if self.mu == 0.0:
            return
        value = 0.0
        with torch.no_grad():
            for name, p in params.items():
                diff = p - self.reference[name]
                value += float(diff.pow(2).sum())
                if p.grad is not None:
                    p.grad.add_(diff, alpha=self.mu)  # d/dw of mu/2 ||w - w_g||^2
        self.total += 0.5 * self.mu * value

    def finish(self, result: LocalResult) -> None:
        result.metrics["prox_term"] = self.total / result.steps


class _StackedProx(StackedHooks):
    def __init__(self, mu: float, reference, k: int) -> None:
        self.mu, self.reference, self.totals = mu, reference, [0.0] * k

    def before_clip(self, stacks, grads, active: Sequence[int]) -> None:
        if self.mu == 0.0:
            return
        value = None
        for n, g in grads.items():
            diff = stacks[n].detach() - self.reference[n]
            part = diff.pow(2).flatten(1).sum(1).double()
            value = part if value is None else value + part
            g.add_(diff, alpha=self.mu)
        if value is not None:
            for i in active:
                self.totals[i] += 0.5 * self.mu * float(value[i])

    def finish(self, slot: int, result: LocalResult) -> None:
        result.metrics["prox_term"] = self.totals[slot] / result.steps


@dataclass
class FedProx(FedAvg):
    """FedAvg aggregation; each client minimizes loss + mu/2 * ||w - w_global||^2 (its :class:`ProxTerm`)."""

    mu: float = 0.01

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {self.mu}")

    def objective(self) -> ProxTerm:
        """The proximal term, as typed data in every RoundPlan."""
        return ProxTerm(mu=self.mu)


@dataclass(frozen=True)
class FedProxOptions:
    """``[strategy]`` keys of fedprox."""

    mu: float = field(default=0.0, metadata={"help": "fedprox: proximal coefficient mu (>= 0)."})

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise option_error("mu", ">= 0", self.mu)


@register_strategy("fedprox", FedProxOptions, FedProx.capabilities)
def build_fedprox(options: FedProxOptions, ctx: BuildContext) -> FedProx:
    """``strategy.name = "fedprox"``, ``strategy.mu``."""
    return FedProx(local=ctx.local, mu=options.mu)
