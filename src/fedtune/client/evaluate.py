"""Client-side scoring: a client scores a model on its own rows, the same in the simulation and on a node.

Three things a server asks a client to score, all answered by :func:`client_scores`:

- the **global** model of a round's plan (what the client would train from, without its own
  personal tensors) on its held-out rows: federated evaluation (``eval.federated``);
- the same on its **training** rows: per-client evaluation (``eval.per_client``);
- its **personalized** model beside the global one (``[personalization]``): the global model with
  its own personal tensors (FedPer's head, FedSA's B), or the global model fine-tuned for a few
  local steps (``finetune``).

Rows never leave the client; only the scores and the number of rows travel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fedtune.batching import EncodedDataset
from fedtune.client.kinds import plan_kinds
from fedtune.client.train import local_train, prepare_start
from fedtune.models import set_trainable
from fedtune.resident import sync_base
from fedtune.types import ClientState, RoundPlan

HELD_OUT, TRAIN = "held_out", "train"
"""Which of its rows a client scores."""


@dataclass(frozen=True)
class ScoreRequest:
    """What the server asks a client to score (typed data; travels with the plan)."""

    rows: str = HELD_OUT
    """``held_out`` or ``train``."""
    personalization: str = "none"
    """``none`` (the global model only), ``fedper`` (also with the client's own personal tensors),
    ``finetune`` (also after ``finetune_steps`` local steps from the global model)."""
    finetune_steps: int = 0


def global_start(model: torch.nn.Module, plan: RoundPlan, client_id: str) -> None:
    """Put the plan's global model (as this client receives it, its own personal tensors left out) in ``model``."""
    sync_base(model, plan.base_offset)
    params = plan.params
    for kind in plan_kinds(plan):
        params = kind.prepare(params, client_id, model)
    set_trainable(model, params)


def client_scores(model: torch.nn.Module, task, plan: RoundPlan, client_id: str, request: ScoreRequest, *,
                  train_rows: EncodedDataset, held_out: EncodedDataset | None, state: ClientState, ctx,
                  seed: int) -> dict[str, float]:
    """The client's scores (``global``, and ``personalized`` when asked) with the task's headline metric.

    ``state`` is read, never changed (a fine-tuning run works on a copy). ``seed`` seeds the
    fine-tuning steps exactly as a training round of the plan's round would.
    """
    rows = train_rows if request.rows == TRAIN else held_out
    if rows is None or len(rows) == 0:
        raise ValueError(f"client {client_id} holds no {request.rows} rows to score")
    global_start(model, plan, client_id)
    scores = {"global": task.score_rows(model, rows, ctx)}
    if request.personalization == "fedper":
        prepare_start(model, plan, client_id, state)  # the global model with the client's own personal tensors
        scores["personalized"] = task.score_rows(model, rows, ctx)
    elif request.personalization == "finetune":
        local = dataclasses.replace(plan.local, epochs=0.0, max_steps=request.finetune_steps)
        local_train(model, train_rows, dataclasses.replace(plan, local=local, objective=None), client_id,
                    pad_id=ctx.pad_id, seed=seed, device=ctx.device, state={})  # (leaves the model trained)
        scores["personalized"] = task.score_rows(model, rows, ctx)
    return scores
