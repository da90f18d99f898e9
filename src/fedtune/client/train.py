"""Local training on one client: the ONE client runtime, the same in the simulation and on Flower.

What a client does in a round is decided by data: the RoundPlan (its tensors, ``LocalTrainConfig``,
its client-side kinds: ``objective``, ``adapter``, ``personal`` tensors, ``base_offset``) and the
task's data. The kinds carry their own behaviour (:mod:`fedtune.client.kinds`); this loop only
calls their hooks, so a new algorithm's client half needs no change here.
"""

from __future__ import annotations

import math

import torch

from fedtune import tensors
from fedtune.batching import EncodedDataset, iterate_batches
from fedtune.client.kinds import ClientHooks, LocalContext, LocalResult, plan_kinds
from fedtune.compiled import training_forward
from fedtune.memory import activation_checkpointing
from fedtune.models import get_trainable, set_trainable
from fedtune.personalization import PERSONAL_STATE_KEY
from fedtune.precision import autocast, grad_scaler
from fedtune.resident import sync_base
from fedtune.sparse_logits import causal_lm_loss
from fedtune.types import ClientState, ClientUpdate, RoundPlan, TensorDict


def planned_steps(num_examples: int, batch_size: int, epochs: float, max_steps: int) -> int:
    """Optimizer steps a client takes: ceil(epochs * batches per epoch), capped by max_steps."""
    per_epoch = math.ceil(num_examples / batch_size)
    steps = math.ceil(epochs * per_epoch) if epochs > 0 else max_steps
    return min(steps, max_steps) if max_steps > 0 else steps


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The local optimizer ``train.optimizer`` names: ``adamw`` or plain ``sgd``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown local optimizer {name!r} (expected 'adamw' or 'sgd')")


def prepare_start(model: torch.nn.Module, plan: RoundPlan, client_id: str,
                  state: ClientState) -> tuple[TensorDict, frozenset[str]]:
    """Put the model where ``client_id`` starts the round; return those tensors and the personal names.

    The frozen base gets the plan's corrections, each kind may reshape the received tensors
    (e.g. a LoRA rank below the model's), and personal tensors come from the client's own state.
    """
    kinds = plan_kinds(plan)
    sync_base(model, plan.base_offset)
    params = plan.params
    for kind in kinds:
        params = kind.prepare(params, client_id, model)
    personal = frozenset(plan.personal).union(*(k.personal_names(list(params)) for k in kinds))
    set_trainable(model, params)
    own = state.get(PERSONAL_STATE_KEY, {})
    if personal and own:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name in personal & own.keys():
                named[name].copy_(own[name])
    return params, personal


def finish_update(result: LocalResult, personal: frozenset[str], state: ClientState, num_examples: int,
                  finish) -> ClientUpdate:
    """Keep personal tensors on the client (zero change sent), run the kinds' finish hooks, build the update."""
    if personal:
        state[PERSONAL_STATE_KEY] = {k: result.local[k] for k in personal}
        result.delta.update({k: torch.zeros_like(result.delta[k]) for k in personal})
    finish(result)
    return ClientUpdate(client_id=result.client_id, delta=result.delta, num_examples=num_examples,
                        metrics=result.metrics, extras=result.extras)


def local_train(
    model: torch.nn.Module,
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


def _train(model: torch.nn.Module, data, plan: RoundPlan, client_id, *, pad_id, seed, device, state: ClientState) -> ClientUpdate:
    cfg = plan.local.at_round(plan.round)  # (the round's learning rate under a schedule)
    start, personal = prepare_start(model, plan, client_id, state)
    reference = {k: v.to(device) for k, v in start.items()}
    ctx = LocalContext(client_id=client_id, reference=reference, state=state, local=cfg, device=device)
    hooks: list[ClientHooks] = [k.start(ctx) for k in plan_kinds(plan)]
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(cfg.optimizer, named.values(), cfg.lr, cfg.weight_decay)
    scaler = grad_scaler(cfg.precision, device)
    generator = torch.Generator().manual_seed(seed)
    total = planned_steps(len(data), cfg.batch_size, cfg.epochs, cfg.max_steps)
    forward = training_forward(model, cfg.compile)
    model.train()
    with activation_checkpointing(model, cfg.gradient_checkpointing):
        step, loss_sum = 0, 0.0
        while step < total:
            for batch in iterate_batches(data, cfg.batch_size, pad_id, generator, cfg.pad_to, cfg.length_bucketing,
                                         cfg.pad_multiple, cfg.pad_limit):
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast(cfg.precision, device):  # causal LMs: logits only where the loss is taken
                    loss = causal_lm_loss(model, batch) if forward is model else None
                    if loss is None:
                        loss = forward(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"client {client_id}: loss is {float(loss)} at local step {step}")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                for h in hooks:
                    h.on_backward(named)
                for h in hooks:
                    h.before_clip(named)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(named.values(), cfg.grad_clip)
                for h in hooks:
                    h.after_clip(named)
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
    result = LocalResult(client_id=client_id, start=start, local=local, delta=tensors.sub(local, start), steps=step,
                         metrics={"train_loss": loss_sum / step, "steps": float(step)})

    def finish(r: LocalResult) -> None:
        for h in hooks:
            h.finish(r)

    return finish_update(result, personal, state, len(data), finish)
