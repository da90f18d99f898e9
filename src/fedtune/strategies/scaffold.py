"""SCAFFOLD (Karimireddy et al. 2020, option II control variates): both halves in one file.

:class:`Scaffold` is the server side (it keeps ``c``); :class:`ControlVariate` is the client side,
typed data in every RoundPlan whose hooks add ``c - c_i`` to each clipped local gradient and
return the client's control change (extras :data:`CONTROL_DELTA`), in the sequential and the
batched trainer alike. ``c_i`` lives in the client's own state (:data:`SCAFFOLD_STATE`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

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
from fedtune.strategies.base import BuildContext, Capabilities, register_strategy
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.fedopt import ServerLrOptions
from fedtune.types import ClientUpdate, Metrics, RoundPlan, ServerState, TensorDict

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    torch = lazy_module("torch")
aggregate = lazy_module("fedtune.aggregate")
tensors = lazy_module("fedtune.tensors")

CONTROL = "c"
"""ServerState.buffers entry holding the server control variate c."""

CONTROL_DELTA = "scaffold_delta_c"
"""Name of the ClientUpdate extras entry carrying a SCAFFOLD client's change of control variate."""

SCAFFOLD_STATE = "scaffold_c"
"""ClientState entry holding this client's SCAFFOLD control variate c_i (zeros at first participation)."""


def scaffold_client_control(
    c_i: TensorDict, c: TensorDict, x_global: TensorDict, x_local: TensorDict, steps: int, lr: float
) -> TensorDict:
    """SCAFFOLD option II: c_i+ = c_i - c + (x_global - x_local) / (steps * lr).

    With plain SGD and the correction ``c - c_i`` on every step this is exactly the mean of the
    (clipped) minibatch gradients seen during the round.
    """
    if steps < 1 or lr <= 0:
        raise ValueError(f"SCAFFOLD control update needs steps >= 1 and lr > 0 (got {steps}, {lr})")
    inv = 1.0 / (steps * lr)
    return {k: c_i[k] - c[k] + (x_global[k] - x_local[k]) * inv for k in c_i}


def scaffold_tracks_gradients(optimizer: str) -> bool:
    """Whether SCAFFOLD's new client control is the mean clipped gradient rather than option II.

    Option II, ``(x - y_i) / (K * lr)``, is the mean gradient only when the local optimizer is
    plain SGD. Under an adaptive optimizer (AdamW) the parameter change is measured in Adam's
    normalized steps, so option II would put ``c_i`` on a different scale from the gradients it
    corrects (far larger, at small learning rates) and the correction would swamp them. There
    the client keeps the running mean of its clipped minibatch gradients directly: the quantity
    option II estimates under SGD, in the gradients' own units.
    """
    return optimizer != "sgd"


def new_client_control(grad_sum: TensorDict | None, c_i: TensorDict, c: TensorDict, x_global: TensorDict,
                       x_local: TensorDict, steps: int, lr: float) -> TensorDict:
    """SCAFFOLD's c_i+ after a round of ``steps`` local steps: the mean clipped gradient when the
    client summed its gradients (``grad_sum``, adaptive optimizers), else option II."""
    if grad_sum is not None:
        return {k: v / steps for k, v in grad_sum.items()}
    return scaffold_client_control(c_i, c, x_global, x_local, steps, lr)


@register_kind
@dataclass(frozen=True, eq=False)
class ControlVariate(ClientKind):
    """SCAFFOLD's client half: the server control variate ``c``.

    Every local step adds ``c - c_i`` to the clipped gradient (``c_i`` is the client's own control
    variate, kept in its ClientState); the client returns its control change under the extras
    name :data:`CONTROL_DELTA`.
    """

    wire = "scaffold"
    c: TensorDict

    def start(self, ctx: LocalContext) -> ClientHooks:
        """Hooks applying the correction after clipping and computing ``c_i+`` at the end."""
        return _Control(self, ctx)

    def start_stacked(self, ctx: StackedContext) -> StackedHooks:
        """The same for K clients trained together (one ``c_i`` per slot)."""
        return _StackedControl(self, ctx)


def _own_control(state, like: TensorDict, device) -> TensorDict:
    own = state.get(SCAFFOLD_STATE) or tensors.zeros_like(like)
    return {k: v.to(device) for k, v in own.items()}


