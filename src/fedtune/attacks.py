"""Byzantine clients: who attacks, and what their updates or labels become.

Update attacks change what a malicious client sends (the honest training still happens):
``sign_flip`` sends -scale·delta, ``scale`` sends scale·delta, ``noise`` sends Gaussian noise
with standard deviation ``noise_std`` in place of the delta. ``label_flip`` poisons the data
instead: class y becomes (num_labels - 1 - y) on the malicious clients' shards.

An attack is client-side behaviour, applied where the client runs: the simulation's transport and
the Flower ClientApp both call :func:`poison_rows` on the client's training rows and
:func:`byzantine_update` on its update before it is encoded, with the same seeds. Who attacks comes
from the experiment's ``[attack]`` (:func:`experiment_attacker`, the same draw everywhere) or, on a
SuperNode, from its own node config (``attack = "sign_flip"`` ...: a node the server knows nothing about).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from fedtune.batching import EncodedDataset
from fedtune.types import ClientUpdate

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


def attack_seed(seed: int, rnd: int, client_id: str) -> int:
    """The seed of a client's attack noise in a round (the same in every runtime)."""
    return zlib.crc32(f"{seed}/{rnd}/{client_id}/attack".encode())


def byzantine_update(update: ClientUpdate, attack: Attack | None, seed: int, rnd: int) -> ClientUpdate:
    """What a client sends: ``update`` itself, or its attacked version under an update attack."""
    if attack is None or attack.kind not in UPDATE_ATTACKS:
        return update
    return attack_update(update, attack, attack_seed(seed, rnd, update.client_id))


def poison_rows(rows: EncodedDataset, attack: Attack | None, num_labels: int) -> EncodedDataset:
    """A client's training rows: as they are, or label-flipped under ``label_flip``."""
    if attack is None or attack.kind not in DATA_ATTACKS:
        return rows
    if num_labels < 2:
        raise ValueError("label_flip needs a classification task with class labels")
    return flip_labels(rows, num_labels)


def experiment_attack(cfg) -> Attack | None:
    """The attack an ``[attack]`` section describes (None for ``kind = "none"``)."""
    return None if cfg.kind == "none" else Attack(cfg.kind, cfg.scale, cfg.noise_std)


def experiment_attacker(cfg, client_id: str, num_clients: int, seed: int) -> Attack | None:
    """``client_id``'s attack under the experiment's ``[attack]``: listed in ``clients``, or drawn by ``fraction``.

    The draw is :func:`malicious_clients` over the partition's ids (``client_000`` ...), so a
    SuperNode decides alone exactly as the simulation decides for that client.
    """
    attack = experiment_attack(cfg)
    if attack is None:
        return None
    if cfg.clients:
        return attack if client_id in cfg.clients else None
    from fedtune.partition import client_ids

    return attack if client_id in malicious_clients(client_ids(num_clients), cfg.fraction, [], seed) else None
