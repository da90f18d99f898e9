"""Adaptive server optimizers on the pseudo-gradient (Reddi et al. 2021): FedAvgM, FedAdam, FedYogi, FedAdagrad."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from fedtune.lazy_import import lazy_module
from fedtune.strategies.base import BuildContext, Capabilities, option_error, register_strategy
from fedtune.strategies.fedavg import FedAvg
from fedtune.types import ClientUpdate, Metrics, ServerState, TensorDict

aggregate = lazy_module("fedtune.aggregate")
server_opt = lazy_module("fedtune.server_opt")
tensors = lazy_module("fedtune.tensors")

FIRST_MOMENT = "m"
"""ServerState.buffers entry: the server's first moment (momentum)."""
SECOND_MOMENT = "v"
"""ServerState.buffers entry: the server's second moment (adaptive optimizers)."""


@dataclass(kw_only=True)
class _FedOpt(FedAvg):
    """FedAvg's streamed weighted mean, then one server-optimizer step on g = -mean(delta)."""

    # Only the weighted mean is read, but SecAgg+ is verified (tests/runtime/flower/test_flower_secagg.py) and
    # enabled for fedavg and fedprox only so far.
    capabilities: ClassVar[Capabilities] = Capabilities(streams=True, secagg_safe=False, dp_safe=True,
                                                        client_state=False)
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
        mean, count = aggregate.mean_delta(rnd, updates)
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


# ---------------------------------------------------------------------------------------------
# [strategy] options and registration.


def _unit_interval(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise option_error(key, "in [0, 1)", value)


@dataclass(frozen=True)
class ServerLrOptions:
    """The server learning rate key, shared by the strategies that take a server step (and SCAFFOLD)."""

    server_lr: float = field(
        default=0.0,
        metadata={"help": "scaffold, fedavgm, fedadam, fedyogi, fedadagrad: server learning rate "
                          "(0 = the strategy's default: 1.0 for scaffold/fedavgm, 0.01 for the adaptive ones)."},
    )

    def __post_init__(self) -> None:
        if self.server_lr < 0:
            raise option_error("server_lr", ">= 0 (0 = default)", self.server_lr)

    def server_lr_kwargs(self) -> dict[str, float]:
        """``{"server_lr": ...}`` when set, else nothing (the strategy's own default)."""
        return {"server_lr": self.server_lr} if self.server_lr > 0 else {}


@dataclass(frozen=True)
class FedAvgMOptions(ServerLrOptions):
    """``[strategy]`` keys of fedavgm."""

    momentum: float = field(default=0.9, metadata={"help": "fedavgm: server momentum beta, in [0, 1)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _unit_interval("momentum", self.momentum)


@dataclass(frozen=True)
class FedAdagradOptions(ServerLrOptions):
    """``[strategy]`` keys of fedadagrad (and the shared part of fedadam's and fedyogi's)."""

    beta1: float = field(default=0.9, metadata={"help": "fedadam, fedyogi, fedadagrad: first-moment decay, in [0, 1)."})
    tau: float = field(default=1e-3, metadata={"help": "fedadam, fedyogi, fedadagrad: adaptivity epsilon tau (> 0)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _unit_interval("beta1", self.beta1)
        if not self.tau > 0:
            raise option_error("tau", "> 0", self.tau)


@dataclass(frozen=True)
class FedAdamOptions(FedAdagradOptions):
    """``[strategy]`` keys of fedadam and fedyogi."""

    beta2: float = field(default=0.99, metadata={"help": "fedadam, fedyogi: second-moment decay, in [0, 1)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        _unit_interval("beta2", self.beta2)


@register_strategy("fedavgm", FedAvgMOptions, FedAvgM.capabilities)
def build_fedavgm(options: FedAvgMOptions, ctx: BuildContext) -> FedAvgM:
    """``strategy.name = "fedavgm"``: ``server_lr``, ``momentum``."""
    return FedAvgM(local=ctx.local, momentum=options.momentum, **options.server_lr_kwargs())


@register_strategy("fedadam", FedAdamOptions, FedAdam.capabilities)
def build_fedadam(options: FedAdamOptions, ctx: BuildContext) -> FedAdam:
    """``strategy.name = "fedadam"``: ``server_lr``, ``beta1``, ``beta2``, ``tau``."""
    return FedAdam(local=ctx.local, beta1=options.beta1, beta2=options.beta2, tau=options.tau,
                   **options.server_lr_kwargs())


@register_strategy("fedyogi", FedAdamOptions, FedYogi.capabilities)
def build_fedyogi(options: FedAdamOptions, ctx: BuildContext) -> FedYogi:
    """``strategy.name = "fedyogi"``: ``server_lr``, ``beta1``, ``beta2``, ``tau``."""
    return FedYogi(local=ctx.local, beta1=options.beta1, beta2=options.beta2, tau=options.tau,
                   **options.server_lr_kwargs())


@register_strategy("fedadagrad", FedAdagradOptions, FedAdagrad.capabilities)
def build_fedadagrad(options: FedAdagradOptions, ctx: BuildContext) -> FedAdagrad:
    """``strategy.name = "fedadagrad"``: ``server_lr``, ``beta1``, ``tau``."""
    return FedAdagrad(local=ctx.local, beta1=options.beta1, tau=options.tau, **options.server_lr_kwargs())
