"""Tensors on the wire: safetensors bytes (never pickle), and exact byte accounting."""

from __future__ import annotations

from dataclasses import dataclass

from safetensors.torch import load as _load
from safetensors.torch import save as _save

from fedtune.types import TensorDict


def encode_tensors(params: TensorDict) -> bytes:
    """Serialize a TensorDict to safetensors bytes."""
    return _save({k: v.contiguous() for k, v in params.items()})


def decode_tensors(data: bytes) -> TensorDict:
    """Inverse of :func:`encode_tensors`."""
    return dict(_load(data))


def payload_bytes(params: TensorDict) -> int:
    """Exact size of the encoded payload in bytes (header included)."""
    return len(encode_tensors(params))


@dataclass
class CommStats:
    """Bytes a round moved each way, counted from encoded payloads."""

    bytes_down: int = 0
    bytes_up: int = 0
