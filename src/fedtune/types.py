"""The typed data that crosses between server and clients."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

TensorDict = dict[str, torch.Tensor]
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
    length_bucketing: bool = False
    """Draw training batches from length-sorted buckets (see fedtune.batching.epoch_batches)."""
    compile: bool = False
    """Run the training forward through ``torch.compile`` (fedtune.compiled; in-process simulation)."""


@dataclass(frozen=True)
class ProxTerm:
    """FedProx: add ``mu / 2 * ||w - w_global||^2`` to the local loss."""

    mu: float


@dataclass(frozen=True, eq=False)
class ControlVariate:
    """SCAFFOLD (Karimireddy et al. 2020): the server control variate ``c``.

    Every local step adds ``c - c_i`` to the gradient (``c_i`` is the client's own control
    variate, kept in its ClientState); the client returns its control change under the extras
    name :data:`CONTROL_DELTA`.
    """

    c: TensorDict


CONTROL_DELTA = "scaffold_delta_c"
"""Name of the ClientUpdate extras entry carrying a SCAFFOLD client's change of control variate."""


ClientObjective = ProxTerm | ControlVariate
"""Client-side part of a strategy, declared as data (more kinds join this union)."""


@dataclass(frozen=True)
class RoundPlan:
    """What the server sends to each sampled client for one round."""

    round: int
    params: TensorDict
    local: LocalTrainConfig
    objective: ClientObjective | None = None
    personal: frozenset[str] = frozenset()
    """Tensors each client keeps to itself (FedPer's head): trained from its own copy, sent as zero change."""
    base_offset: TensorDict = field(default_factory=dict)
    """Dense corrections the client adds to frozen base weights, by base weight name (cumulative since round 1):
    FedEx-LoRA residuals, FLoRA merges. Empty for every other strategy (see fedtune.runtime.lora)."""


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back: the change of its trainable tensors after local training."""

    client_id: str
    delta: TensorDict
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    extras: Mapping[str, TensorDict] = field(default_factory=dict)
    """Named per-client tensors a strategy asks for (e.g. :data:`CONTROL_DELTA`), each shaped like ``delta``."""


@dataclass(frozen=True)
class ServerState:
    """Everything a strategy needs between rounds (checkpointed whole)."""

    round: int
    params: TensorDict
    buffers: Mapping[str, TensorDict] = field(default_factory=dict)
