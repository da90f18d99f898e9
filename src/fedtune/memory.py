"""Process memory: where a run's memory goes, what bounds it, and how to measure a phase's peak.

A training step's activations dominate (extractive QA on MiniLM, 16 windows of 384 tokens in
bf16: about 3 GB at once, eager attention and dropout masks per layer). Two levers bound them:

- ``train.gradient_checkpointing`` keeps only each layer's input and recomputes the layer in the
  backward pass (:func:`activation_checkpointing`): 2.2 instead of 5.7 GB peak in
  ``benchmarks/qa_memory.py``, for about 1.3-2x the step time.
- The C allocator. PyTorch's CPU tensors come from glibc ``malloc``, which maps large blocks
  (returned to the OS on ``free``) only above a threshold that by default *rises* to the largest
  block freed so far (up to 32 MiB). After the first step frees its activations, later blocks of
  up to 32 MiB come from the heap, and freed heap stays resident: memory ratchets up between
  training and evaluation (different block sizes) and across rounds. :func:`release_memory`
  (``malloc_trim``) hands the free heap back before and after every evaluation, at no measurable
  cost; :func:`bound_allocator` fixes the threshold at 128 KiB so every tensor buffer is unmapped
  when freed (about 15-20% lower peak, but about 25% longer steps here from the page faults of
  fresh mappings), which is why it is opt-in: ``FEDTUNE_ALLOCATOR=bounded`` for the CLI and the
  Flower apps (:func:`configure_allocator`), or glibc's own ``MALLOC_MMAP_THRESHOLD_=131072``.

All of this is a no-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.errors import ConfigError

if TYPE_CHECKING:  # (the CLI imports this module before parsing arguments: no torch at import time)
    import torch

MMAP_THRESHOLD = 128 * 1024
"""Blocks of at least this many bytes are mapped (and unmapped on free); glibc's initial default."""

_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
_bounded = False


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


ALLOCATOR_ENV = "FEDTUNE_ALLOCATOR"
"""Environment variable read by :func:`configure_allocator`: ``bounded`` or ``default`` (unset)."""


def configure_allocator() -> bool:
    """Apply ``FEDTUNE_ALLOCATOR`` (called once by the CLI and the Flower apps); True when bounded.

    ``bounded`` calls :func:`bound_allocator`; unset or ``default`` leaves glibc as it is; any other
    value is a ConfigError naming the variable.
    """
    value = os.environ.get(ALLOCATOR_ENV, "default").strip().lower()
    if value not in ("default", "bounded"):
        raise ConfigError(f"{ALLOCATOR_ENV}={os.environ[ALLOCATOR_ENV]!r}: expected 'bounded' or 'default'")
    return bound_allocator() if value == "bounded" else False


def bound_allocator() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`; True when it is now in effect.

    Idempotent. Returns False (and changes nothing) without glibc, or when the environment already
    sets ``MALLOC_MMAP_THRESHOLD_`` (glibc then uses that value).
    """
    global _bounded
    if _bounded:
        return True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    lib = _libc()
    if lib is None:
        return False
    _bounded = bool(lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _bounded


def release_memory() -> None:
    """Give the heap's free pages back to the OS (``malloc_trim``), e.g. after an evaluation."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux ``VmRSS``; None elsewhere)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory since start or the last :func:`reset_peak` (``VmHWM``)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak() -> bool:
    """Restart the peak (``VmHWM``) at the current resident size, so a phase's own peak can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextmanager
def activation_checkpointing(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """Within the block, ``model`` recomputes its layers' activations in backward (when ``on``).

    Uses the transformers implementation (``gradient_checkpointing_enable``, non-reentrant, so
    frozen inputs and LoRA adapters work); a model without it raises a ValueError naming it.
    Turned off again on exit, so evaluation and other clients see the model as it was.
    """
    if not on:
        yield
        return
    # transformers 5 names it activation checkpointing (the gradient_* names are deprecated aliases)
    new_api = hasattr(model, "activation_checkpointing_enable")
    enable = getattr(model, "activation_checkpointing_enable" if new_api else "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", True):
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient "
                         "checkpointing; set it to false")
    kwargs = {"use_reentrant": False}
    enable(**({"activation_checkpointing_kwargs": kwargs} if new_api else {"gradient_checkpointing_kwargs": kwargs}))
    try:
        yield
    finally:
        getattr(model, "activation_checkpointing_disable" if new_api else "gradient_checkpointing_disable")()
