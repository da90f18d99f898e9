"""Worker processes for the in-process simulation: several clients training at once, one per core.

On a CPU, one process training with every core is slower than one process per core each using
one thread: a small transformer's matrix products do not split well over threads (measured here:
MiniLM LoRA at batch 16, 82 examples/s in one process of 2 threads, 2 x 55 in two processes of
one). ``simulation.workers = N`` forks N worker processes from the transport once its model
and rows are loaded (each starts with the same model and data, shared copy-on-write), and the
round's jobs (one client, or a batched group of ``simulation.parallel_clients``) go to whichever
worker is free. The server side stays in the main process: it hands each job the plan and the
clients' own state, and gets back their updates and changed state; the uplink codec, attacks and
the streaming aggregate run there, in the order of the sampled clients, so the results are the
ones the transport gives in this process (the same per-client seeds; only the threads' split of
a sum can differ, at float rounding).

Each worker uses ``threads`` threads (default: the CPU count divided by the workers, at least
one). Jobs and results travel as plain pickles over pipes (a LoRA update is about a megabyte).
At most ``2 x workers`` jobs are in flight or waiting to be consumed, so memory does not grow
with the cohort. A failure in a worker is raised in the main process, as the same exception
type, naming the clients of the job; the pool then stays usable.

Forking needs the ``fork`` start method (Linux; macOS with the CPU) and a CPU device: CUDA
cannot be used in a forked process (on a GPU, ``simulation.parallel_clients`` batches clients instead).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection, wait

import torch

from fedtune.errors import ConfigError
from fedtune.types import ClientState, ClientUpdate

log = logging.getLogger(__name__)


def worker_threads(workers: int, threads: int | None = None) -> int:
    """Threads per worker: ``threads`` when given, else the CPU count divided by ``workers`` (at least 1)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads per worker must be >= 1, got {threads}")
        return threads
    return max(1, (os.cpu_count() or 1) // workers)


def _serve(transport, conn: Connection, threads: int) -> None:
    """A worker's loop: take a job and states, train, send back updates and states (or the failure)."""
    torch.set_num_threads(threads)
    transport.workers = None  # (this process trains; it never forks further)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the main process is gone
            return
        if not message:
            return
        job, states = pickle.loads(message)
        try:
            updates = transport.train_job(job, states)
            reply = pickle.dumps(("ok", updates, states), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as exc:  # sent to the main process, which raises it there
            detail = traceback.format_exc()
            try:
                reply = pickle.dumps(("error", exc, detail), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:
                reply = pickle.dumps(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), detail))
        conn.send_bytes(reply)


class WorkerPool:
    """``workers`` forked copies of ``transport`` that train its jobs; results come back in job order."""

    def __init__(self, transport, workers: int, threads: int | None = None) -> None:
        if workers < 2:
            raise ConfigError(f"simulation.workers = {workers}: a pool needs at least 2 workers (1 trains in process)")
        if transport.device.type != "cpu":
            raise ConfigError(f"simulation.workers = {workers} needs the CPU, not {transport.device}: CUDA and MPS "
                              f"cannot be used in forked processes; use simulation.parallel_clients to batch "
                              f"clients on one accelerator")
        if "fork" not in mp.get_all_start_methods():
            raise ConfigError(f"simulation.workers = {workers} needs the 'fork' start method, which this platform "
                              f"lacks; use simulation.workers = 1")
        self.transport = transport
        self.threads = worker_threads(workers, threads)
        ctx = mp.get_context("fork")
        self._conns: list[Connection] = []
        self._procs = []
        for _ in range(workers):
            ours, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_serve, args=(transport, theirs, self.threads), daemon=True)
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
        self._busy: dict[int, int] = {}
        """Worker -> index of the job it is training (while a :meth:`run` is under way)."""
        log.info("simulation: %d worker processes, %d thread(s) each", workers, self.threads)

    @property
    def size(self) -> int:
        """How many worker processes the pool has."""
        return len(self._procs)

    def run(self, jobs: Sequence) -> Iterator[tuple[object, list[ClientUpdate], list[ClientState]]]:
        """Train ``jobs`` on the workers; yield ``(job, updates, states)`` in the order of ``jobs``.

        Each job's clients' states are read from the transport's ``client_states`` when it is sent
        and put back, changed, just before the job is yielded (the yielded ``states`` are those
        objects, which the caller's uplink may change further, as in the one-process transport).
        """
        store = self.transport.client_states
        pending = deque(enumerate(jobs))
        free = list(range(self.size))
        done: dict[int, tuple[list[ClientUpdate], list[ClientState]]] = {}
        window = 2 * self.size
        next_out = 0
        try:
            while next_out < len(jobs):
                while free and pending and pending[0][0] - next_out < window:
                    i, job = pending.popleft()
                    states = [store.get(cid, {}) for cid in job.clients]
                    w = free.pop()
                    self._send(w, job, states)
                    self._busy[w] = i
                for w, reply in self._replies():
                    i = self._busy.pop(w)
                    free.append(w)
                    status, first, second = reply
                    if status != "ok":
                        raise self._failure(jobs[i], first, second)
                    done[i] = (first, second)
                while next_out in done:
                    updates, states = done.pop(next_out)
                    for cid, state in zip(jobs[next_out].clients, states):
                        store[cid] = state  # (only now: the caller changes them next, before the cache moves on)
                    yield jobs[next_out], updates, states
                    next_out += 1
        finally:
            self._drain()  # a failure or an abandoned round: no stale reply may reach the next one

    def _send(self, w: int, job, states: list[ClientState]) -> None:
        try:
            self._conns[w].send_bytes(pickle.dumps((job, states), protocol=pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, OSError) as exc:
            raise RuntimeError(f"simulation worker {w} is gone (exit code {self._procs[w].exitcode}): {exc}") from None

    def _replies(self) -> Iterator[tuple[int, tuple]]:
        """Replies of busy workers, as soon as one or more are ready."""
        by_conn = {self._conns[w]: w for w in self._busy}
        for conn in wait(list(by_conn)):
            w = by_conn[conn]
            try:
                yield w, pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                code = self._procs[w].exitcode
                self._busy.pop(w, None)
                raise RuntimeError(f"simulation worker {w} died while training (exit code {code}; out of memory "
                                   f"is the usual cause)") from None

    @staticmethod
    def _failure(job, exc: BaseException, detail: str) -> BaseException:
        clients = ", ".join(job.clients)
        log.debug("worker traceback for client(s) %s:\n%s", clients, detail)
        try:
            exc.add_note(f"(raised while training client(s) {clients} in a simulation worker process)")
        except AttributeError:
            pass
        return exc

    def _drain(self) -> None:
        """Wait for the replies still owed and drop them."""
        while self._busy:
            for w, _ in self._replies():
                self._busy.pop(w, None)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        for conn in self._conns:
            try:
                conn.send_bytes(b"")
                conn.close()
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        self._conns, self._procs = [], []
