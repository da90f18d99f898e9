"""Local training on one client: the client-side half of every strategy."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedtune import tensors
from fedtune.batching import EncodedDataset, iterate_batches
from fedtune.models import get_trainable, set_trainable
from fedtune.precision import autocast, grad_scaler
from fedtune.types import ClientState, ClientUpdate, ProxTerm, RoundPlan, TensorDict


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
    raise TypeError(f"unsupported client objective {type(objective).__name__}")


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
    reference = {k: v.to(device) for k, v in plan.params.items()}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(named.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = grad_scaler(cfg.precision, device)
    generator = torch.Generator().manual_seed(seed)
    total = planned_steps(len(data), cfg.batch_size, cfg.epochs, cfg.max_steps)
    model.train()
    step, loss_sum, prox_sum = 0, 0.0, 0.0
    while step < total:
        for batch in iterate_batches(data, cfg.batch_size, pad_id, generator):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(cfg.precision, device):
                loss = model(**batch).loss
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
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            loss_sum += float(loss.detach())
            step += 1
            if step >= total:
                break
    delta = tensors.sub(get_trainable(model), plan.params)
    metrics = {"train_loss": loss_sum / step, "steps": float(step)}
    if isinstance(plan.objective, ProxTerm):
        metrics["prox_term"] = prox_sum / step
    return ClientUpdate(client_id=client_id, delta=delta, num_examples=len(data), metrics=metrics)
