"""The typed data that crosses between server and clients."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (torch is not imported for the types alone: configuration commands stay light)
    import torch

    from fedtune.client.kinds import ClientKind  # (kinds imports this module: for the checker only)

TensorDict = dict[str, "torch.Tensor"]
"""Trainable tensors only (LoRA factors, task head, unfrozen layers), by stable name."""

ClientState = dict[str, TensorDict]
"""A client's own memory across rounds, by purpose (e.g. "scaffold_c", "codec_residual"); stays on the client."""

Metrics = dict[str, float]
"""Scalar metrics reported by a client or by aggregation."""


@dataclass(frozen=True)
class LocalTrainConfig:
    """How a client trains in one round."""

    epochs: float
    max_steps: int
    lr: float
    batch_size: int
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    precision: str = "fp32"
    optimizer: str = "adamw"
    """Local optimizer: "adamw" or "sgd" (plain SGD, the optimizer SCAFFOLD's derivation assumes)."""
    pad_to: int = 0
    """Pad every training batch to this many tokens (0 = to the batch's longest example)."""
    pad_multiple: int = 1
    """Round each training batch's padded width up to a multiple of this (1 = to its longest example)."""
    pad_limit: int = 0
    """The rows' token limit (``data.max_length``): rounding up to ``pad_multiple`` never pads beyond it (0 = none)."""
    length_bucketing: bool = False
    """Draw training batches from length-sorted buckets (see fedtune.batching.epoch_batches)."""
    compile: bool = False
    """Run the training forward through ``torch.compile`` (fedtune.compiled; in-process simulation)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them (less memory, ~1.3-2x time)."""
    lr_schedule: str = "constant"
    """Learning rate across rounds: "constant" (``lr`` every round) or "cosine" (``lr`` in round 1 to
    ``lr_min`` in round ``rounds``); see :meth:`at_round`."""
    lr_min: float = 0.0
    rounds: int = 0
    """The run's number of rounds (the cosine schedule's length)."""

    def round_lr(self, rnd: int) -> float:
        """The learning rate of round ``rnd`` (1-based): cosine is lr_min + (lr - lr_min)(1 + cos(pi t)) / 2 with
        t = (rnd - 1) / (rounds - 1), so round 1 trains at ``lr`` and the last round at ``lr_min``."""
        if self.lr_schedule == "constant" or self.rounds <= 1:
            return self.lr
        t = min(max(rnd - 1, 0), self.rounds - 1) / (self.rounds - 1)
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1.0 + math.cos(math.pi * t))

    def at_round(self, rnd: int) -> "LocalTrainConfig":
        """This configuration with round ``rnd``'s learning rate (what a client trains with)."""
        lr = self.round_lr(rnd)
        return self if lr == self.lr else dataclasses.replace(self, lr=lr)


BASE_OFFSET = "lora_base_offset"
"""ServerState.buffers entry: dense corrections of the frozen base weights, by base weight name
(cumulative since round 1; FedEx-LoRA residuals, FLoRA merges). Part of the global model: evaluation,
saving and every client apply it (:func:`fedtune.resident.sync_base`)."""


@dataclass(frozen=True)
class RoundPlan:
    """What the server sends to each sampled client for one round."""

    round: int
    params: TensorDict
    local: LocalTrainConfig
    # (ClientKind is imported for the type checker only, so at run time this module imports nothing of fedtune)
    objective: ClientKind | None = None
    """The client-side half of the strategy that changes local training (FedProx's term, SCAFFOLD's c, ...)."""
    adapter: ClientKind | None = None
    """The client-side half of a LoRA-aware rule (per-client rank, frozen A, personal B); None otherwise."""
    personal: frozenset[str] = frozenset()
    """Tensors each client keeps to itself (FedPer's head): trained from its own copy, sent as zero change."""
    base_offset: TensorDict = field(default_factory=dict)
    """Dense corrections the client adds to frozen base weights, by base weight name (cumulative since round 1):
    FedEx-LoRA residuals, FLoRA merges (:data:`BASE_OFFSET`). Empty for every other strategy."""


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back: the change of its trainable tensors after local training."""

    client_id: str
    delta: TensorDict
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    extras: Mapping[str, TensorDict] = field(default_factory=dict)
    """Named per-client tensors a strategy asks for (e.g. SCAFFOLD's control change), each shaped like ``delta``."""


@dataclass(frozen=True)
class ServerState:
    """Everything a strategy needs between rounds (checkpointed whole)."""

    round: int
    params: TensorDict
    buffers: Mapping[str, TensorDict] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientScore:
    """A client's scores of a model on its own rows (federated evaluation, personalization); rows stay home."""

    client_id: str
    num_examples: int
    scores: Mapping[str, float]
    """``global`` (the round's global model) and, when asked, ``personalized`` (the client's own model)."""
