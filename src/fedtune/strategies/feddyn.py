"""FedDyn (Acar et al., ICLR 2021, "Federated Learning Based on Dynamic Regularization"): both halves in one file.

Algorithm 1 of the paper, for ``m`` clients in the federation and ``P_t`` the clients sampled in
round ``t`` (``h^0 = 0``; every client starts with ``grad L_k(theta_k^0) = 0``)::

    client k in P_t:  theta_k^t = argmin_theta  L_k(theta) - <grad L_k(theta_k^{t-1}), theta>
                                                  + alpha/2 ||theta - theta^{t-1}||^2
                      grad L_k(theta_k^t) = grad L_k(theta_k^{t-1}) - alpha (theta_k^t - theta^{t-1})
    server:           h^t     = h^{t-1} - alpha (1/m) sum_{k in P_t} (theta_k^t - theta^{t-1})
                      theta^t = (1/|P_t|) sum_{k in P_t} theta_k^t - (1/alpha) h^t

Clients outside ``P_t`` keep their state. Here:

- :class:`FedDyn` is the server half: ``h`` lives in ``ServerState.buffers`` (:data:`FEDDYN_H`,
  checkpointed with the rest); the deltas ``theta_k^t - theta^{t-1}`` are streamed into one
  running sum, so memory is O(1) in the cohort size. The mean over ``P_t`` is unweighted, as in
  Algorithm 1 (FedAvg here weights by example counts).
- :class:`DynamicRegularizer` is the client half, typed data in every RoundPlan
  (``RoundPlan.objective``): its hooks add the gradient of the two extra terms,
  ``-grad_k + alpha (theta - theta^{t-1})`` (:func:`regularizer_gradient`), to every local gradient
  before clipping, in the sequential and the batched trainer alike, and at the end of the round
  replace the client's ``grad_k`` (kept in its ClientState under :data:`FEDDYN_STATE`) by
  ``grad_k - alpha (theta_k^t - theta^{t-1})`` (:func:`feddyn_client_state`).

The ``argmin`` is approximated, as in the paper's experiments, by the round's local steps
(``[train]``: epochs, optimizer, learning rate); ``theta^{t-1}`` is the model the client received
(after a lossy ``federation.codec_down``, the decoded one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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
from fedtune.strategies.base import BuildContext, Capabilities, option_error, register_strategy
from fedtune.strategies.fedavg import FedAvg
from fedtune.types import ClientState, ClientUpdate, Metrics, ServerState, TensorDict

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    torch = lazy_module("torch")
aggregate = lazy_module("fedtune.aggregate")
tensors = lazy_module("fedtune.tensors")

FEDDYN_H = "feddyn_h"
"""ServerState.buffers entry holding the server state h (zeros before round 1)."""

FEDDYN_STATE = "feddyn_grad"
"""ClientState entry holding the client's grad L_k(theta_k^{t-1}) (zeros before its first round)."""


# ---------------------------------------------------------------------------------------------
# The maths (torch only).


def regularizer_gradient(w: torch.Tensor, w_global: torch.Tensor, grad_prev: torch.Tensor,
                         alpha: float) -> torch.Tensor:
    """Gradient in ``w`` of ``-<grad_prev, w> + alpha/2 ||w - w_global||^2``: ``alpha (w - w_global) - grad_prev``.

    Broadcasts, so a (K, ...) stack of client tensors takes an unstacked ``w_global``.
    """
    return (w - w_global).mul(alpha).sub(grad_prev)


def feddyn_client_state(grad_prev: TensorDict, local: TensorDict, start: TensorDict, alpha: float) -> TensorDict:
    """The client's new state: ``grad_k - alpha (theta_k^t - theta^{t-1})`` (Algorithm 1)."""
    return {k: grad_prev[k] - alpha * (local[k].float() - start[k].float()) for k in grad_prev}


def feddyn_server_step(params: TensorDict, h: TensorDict, mean_delta: TensorDict, num_sampled: int,
                       num_clients: int, alpha: float) -> tuple[TensorDict, TensorDict]:
    """One server step of Algorithm 1 from the unweighted mean of the round's deltas; returns (theta^t, h^t).

    ``h^t = h - alpha * (|P_t| / m) * mean_delta`` (that is ``alpha/m`` times the sum of the deltas);
    ``theta^t = theta^{t-1} + mean_delta - h^t / alpha`` (the mean of the client models minus ``h^t/alpha``).
    """
    if not 1 <= num_sampled <= num_clients:
        raise ValueError(f"FedDyn needs 1 <= clients in the round <= num_clients (got {num_sampled}, {num_clients})")
    h_new = {k: h[k] - (alpha * num_sampled / num_clients) * mean_delta[k] for k in h}
    new = {k: (params[k].float() + mean_delta[k] - h_new[k] / alpha).to(params[k].dtype) for k in params}
    return new, h_new


# ---------------------------------------------------------------------------------------------
# The client half.


@register_kind
@dataclass(frozen=True)
class DynamicRegularizer(ClientKind):
    """FedDyn's client half: minimize ``L_k(w) - <grad_k, w> + alpha/2 ||w - w_global||^2``.

    ``grad_k`` is the client's own state (:data:`FEDDYN_STATE`), updated when its round ends; the
    client reports the norm of its new ``grad_k`` as ``feddyn_grad_norm``.
    """

    wire = "feddyn"
    alpha: float

    def start(self, ctx: LocalContext) -> ClientHooks:
        """Hooks adding the regularizer's gradient before clipping and keeping ``grad_k`` at the end."""
        return _Dyn(self.alpha, ctx)

    def start_stacked(self, ctx: StackedContext) -> StackedHooks:
        """The same for K clients trained together (one ``grad_k`` per slot)."""
        return _StackedDyn(self.alpha, ctx)


