"""An on-disk cache of tokenized training rows, keyed by the hash of what was tokenized and by what.

A deployed Flower node runs every message in a new process (:mod:`fedtune.runtime.flower.node_timing`),
which would render and tokenize the experiment's training rows again for every round: minutes for a
chat-templated instruction set. Inside :func:`enabled` (the ClientApp turns it on), the tasks'
training encoders go through :func:`cached_token_lists`: the first message tokenizes and stores
the token lists, later ones read them back in milliseconds.

The key is a SHA-256 over everything the result depends on: the encoder's name, the tokenizer's
full serialized state (vocabulary, merges, normalizer, special tokens, chat template), the
encoding options (``max_length``, prompt template and format, ...) and the hash of every input text
and label. A changed data file, tokenizer or setting is a different key, never a stale hit; a
cache file that does not read back is recomputed and rewritten. Entries are safetensors files
(flat int32 ids plus row offsets, no pickle) under ``$FEDTUNE_CACHE/encoded/`` (see
:func:`fedtune.model_sources.cache_dir`); delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from fedtune.atomic_write import write_atomic
from fedtune.token_rows import TokenRows

log = logging.getLogger(__name__)

FORMAT = 1
"""Bumped whenever what an encoder produces changes for the same inputs (old entries are then unused)."""

_ENABLED = [False]

TokenLists = dict[str, Sequence[list[int]] | None]
"""Named rows of token ids (lists of lists or :class:`~fedtune.token_rows.TokenRows`; read back as TokenRows)."""


@contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Within the block, :func:`cached_token_lists` reads and writes the cache (outside it, it just computes)."""
    before = _ENABLED[0]
    _ENABLED[0] = on
    try:
        yield
    finally:
        _ENABLED[0] = before


def is_enabled() -> bool:
    """Whether the encoders use the cache right now."""
    return _ENABLED[0]


def cache_folder() -> Path:
    """Where entries live: ``$FEDTUNE_CACHE/encoded``."""
    from fedtune.model_sources import cache_dir

    return cache_dir() / "encoded"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything in ``tokenizer`` that decides its output (its serialized state and templates)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary in id order
        h.update(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])).encode())
    extra = {"chat_template": getattr(tokenizer, "chat_template", None),
             "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
             "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
             "padding_side": getattr(tokenizer, "padding_side", None),
             "truncation_side": getattr(tokenizer, "truncation_side", None)}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def inputs_digest(*columns: Iterable) -> str:
    """A hash of input columns (texts, text pairs, labels, nested message lists), in order."""
    h = hashlib.sha256()
    for col in columns:
        h.update(b"\x00column")
        if col is None:
            h.update(b"\x00none")
            continue
        for value in col:
            h.update(json.dumps(value, sort_keys=True, default=str).encode())
            h.update(b"\x01")
    return h.hexdigest()


def cache_key(encoder: str, tokenizer, options: dict, inputs: str) -> str:
    """The entry's key: encoder name, tokenizer fingerprint, options and the inputs' digest."""
    from fedtune import __version__

    payload = {"format": FORMAT, "fedtune": __version__, "encoder": encoder,
               "tokenizer": tokenizer_fingerprint(tokenizer), "options": options, "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def token_list(lists: TokenLists, name: str) -> Sequence[list[int]]:
    """The rows ``lists[name]``, which the encoder always fills (a ValueError if they are None)."""
    rows = lists[name]
    if rows is None:
        raise ValueError(f"encoded rows: {name!r} is missing (the encoder always fills it)")
    return rows


def cached_token_lists(encoder: str, tokenizer, options: dict, inputs: str,
                       compute: Callable[[], TokenLists]) -> TokenLists:
    """``compute()`` (named lists of token-id rows, a list may be None), read from the cache when enabled."""
    if not _ENABLED[0]:
        return compute()
    path = cache_folder() / f"{cache_key(encoder, tokenizer, options, inputs)}.safetensors"
    if path.exists():
        try:
            value = _read(path)
            log.info("encoded rows read from the cache (%s, %s)", encoder, path.name[:16])
            return value
        except Exception as exc:  # an unreadable entry (a torn write, a full disk) is recomputed, never trusted
            log.warning("cache entry %s is unreadable (%s); encoding again", path, exc)
    value = compute()
    try:
        _write(path, value)
    except OSError as exc:
        log.warning("could not write the encoding cache %s (%s); the rows are encoded, not cached", path, exc)
    return value


def _write(path: Path, value: TokenLists) -> None:
    from safetensors.torch import save

    tensors, meta = {}, {"names": json.dumps(sorted(value))}
    for name, rows in value.items():
        if rows is None:
            meta[f"none.{name}"] = "1"
            continue
        packed = TokenRows.from_rows(rows)
        tensors[f"{name}.ids"] = torch.from_numpy(packed.flat)
        tensors[f"{name}.lengths"] = torch.from_numpy(packed.lengths())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save(tensors, metadata=meta))  # a reader never sees half an entry


def _read(path: Path) -> TokenLists:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        names = json.loads(meta["names"])
        out: TokenLists = {}
        for name in names:
            if meta.get(f"none.{name}"):
                out[name] = None
                continue
            ids, lengths = f.get_tensor(f"{name}.ids").numpy(), f.get_tensor(f"{name}.lengths").numpy()
            if int(lengths.sum()) != len(ids) or (lengths < 0).any():
                raise ValueError(f"{name}: lengths sum to {int(lengths.sum())}, {len(ids)} ids stored")
            out[name] = TokenRows.from_lengths(ids, lengths)
    return out
