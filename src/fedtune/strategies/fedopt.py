"""Adaptive server optimizers on the pseudo-gradient (Reddi et al. 2021): FedAvgM, FedAdam, FedYogi, FedAdagrad."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fedtune import server_opt, tensors
from fedtune.aggregate import mean_delta
from fedtune.strategies.fedavg import FedAvg
from fedtune.types import ClientUpdate, Metrics, ServerState, TensorDict

FIRST_MOMENT = "m"
"""ServerState.buffers entry: the server's first moment (momentum)."""
SECOND_MOMENT = "v"
"""ServerState.buffers entry: the server's second moment (adaptive optimizers)."""


@dataclass(kw_only=True)
class _FedOpt(FedAvg):
    """FedAvg's streamed weighted mean, then one server-optimizer step on g = -mean(delta)."""

    server_lr: float = 1.0

    def _check(self) -> None:
        if not self.server_lr > 0:
            raise ValueError(f"{type(self).__name__} server_lr must be > 0, got {self.server_lr}")

    def _init_buffers(self, params: TensorDict) -> dict[str, TensorDict]:
        raise NotImplementedError

    def _step(self, params: TensorDict, grad: TensorDict, buffers: dict[str, TensorDict]):
        raise NotImplementedError

    def init(self, params: TensorDict) -> ServerState:
        """Round 0: the initial tensors and the optimizer's moments."""
        return ServerState(round=0, params=tensors.clone(params), buffers=self._init_buffers(params))

    def aggregate(self, rnd: int, state: ServerState, updates: Iterable[ClientUpdate]) -> tuple[ServerState, Metrics]:
        """Streamed example-weighted mean of deltas, then the optimizer step on its negation."""
        mean, count = mean_delta(rnd, updates)
        grad = server_opt.pseudo_gradient(mean)
        params, moments = self._step(state.params, grad, dict(state.buffers))
        metrics = {"clients_aggregated": float(count), "pseudo_grad_norm": tensors.norm(grad)}
        return ServerState(round=rnd, params=params, buffers={**state.buffers, **moments}), metrics


@dataclass(kw_only=True)
class FedAvgM(_FedOpt):
    """Server momentum: m = momentum * m + g;  x -= server_lr * m (momentum 0, lr 1 is FedAvg)."""

    momentum: float = 0.9

    def __post_init__(self) -> None:
        self._check()
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"FedAvgM momentum must be in [0, 1), got {self.momentum}")

    def _init_buffers(self, params: TensorDict) -> dict[str, TensorDict]:
        return {FIRST_MOMENT: tensors.zeros_like(params)}

    def _step(self, params, grad, buffers):
        p, m = server_opt.momentum_step(params, grad, buffers[FIRST_MOMENT], server_lr=self.server_lr, beta=self.momentum)
        return p, {FIRST_MOMENT: m}


@dataclass(kw_only=True)
class _Adaptive(_FedOpt):
    """Shared fields and checks of FedAdam, FedYogi and FedAdagrad."""

    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        self._check()
        name = type(self).__name__
        if not 0.0 <= self.beta1 < 1.0:
            raise ValueError(f"{name} beta1 must be in [0, 1), got {self.beta1}")
        if not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"{name} beta2 must be in [0, 1), got {self.beta2}")
        if not self.tau > 0:
            raise ValueError(f"{name} tau must be > 0, got {self.tau}")

    def _init_buffers(self, params: TensorDict) -> dict[str, TensorDict]:
        return {FIRST_MOMENT: tensors.zeros_like(params), SECOND_MOMENT: server_opt.init_second_moment(params, self.tau)}


@dataclass(kw_only=True)
class FedAdam(_Adaptive):
    """FedAdam: Adam (no bias correction) on the pseudo-gradient; state m, v in ServerState.buffers."""

    def _step(self, params, grad, buffers):
        p, m, v = server_opt.adam_step(params, grad, buffers[FIRST_MOMENT], buffers[SECOND_MOMENT],
                                       server_lr=self.server_lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau)
        return p, {FIRST_MOMENT: m, SECOND_MOMENT: v}


@dataclass(kw_only=True)
class FedYogi(_Adaptive):
    """FedYogi: Yogi's sign-controlled second moment on the pseudo-gradient."""

    def _step(self, params, grad, buffers):
        p, m, v = server_opt.yogi_step(params, grad, buffers[FIRST_MOMENT], buffers[SECOND_MOMENT],
                                       server_lr=self.server_lr, beta1=self.beta1, beta2=self.beta2, tau=self.tau)
        return p, {FIRST_MOMENT: m, SECOND_MOMENT: v}


@dataclass(kw_only=True)
class FedAdagrad(_Adaptive):
    """FedAdagrad: accumulated squared pseudo-gradients (beta2 unused)."""

    def _step(self, params, grad, buffers):
        p, m, v = server_opt.adagrad_step(params, grad, buffers[FIRST_MOMENT], buffers[SECOND_MOMENT],
                                          server_lr=self.server_lr, beta1=self.beta1, tau=self.tau)
        return p, {FIRST_MOMENT: m, SECOND_MOMENT: v}
