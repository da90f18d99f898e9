"""Personalization: each client's own model, scored on the client's own held-out data.

Two methods, both reported as the distribution of per-client scores (mean, worst, 10th
percentile) next to the global model's scores on the same held-out data:

- ``fedper`` (Arivazhagan et al. 2019): the task head (or the tensors ``personal_layers`` names)
  stays on each client. Plans name those tensors as ``personal``; a client trains them from its own copy (kept in its state) and
  sends a zero change for them, so the server averages only the shared body.
- ``finetune`` (Per-FedAvg-style evaluation): before scoring, each client takes ``steps`` local
  steps from the global model on its own training data.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from fedtune.errors import ConfigError
from fedtune.types import ClientScore

PERSONAL_STATE_KEY = "personal"
"""Where a client keeps its personal tensors in its ClientState."""


def personal_tensor_names(trainable: Sequence[str], head: frozenset[str], patterns: Sequence[str]) -> frozenset[str]:
    """FedPer's personal tensors: trainable names containing one of ``patterns``, else the ``head``.

    An empty result is an error (FedPer would silently be the plain strategy), as is a pattern
    that matches nothing (a typo).
    """
    if not patterns:
        if not head:
            raise ConfigError("personalization.method = 'fedper' keeps the task head on each client, but this "
                              "model trains no head tensors (e.g. a causal LM with LoRA); name the tensors to keep "
                              "with personalization.personal_layers, e.g. ['layers.4.'] for a last block's adapters")
        return head
    unmatched = [p for p in patterns if not any(p in n for n in trainable)]
    if unmatched:
        raise ConfigError(f"personalization.personal_layers {unmatched} match no trainable tensor "
                          f"(e.g. {list(trainable)[:2]})")
    names = frozenset(n for n in trainable if any(p in n for p in patterns))
    if names == frozenset(trainable):
        raise ConfigError(f"personalization.personal_layers {list(patterns)} match every trainable tensor: "
                          "nothing would be shared")
    return names


def split_holdout(shards: Sequence[Sequence[int]], fraction: float, seed: int,
                  ids: Sequence[str] | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Split every client's shard into (train, held-out test) with a shuffle seeded by (seed, client id).

    ``ids[k]`` names shard k's client (its position when None): a node holding one shard draws the
    same split as the simulation. Each client keeps at least one training and one test row.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    train, test = [], []
    for k, shard in enumerate(shards):
        rows = list(shard)
        if len(rows) < 2:
            raise ValueError(f"client {ids[k] if ids is not None else k} has {len(rows)} rows: too few to hold any out")
        random.Random(f"{seed}/holdout/{ids[k] if ids is not None else k}").shuffle(rows)
        n_test = min(max(1, int(round(fraction * len(rows)))), len(rows) - 1)
        test.append(sorted(rows[:n_test]))
        train.append(sorted(rows[n_test:]))
    return train, test


def distribution(scores: Sequence[float], higher_is_better: bool = True) -> dict[str, float]:
    """mean, worst and 10th-worst-percentile (nearest-rank) of per-client scores (worst: min, or max when
    lower is better, e.g. perplexity)."""
    if not scores:
        raise ValueError("no scores")
    ordered = sorted(scores, reverse=not higher_is_better)
    rank = max(1, math.ceil(0.10 * len(ordered)))
    return {"mean": sum(ordered) / len(ordered), "worst": ordered[0], "p10": ordered[rank - 1]}


def per_client_report(scores: Sequence[ClientScore], higher_is_better: bool = True) -> dict[str, Any]:
    """The distribution of the clients' global and personalized scores on their own held-out rows."""
    # (a summary.json section: "global" / "personalized" are distributions, "per_client" maps clients to scores)
    ordered = sorted(scores, key=lambda s: s.client_id)
    return {
        "global": distribution([s.scores["global"] for s in ordered], higher_is_better),
        "personalized": distribution([s.scores["personalized"] for s in ordered], higher_is_better),
        "per_client": {s.client_id: {"global": s.scores["global"], "personalized": s.scores["personalized"]}
                       for s in ordered},
    }
