"""Where a message's time goes on a Flower node: the phases of one ClientApp process, from its start to its reply.

A deployed SuperNode runs every message (identify, train, score) in a new ``flwr-clientapp``
process. :class:`PhaseClock` times what that process does and the reply carries the phases to the
server (a ``fedtune.timing`` MetricRecord, see :mod:`fedtune.runtime.flower.messages`), where the
transport writes one line per reply to the run folder's ``node_timing.jsonl``:

``launch``
    From the process's start (the kernel's start time, Linux ``/proc``) to the first line of
    fedtune's ClientApp module: the Python start, Flower's imports, pulling the message and
    unpacking the app. Absent where ``/proc`` is not available.
``imports``
    Importing fedtune's ClientApp module (torch, transformers, peft, fedtune).
``flower``
    From the end of the imports to the handler's first line (Flower loads the app and its context).
``tokenizer`` / ``data`` / ``model``
    Loading the tokenizer; building the node's task and its encoded rows (or reading them from
    the node's shard cache, :mod:`fedtune.runtime.flower.shard_cache`); building the model.
``train`` / ``score`` / ``encode``
    The client runtime's work, and encoding the reply with the uplink codec.

The server adds ``round_trip`` (from pushing the message to pulling its reply): what the phases do
not cover is Flower's transport (the SuperNode polls the SuperLink every 3 s when idle, its
SuperExec the node every second) and sending the reply.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

MODULE_T0 = time.time()
"""Wall-clock time at which this module (imported first by the ClientApp module) was imported."""


def process_start_time(pid: int | None = None) -> float | None:
    """The wall-clock start time of process ``pid`` (this one by default), or None off Linux."""
    try:
        with open(f"/proc/{pid or os.getpid()}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3 (state)
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class PhaseClock:
    """Seconds spent in named phases of one message's handling (a phase may be entered more than once)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` body and add it to phase ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

    def start_of_process(self, imports_done: float, handler_start: float) -> None:
        """Record ``launch``, ``imports`` and ``flower`` for the first message of this process."""
        start = process_start_time()
        if start is not None:
            self.phases["launch"] = max(0.0, MODULE_T0 - start)
        self.phases["imports"] = max(0.0, imports_done - MODULE_T0)
        self.phases["flower"] = max(0.0, handler_start - imports_done)

    def summary(self) -> str:
        """The phases as ``name 1.23 s`` pairs, in the order they were recorded."""
        return ", ".join(f"{k} {v:.2f} s" for k, v in self.phases.items())
