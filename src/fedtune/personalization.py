"""Personalization: each client's own model, scored on the client's own held-out data.

Two methods, both reported as the distribution of per-client scores (mean, worst, 10th
percentile) next to the global model's scores on the same held-out data:

- ``fedper`` (Arivazhagan et al. 2019): the task head stays on each client. Plans name the
  head tensors as ``personal``; a client trains them from its own copy (kept in its state) and
  sends a zero change for them, so the server averages only the shared body.
- ``finetune`` (Per-FedAvg-style evaluation): before scoring, each client takes ``steps`` local
  steps from the global model on its own training data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from fedtune.types import TensorDict

PERSONAL_STATE_KEY = "personal"
"""Where a client keeps its personal tensors in its ClientState."""


def split_holdout(shards: Sequence[Sequence[int]], fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Split every client's shard into (train, held-out test) with a seeded shuffle.

    Each client keeps at least one training and one test row when it has two or more rows.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    train, test = [], []
    for k, shard in enumerate(shards):
        rows = list(shard)
        if len(rows) < 2:
            raise ValueError(f"client {k} has {len(rows)} rows: too few to hold any out")
        random.Random(f"{seed}/holdout/{k}").shuffle(rows)
        n_test = min(max(1, int(round(fraction * len(rows)))), len(rows) - 1)
        test.append(sorted(rows[:n_test]))
        train.append(sorted(rows[n_test:]))
    return train, test


def distribution(scores: Sequence[float]) -> dict[str, float]:
    """mean, worst (min) and 10th percentile (nearest-rank) of per-client scores."""
    if not scores:
        raise ValueError("no scores")
    ordered = sorted(scores)
    rank = max(1, math.ceil(0.10 * len(ordered)))
    return {"mean": sum(ordered) / len(ordered), "worst": ordered[0], "p10": ordered[rank - 1]}


def with_personal(params: TensorDict, personal: TensorDict | None) -> TensorDict:
    """The global tensors with a client's personal ones put in their place."""
    if not personal:
        return params
    unknown = personal.keys() - params.keys()
    if unknown:
        raise KeyError(f"personal tensors not in the model: {sorted(unknown)[:3]}")
    return {**params, **personal}


def per_client_report(
    client_ids: Sequence[str],
    score: Callable[[str, TensorDict], float],
    global_params: TensorDict,
    personal_params: Callable[[str], TensorDict],
) -> dict[str, object]:
    """Score the global model and each client's personalized model on that client's held-out data."""
    global_scores = {c: score(c, global_params) for c in client_ids}
    personal_scores = {c: score(c, personal_params(c)) for c in client_ids}
    return {
        "global": distribution(list(global_scores.values())),
        "personalized": distribution(list(personal_scores.values())),
        "per_client": {c: {"global": global_scores[c], "personalized": personal_scores[c]} for c in client_ids},
    }
