"""Byzantine clients for the simulation: who attacks, and what their updates or labels become.

Update attacks change what a malicious client sends (the honest training still happens):
``sign_flip`` sends -scale·delta, ``scale`` sends scale·delta, ``noise`` sends Gaussian noise
with standard deviation ``noise_std`` in place of the delta. ``label_flip`` poisons the data
instead: class y becomes (num_labels - 1 - y) on the malicious clients' shards.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from fedtune.batching import EncodedDataset
from fedtune.payload import CommStats
from fedtune.types import ClientUpdate, RoundPlan

UPDATE_ATTACKS = ("sign_flip", "scale", "noise")
DATA_ATTACKS = ("label_flip",)


@dataclass(frozen=True)
class Attack:
    """What malicious clients do (see the module docstring)."""

    kind: str
    scale: float = 1.0
    noise_std: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in UPDATE_ATTACKS + DATA_ATTACKS:
            raise ValueError(f"unknown attack {self.kind!r}; choose from {list(UPDATE_ATTACKS + DATA_ATTACKS)}")


def malicious_clients(client_ids: Sequence[str], fraction: float, explicit: Sequence[str], seed: int) -> list[str]:
    """The attackers: ``explicit`` ids when given (each must exist), else round(fraction·n) drawn by seed."""
    if explicit:
        unknown = sorted(set(explicit) - set(client_ids))
        if unknown:
            raise ValueError(f"attack.clients names unknown clients {unknown}; clients are {list(client_ids)[:5]}...")
        return [c for c in client_ids if c in set(explicit)]
    k = int(round(fraction * len(client_ids)))
    chosen = set(random.Random(f"{seed}/attack").sample(list(client_ids), k))
    return [c for c in client_ids if c in chosen]


def attack_update(update: ClientUpdate, attack: Attack, seed: int) -> ClientUpdate:
    """The update a malicious client sends instead of ``update`` (extras and counts unchanged)."""
    if attack.kind == "sign_flip":
        delta = {k: v * -attack.scale for k, v in update.delta.items()}
    elif attack.kind == "scale":
        delta = {k: v * attack.scale for k, v in update.delta.items()}
    elif attack.kind == "noise":
        g = torch.Generator().manual_seed(seed)
        delta = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * attack.noise_std for k, v in update.delta.items()}
    else:
        raise ValueError(f"{attack.kind} is not an update attack")
    return replace(update, delta=delta)


def flip_labels(data: EncodedDataset, num_labels: int) -> EncodedDataset:
    """Label-flipping poison: class y -> num_labels - 1 - y."""
    if data.labels.is_floating_point():
        raise ValueError("label_flip needs class labels, not regression targets")
    return replace(data, labels=(num_labels - 1) - data.labels)


class AttackedTransport:
    """Wraps a transport; updates from the malicious clients are replaced as the attack says."""

    def __init__(self, inner, malicious: Sequence[str], attack: Attack, seed: int) -> None:
        self.inner = inner
        self.malicious = set(malicious)
        self.attack = attack
        self.seed = seed

    @property
    def client_states(self):
        """The inner transport's per-client states."""
        return self.inner.client_states

    def score_round(self, plan: RoundPlan, clients: Sequence[str], request, stats: CommStats):
        """Clients' scores of a model, from the inner transport (an attack changes updates, not scores)."""
        return self.inner.score_round(plan, clients, request, stats)

    def run_round(self, plan: RoundPlan, clients: Sequence[str], stats: CommStats) -> Iterator[ClientUpdate]:
        """The inner transport's updates, with the malicious ones attacked."""
        for update in self.inner.run_round(plan, clients, stats):
            if update.client_id in self.malicious:
                seed = zlib.crc32(f"{self.seed}/{plan.round}/{update.client_id}/attack".encode())
                update = attack_update(update, self.attack, seed)
            yield update
