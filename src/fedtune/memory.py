"""Process memory: keep freed tensor memory from piling up in the C allocator, and measure peaks.

PyTorch's CPU tensors come from glibc ``malloc``. glibc serves large blocks with ``mmap`` (given
back to the OS on ``free``) only above a threshold that, by default, *rises* to the size of the
largest block freed so far (up to 32 MiB on 64-bit). After the first training step frees its
activations, every later activation block of up to 32 MiB comes from the heap instead, and a
freed heap block stays in the process: resident memory ratchets up between training and
evaluation (different block sizes) and across rounds. Extractive QA on MiniLM (batches of
16 x 384 tokens) reached 9.7 GB this way. :func:`bound_allocator` fixes the threshold at
128 KiB so tensor buffers are always mapped and returned on ``free``; :func:`release_memory`
hands back what the heap still holds after a phase. Both are no-ops where glibc is absent.

The CLI and the Flower apps call :func:`bound_allocator` once at start; library users may call it
themselves. It is skipped when ``MALLOC_MMAP_THRESHOLD_`` is already set in the environment (the
user chose the allocator's settings) or ``FEDTUNE_ALLOCATOR=default``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


def bound_allocator() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`; True when it is now in effect.

    Idempotent. Returns False (and changes nothing) without glibc, when the environment already
    sets ``MALLOC_MMAP_THRESHOLD_``, or with ``FEDTUNE_ALLOCATOR=default``.
    """
    global _bounded
    if _bounded:
        return True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or os.environ.get("FEDTUNE_ALLOCATOR", "").lower() == "default":
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
