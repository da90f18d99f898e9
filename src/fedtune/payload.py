"""Tensors on the wire: safetensors bytes (never pickle), and exact byte accounting."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from safetensors.torch import load as _load
from safetensors.torch import save as _save

from fedtune.types import TensorDict


def save_tensors(tensors: TensorDict, metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors bytes that depend only on the tensors and the metadata (the same bytes every time).

    safetensors writes its JSON header from a hash map, so the order of the ``__metadata__`` entries
    (and with it the bytes after gzip or zstd, and ``bytes_up``) varies from call to call; the
    header is rewritten with sorted keys, padded to 8 bytes as safetensors aligns it.
    """
    return canonical_safetensors(_save({k: v.contiguous() for k, v in tensors.items()},
                                       metadata=dict(metadata) if metadata else None))


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` (safetensors bytes) with its header's keys sorted; the tensors' bytes are unchanged."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def encode_tensors(params: TensorDict) -> bytes:
    """Serialize a TensorDict to safetensors bytes (deterministic: :func:`save_tensors`)."""
    return save_tensors(params)


def decode_tensors(data: bytes) -> TensorDict:
    """Inverse of :func:`encode_tensors`."""
    return dict(_load(data))


def payload_bytes(params: TensorDict) -> int:
    """Exact size of the encoded payload in bytes (header included)."""
    return len(encode_tensors(params))


@dataclass
class CommStats:
    """What a round's traffic did: bytes each way (counted from encoded payloads) and the clients that failed."""

    bytes_down: int = 0
    bytes_up: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(client id, reason) of every sampled client whose update did not arrive (offline, timeout, error)."""
    restarted: list[str] = field(default_factory=list)
    """Clients whose plan was sent again, to the node they restarted on, while the round waited."""
