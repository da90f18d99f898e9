"""Server optimizers on the pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization").

The pseudo-gradient of a round is ``g = -mean(delta)``: minus the (example-weighted) mean of the
client deltas, so plain gradient descent with lr 1 on it is FedAvg. Each step below is a pure
function of (params, g, state) returning new tensors; nothing is modified in place. State is a
TensorDict per moment (``m``, ``v``) so a strategy can keep it in ``ServerState.buffers`` and
checkpoint it. Imports only torch.

Reddi et al.'s Algorithm 2 has no bias correction and starts from ``m = 0``, ``v = tau**2``;
these functions do the same (see :func:`init_second_moment`).
"""

from __future__ import annotations

import torch

from fedtune.types import TensorDict


def pseudo_gradient(mean_delta: TensorDict) -> TensorDict:
    """g = -mean(delta): the direction the server descends."""
    return {k: -v for k, v in mean_delta.items()}


def init_second_moment(params: TensorDict, tau: float) -> TensorDict:
    """v_{-1} = tau^2 everywhere (Reddi et al. 2021, Algorithm 2)."""
    return {k: torch.full_like(v, tau * tau, dtype=torch.float32) for k, v in params.items()}


def momentum_step(
    params: TensorDict, grad: TensorDict, m: TensorDict, *, server_lr: float, beta: float
) -> tuple[TensorDict, TensorDict]:
    """FedAvgM: m = beta * m + g;  x = x - server_lr * m.  (beta = 0, lr = 1 is FedAvg.)"""
    new_m = {k: beta * m[k] + grad[k] for k in params}
    return {k: params[k] - server_lr * new_m[k] for k in params}, new_m


def _adaptive_step(params, grad, m, v, *, server_lr, beta1, tau, second_moment):
    new_m = {k: beta1 * m[k] + (1.0 - beta1) * grad[k] for k in params}
    new_v = {k: second_moment(v[k], grad[k] * grad[k]) for k in params}
    new_params = {k: params[k] - server_lr * new_m[k] / (new_v[k].sqrt() + tau) for k in params}
    return new_params, new_m, new_v


def adam_step(
    params: TensorDict, grad: TensorDict, m: TensorDict, v: TensorDict,
    *, server_lr: float, beta1: float, beta2: float, tau: float,
) -> tuple[TensorDict, TensorDict, TensorDict]:
    """FedAdam: m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  x = x - lr m / (sqrt(v) + tau)."""
    return _adaptive_step(
        params, grad, m, v, server_lr=server_lr, beta1=beta1, tau=tau,
        second_moment=lambda v_, g2: beta2 * v_ + (1.0 - beta2) * g2,
    )


def yogi_step(
    params: TensorDict, grad: TensorDict, m: TensorDict, v: TensorDict,
    *, server_lr: float, beta1: float, beta2: float, tau: float,
) -> tuple[TensorDict, TensorDict, TensorDict]:
    """FedYogi: as FedAdam but v = v - (1-b2) g^2 sign(v - g^2) (additive, sign-controlled)."""
    return _adaptive_step(
        params, grad, m, v, server_lr=server_lr, beta1=beta1, tau=tau,
        second_moment=lambda v_, g2: v_ - (1.0 - beta2) * g2 * torch.sign(v_ - g2),
    )


def adagrad_step(
    params: TensorDict, grad: TensorDict, m: TensorDict, v: TensorDict,
    *, server_lr: float, beta1: float, tau: float,
) -> tuple[TensorDict, TensorDict, TensorDict]:
    """FedAdagrad: m as FedAdam;  v = v + g^2;  x = x - lr m / (sqrt(v) + tau)."""
    return _adaptive_step(
        params, grad, m, v, server_lr=server_lr, beta1=beta1, tau=tau,
        second_moment=lambda v_, g2: v_ + g2,
    )