def _previous_gradient(state: ClientState, like: Mapping[str, torch.Tensor]) -> TensorDict:
    """The client's grad_k (CPU float32), zeros before its first round."""
    own = state.get(FEDDYN_STATE)
    return dict(own) if own else {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in like.items()}


def _add_gradient(p: torch.Tensor, g: torch.Tensor) -> None:
    if p.grad is None:  # no gradient from the loss: the regularizer's alone
        p.grad = g.to(p.dtype).clone()
    else:
        p.grad.add_(g.to(p.grad.dtype))


def _keep_state(state: ClientState, grad_prev: TensorDict, result: LocalResult, alpha: float) -> None:
    new = feddyn_client_state(grad_prev, result.local, result.start, alpha)
    state[FEDDYN_STATE] = new
    result.metrics["feddyn_grad_norm"] = tensors.norm(new)


class _Dyn(ClientHooks):
    def __init__(self, alpha: float, ctx: LocalContext) -> None:
        self.alpha, self.ctx = alpha, ctx
        self.grad_prev = _previous_gradient(ctx.state, ctx.reference)
        self.on_device = {k: v.to(ctx.device) for k, v in self.grad_prev.items()}

    def before_clip(self, params: Mapping[str, nn.Parameter]) -> None:
        with torch.no_grad():
            for name, p in params.items():
                _add_gradient(p, regularizer_gradient(p, self.ctx.reference[name], self.on_device[name], self.alpha))

    def finish(self, result: LocalResult) -> None:
        _keep_state(self.ctx.state, self.grad_prev, result, self.alpha)


class _StackedDyn(StackedHooks):
    def __init__(self, alpha: float, ctx: StackedContext) -> None:
        self.alpha, self.ctx = alpha, ctx
        self.grad_prev = [_previous_gradient(st, ctx.reference) for st in ctx.states]
        self.stacked = {n: torch.stack([g[n] for g in self.grad_prev]).to(ctx.device) for n in ctx.reference}

    def before_clip(self, stacks, grads, active: Sequence[int]) -> None:
        # Rows of finished slots get the term too; the optimizer steps only the active ones.
        for n, p in stacks.items():
            _add_gradient(p, regularizer_gradient(p.detach(), self.ctx.reference[n], self.stacked[n], self.alpha))

    def finish(self, slot: int, result: LocalResult) -> None:
        _keep_state(self.ctx.states[slot], self.grad_prev[slot], result, self.alpha)


# ---------------------------------------------------------------------------------------------
# The server half.


@dataclass(kw_only=True)
class FedDyn(FedAvg):
    """FedDyn's server: keeps ``h``; ``theta^t`` = mean of the client models - ``h^t / alpha`` (Algorithm 1).

    Plans carry :class:`DynamicRegularizer`; ``num_clients`` is ``m``, the federation's size.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(
        streams=True,        # one running sum of deltas
        secagg_safe=False,   # needs the unweighted sum and the count, not the example-weighted mean
        dp_safe=False,       # h counts the round's clients: DP's single mean would be taken for one client
        client_state=True,   # grad_k stays on each client across rounds
    )
    num_clients: int
    """m, the total number of clients in the federation."""
    alpha: float = 0.01

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ValueError(f"FedDyn num_clients must be >= 1, got {self.num_clients}")
        if not self.alpha > 0:
            raise ValueError(f"FedDyn alpha must be > 0, got {self.alpha}")

    def objective(self) -> DynamicRegularizer:
        """The dynamic regularizer, as typed data in every RoundPlan."""
        return DynamicRegularizer(alpha=self.alpha)

    def init(self, params: TensorDict) -> ServerState:
        """Round 0: the initial tensors and h = 0."""
        return ServerState(round=0, params=tensors.clone(params),
                           buffers={FEDDYN_H: {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in params.items()}})

    def aggregate(self, rnd: int, state: ServerState, updates: Iterable[ClientUpdate]) -> tuple[ServerState, Metrics]:
        """Stream the deltas into their unweighted mean, then :func:`feddyn_server_step`."""
        mean = aggregate.WeightedMean()
        for update in updates:
            mean.add(update.delta, 1.0)
        if mean.count == 0:
            raise ValueError(f"round {rnd}: no client updates to aggregate")
        params, h = feddyn_server_step(state.params, state.buffers[FEDDYN_H], mean.result(), mean.count,
                                       self.num_clients, self.alpha)
        metrics = {"clients_aggregated": float(mean.count), "feddyn_h_norm": tensors.norm(h)}
        return ServerState(round=rnd, params=params, buffers={**state.buffers, FEDDYN_H: h}), metrics


# ---------------------------------------------------------------------------------------------
# [strategy] options and registration.


@dataclass(frozen=True)
class FedDynOptions:
    """``[strategy]`` keys of feddyn."""

    alpha: float = field(default=0.01, metadata={"help": "feddyn: dynamic regularization coefficient alpha (> 0); "
                                                         "the paper uses 0.1, 0.01 or 0.001."})

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise option_error("alpha", "> 0", self.alpha)


@register_strategy("feddyn", FedDynOptions, FedDyn.capabilities)
def build_feddyn(options: FedDynOptions, ctx: BuildContext) -> FedDyn:
    """``strategy.name = "feddyn"``: ``alpha``; m is the federation's size."""
    return FedDyn(local=ctx.local, num_clients=ctx.num_clients, alpha=options.alpha)