class _Control(ClientHooks):
    def __init__(self, kind: ControlVariate, ctx: LocalContext) -> None:
        self.ctx = ctx
        self.c_global = {k: v.to(ctx.device) for k, v in kind.c.items()}
        self.c_own = _own_control(ctx.state, ctx.reference, ctx.device)
        self.correction = tensors.sub(self.c_global, self.c_own)
        self.grad_sum = tensors.zeros_like(self.c_own) if scaffold_tracks_gradients(ctx.local.optimizer) else None

    def after_clip(self, params: Mapping[str, nn.Parameter]) -> None:
        with torch.no_grad():
            if self.grad_sum is not None:  # (a parameter without a gradient adds nothing)
                for name, p in params.items():
                    if p.grad is not None:
                        self.grad_sum[name].add_(p.grad.float())
            for name, p in params.items():  # a parameter without gradient gets the correction alone
                if p.grad is None:
                    p.grad = self.correction[name].clone()
                else:
                    p.grad.add_(self.correction[name])

    def finish(self, result: LocalResult) -> None:
        ctx = self.ctx
        local = {k: v.to(ctx.device) for k, v in result.local.items()}
        c_new = new_client_control(self.grad_sum, self.c_own, self.c_global, ctx.reference, local, result.steps,
                                   ctx.local.lr)
        ctx.state[SCAFFOLD_STATE] = {k: v.detach().cpu() for k, v in c_new.items()}
        result.extras[CONTROL_DELTA] = {k: (c_new[k] - self.c_own[k]).detach().cpu() for k in c_new}


class _StackedControl(StackedHooks):
    def __init__(self, kind: ControlVariate, ctx: StackedContext) -> None:
        self.ctx = ctx
        names = list(ctx.reference)
        self.c_global = {n: kind.c[n].to(ctx.device) for n in names}
        self.c_own = [_own_control(st, ctx.reference, ctx.device) for st in ctx.states]
        self.correction = {n: torch.stack([self.c_global[n] - c[n] for c in self.c_own]) for n in names}
        self.grad_sum = None
        if scaffold_tracks_gradients(ctx.local.optimizer):
            k = len(ctx.client_ids)
            self.grad_sum = {n: torch.zeros((k, *ctx.reference[n].shape), device=ctx.device) for n in names}

    def after_clip(self, stacks, grads, active) -> None:
        if self.grad_sum is not None:  # inactive slots have zero gradient rows
            for n, g in grads.items():
                self.grad_sum[n].add_(g.float())
        for n, p in stacks.items():
            if p.grad is None:
                p.grad = self.correction[n].clone()
            else:
                p.grad.add_(self.correction[n])

    def finish(self, slot: int, result: LocalResult) -> None:
        ctx = self.ctx
        local = {n: v.to(ctx.device) for n, v in result.local.items()}
        own_sum = {n: g[slot] for n, g in self.grad_sum.items()} if self.grad_sum is not None else None
        c_own = self.c_own[slot]
        c_new = new_client_control(own_sum, c_own, self.c_global, ctx.reference, local, result.steps, ctx.local.lr)
        ctx.states[slot][SCAFFOLD_STATE] = {n: v.detach().cpu() for n, v in c_new.items()}
        result.extras[CONTROL_DELTA] = {n: (c_new[n] - c_own[n]).detach().cpu() for n in c_new}


@dataclass(kw_only=True)
class Scaffold(FedAvg):
    """SCAFFOLD: clients correct every local gradient by ``c - c_i``; the server keeps ``c``.

    Plans carry :class:`ControlVariate` (the server's ``c``); ``local_train``
    applies the correction and returns ``c_i+ - c_i`` under extras :data:`CONTROL_DELTA`.
    Server: ``x += server_lr * mean(delta)`` (example-weighted, as FedAvg) and
    ``c += (|S| / N) * mean(delta_c)`` (unweighted), both streamed.

    The option II control update divides by ``steps * lr``, which is exact for plain SGD
    (``train.optimizer = "sgd"``); with AdamW it is the usual heuristic.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(streams=True, secagg_safe=False, dp_safe=False,
                                                        client_state=True)
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
        mean_delta, mean_dc = aggregate.WeightedMean(), aggregate.WeightedMean()
        for update in updates:
            if CONTROL_DELTA not in update.extras:
                raise ValueError(f"round {rnd}: client {update.client_id} sent no {CONTROL_DELTA!r} "
                                 "(not a SCAFFOLD client?)")
            mean_delta.add(update.delta, float(update.num_examples))
            mean_dc.add(update.extras[CONTROL_DELTA], 1.0)
        if mean_delta.count == 0:
            raise ValueError(f"round {rnd}: no client updates to aggregate")
        params, control = aggregate.scaffold_server_step(
            state.params, state.buffers[CONTROL], mean_delta.result(), mean_dc.result(),
            num_sampled=mean_delta.count, num_clients=self.num_clients, server_lr=self.server_lr,
        )
        buffers = {**state.buffers, CONTROL: control}
        metrics = {"clients_aggregated": float(mean_delta.count), "control_norm": tensors.norm(control)}
        return ServerState(round=rnd, params=params, buffers=buffers), metrics


@register_strategy("scaffold", ServerLrOptions, Scaffold.capabilities)
def build_scaffold(options: ServerLrOptions, ctx: BuildContext) -> Scaffold:
    """``strategy.name = "scaffold"``: ``server_lr``; N is the federation's size."""
    return Scaffold(local=ctx.local, num_clients=ctx.num_clients, **options.server_lr_kwargs())
