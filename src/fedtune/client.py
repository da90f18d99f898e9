"""Local training on one client: the client-side half of every strategy."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedtune import tensors
from fedtune.batching import EncodedDataset, iterate_batches
from fedtune.models import get_trainable, set_trainable
from fedtune.personalization import PERSONAL_STATE_KEY
from fedtune.precision import autocast, grad_scaler
from fedtune.compiled import training_forward
from fedtune.types import CONTROL_DELTA, ClientState, ClientUpdate, ControlVariate, ProxTerm, RoundPlan, TensorDict

SCAFFOLD_STATE = "scaffold_c"
"""ClientState entry holding this client's SCAFFOLD control variate c_i (zeros at first participation)."""


def planned_steps(num_examples: int, batch_size: int, epochs: float, max_steps: int) -> int:
    """Optimizer steps a client takes: ceil(epochs * batches per epoch), capped by max_steps."""
    per_epoch = math.ceil(num_examples / batch_size)
    steps = math.ceil(epochs * per_epoch) if epochs > 0 else max_steps
    return min(steps, max_steps) if max_steps > 0 else steps


def _apply_objective_to_grads(
    objective, params: dict[str, nn.Parameter], reference: TensorDict
) -> float:
    """Add the gradient of the declared client objective; return its value (for logging)."""
    if objective is None:
        return 0.0
    if isinstance(objective, ProxTerm):
        if objective.mu == 0.0:
            return 0.0
        value = 0.0
        with torch.no_grad():
            for name, p in params.items():
                diff = p - reference[name]
                value += float(diff.pow(2).sum())
                if p.grad is not None:
                    p.grad.add_(diff, alpha=objective.mu)  # d/dw of mu/2 ||w - w_g||^2
        return 0.5 * objective.mu * value
    if isinstance(objective, ControlVariate):
        return 0.0  # applied after gradient clipping, see _add_correction
    raise TypeError(f"unsupported client objective {type(objective).__name__}")


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


def _add_correction(params: dict[str, nn.Parameter], correction: TensorDict) -> None:
    """grad += correction (SCAFFOLD's c - c_i); a parameter without gradient gets the correction alone."""
    with torch.no_grad():
        for name, p in params.items():
            if p.grad is None:
                p.grad = correction[name].clone()
            else:
                p.grad.add_(correction[name])


def new_client_control(grad_sum: TensorDict | None, c_i: TensorDict, c: TensorDict, x_global: TensorDict,
                       x_local: TensorDict, steps: int, lr: float) -> TensorDict:
    """SCAFFOLD's c_i+ after a round of ``steps`` local steps: the mean clipped gradient when the
    client summed its gradients (``grad_sum``, adaptive optimizers), else option II."""
    if grad_sum is not None:
        return {k: v / steps for k, v in grad_sum.items()}
    return scaffold_client_control(c_i, c, x_global, x_local, steps, lr)


def _accumulate_gradients(total: TensorDict, params: dict[str, nn.Parameter]) -> None:
    """total += each parameter's current gradient (a parameter without one adds nothing)."""
    with torch.no_grad():
        for name, p in params.items():
            if p.grad is not None:
                total[name].add_(p.grad.float())


def _load_subset(model: nn.Module, params: TensorDict) -> None:
    """Copy some of the trainable tensors (e.g. a client's personal head) into the model."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            own[name].copy_(value)


def _make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown local optimizer {name!r} (expected 'adamw' or 'sgd')")


def local_train(
    model: nn.Module,
    data: EncodedDataset,
    plan: RoundPlan,
    client_id: str,
    *,
    pad_id: int,
    seed: int,
    device: torch.device,
    state: ClientState | None = None,
) -> ClientUpdate:
    """Load the plan's tensors, train on ``data`` as the plan says, return the change (delta).

    ``state`` is this client's own persistent memory across rounds (e.g. SCAFFOLD's control
    variate, a codec's error-feedback residual). It lives with the client — the simulation keeps
    one per client id, a Flower ClientApp keeps it in its context — and is never sent as a whole.

    ``seed`` fixes both the data order and the dropout masks, so a client's update depends only on
    (plan, data, seed): the same in any process, in any order of clients.
    """
    if len(data) == 0:
        raise ValueError(f"client {client_id} has no training examples")
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _train(model, data, plan, client_id, pad_id=pad_id, seed=seed, device=device,
                      state=state if state is not None else {})


def _train(model, data, plan, client_id, *, pad_id, seed, device, state: ClientState) -> ClientUpdate:
    cfg = plan.local
    set_trainable(model, plan.params)
    if plan.personal and PERSONAL_STATE_KEY in state:
        _load_subset(model, state[PERSONAL_STATE_KEY])
    reference = {k: v.to(device) for k, v in plan.params.items()}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = _make_optimizer(cfg.optimizer, named.values(), cfg.lr, cfg.weight_decay)
    control = plan.objective if isinstance(plan.objective, ControlVariate) else None
    if control is not None:
        c_global = {k: v.to(device) for k, v in control.c.items()}
        c_own = state.get(SCAFFOLD_STATE) or tensors.zeros_like(reference)
        c_own = {k: v.to(device) for k, v in c_own.items()}
        correction = tensors.sub(c_global, c_own)
        grad_sum = tensors.zeros_like(c_own) if scaffold_tracks_gradients(cfg.optimizer) else None
    scaler = grad_scaler(cfg.precision, device)
    generator = torch.Generator().manual_seed(seed)
    total = planned_steps(len(data), cfg.batch_size, cfg.epochs, cfg.max_steps)
    forward = training_forward(model, cfg.compile)
    model.train()
    step, loss_sum, prox_sum = 0, 0.0, 0.0
    while step < total:
        for batch in iterate_batches(data, cfg.batch_size, pad_id, generator, cfg.pad_to, cfg.length_bucketing):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(cfg.precision, device):
                loss = forward(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"client {client_id}: loss is {float(loss)} at local step {step}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            prox_sum += _apply_objective_to_grads(plan.objective, named, reference)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(named.values(), cfg.grad_clip)
            if control is not None:
                if grad_sum is not None:
                    _accumulate_gradients(grad_sum, named)
                _add_correction(named, correction)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            loss_sum += float(loss.detach())
            step += 1
            if step >= total:
                break
    local = get_trainable(model)
    delta = tensors.sub(local, plan.params)
    if plan.personal:
        # Personal tensors stay here: keep the trained copy, send no change for them.
        state[PERSONAL_STATE_KEY] = {k: local[k] for k in plan.personal}
        delta.update({k: torch.zeros_like(delta[k]) for k in plan.personal})
    metrics = {"train_loss": loss_sum / step, "steps": float(step)}
    if isinstance(plan.objective, ProxTerm):
        metrics["prox_term"] = prox_sum / step
    extras: dict[str, TensorDict] = {}
    if control is not None:
        local_dev = {k: v.to(device) for k, v in local.items()}
        c_new = new_client_control(grad_sum, c_own, c_global, reference, local_dev, step, cfg.lr)
        state[SCAFFOLD_STATE] = {k: v.detach().cpu() for k, v in c_new.items()}
        extras[CONTROL_DELTA] = {k: (c_new[k] - c_own[k]).detach().cpu() for k in c_new}
    return ClientUpdate(client_id=client_id, delta=delta, num_examples=len(data), metrics=metrics, extras=extras)
