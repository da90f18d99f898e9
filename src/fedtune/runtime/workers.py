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

Each worker uses ``threads`` threads (default 1: GNU OpenMP, which the Linux torch wheels use, can
hang a forked child that starts a thread team after its parent used one; one worker per core is
the intended layout). Jobs and results travel as plain pickles over pipes (a LoRA update is about
a megabyte). Jobs are made as workers free up and at most ``2 x workers`` are in flight or
waiting to be consumed, so memory does not grow with the cohort. A failure while training is
raised in the main process, as the same exception type, naming the clients of the job, and the
pool stays usable; a worker that dies (killed, out of memory) is an error naming it, after which
the pool refuses further work. Workers ignore Ctrl-C: the main process stops them.

Forking needs the ``fork`` start method (Linux; macOS with the CPU) and a CPU device: CUDA
cannot be used in a forked process (on a GPU, ``simulation.parallel_clients`` batches clients instead).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import pickle
import signal
import traceback
from collections.abc import Generator, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, cast

import torch

from fedtune.errors import ConfigError
from fedtune.types import ClientState, ClientUpdate

if TYPE_CHECKING:
    from fedtune.runtime.train_job import TrainJob

log = logging.getLogger(__name__)


def worker_threads(threads: int | None = None) -> int:
    """Threads per worker: ``threads`` when given, else 1 (see the module's note on OpenMP after fork)."""
    if threads is None:
        return 1
    if threads < 1:
        raise ConfigError(f"threads per worker must be >= 1, got {threads}")
    return threads


def _serve(transport, conn: Connection, threads: int) -> None:
    """A worker's loop: take a job and states, train, send back updates and states (or the failure)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (Ctrl-C is the main process's to handle)
    torch.set_num_threads(threads)
    transport.workers = None  # (this process trains; it never forks further)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the main process is gone
            return
        if not message:
            return
        try:
            job, states = pickle.loads(message)
            updates = transport.train_job(job, states)
            reply = pickle.dumps(("ok", updates, states), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # sent to the main process, which raises it there
            detail = traceback.format_exc()
            try:
                reply = pickle.dumps(("error", exc, detail), protocol=pickle.HIGHEST_PROTOCOL)
                pickle.loads(reply)  # (an exception that pickles but does not unpickle goes as a RuntimeError)
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
        self.threads = worker_threads(threads)
        ctx = mp.get_context("fork")
        self._conns: list[Connection] = []
        self._procs: list = []
        self._busy: dict[int, tuple[int, TrainJob]] = {}
        """Worker -> (index, job) it is training (while a :meth:`run` is under way)."""
        self._broken = ""
        """Why the pool refuses work (a worker died), or empty."""
        try:
            for _ in range(workers):
                ours, theirs = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=_serve, args=(transport, theirs, self.threads), daemon=True)
                proc.start()
                theirs.close()
                self._conns.append(ours)
                self._procs.append(proc)
        except BaseException:
            self.close()
            raise
        log.info("simulation: %d worker processes, %d thread(s) each", workers, self.threads)

    @property
    def size(self) -> int:
        """How many worker processes the pool has."""
        return len(self._procs)

    def run(self, jobs: Iterable[TrainJob]
            ) -> Generator[tuple[TrainJob, list[ClientUpdate], list[ClientState]], None, None]:
        """Train ``jobs`` (drawn only as workers free up) on the workers; yield ``(job, updates, states)`` in order.

        Each job's clients' states are read from the transport's ``client_states`` when it is sent
        and put back, changed, just before the job is yielded (the yielded ``states`` are those
        objects, which the caller's uplink may change further, as in the one-process transport).
        """
        if self._broken:
            raise RuntimeError(self._broken)
        self._drain()  # (an earlier round abandoned without being closed)
        store = self.transport.client_states
        source = enumerate(jobs)
        exhausted = False
        done: dict[int, tuple[TrainJob, list[ClientUpdate], list[ClientState]]] = {}
        window = 2 * self.size
        next_out = 0
        try:
            while True:
                while not exhausted and len(self._busy) < self.size and len(self._busy) + len(done) < window:
                    try:
                        i, job = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    states = [store.get(cid, {}) for cid in job.clients]
                    w = next(w for w in range(self.size) if w not in self._busy)
                    self._send(w, dataclasses.replace(job, server_plan=None), states)  # (the worker needs no server plan)
                    self._busy[w] = (i, job)
                if exhausted and not self._busy and not done:
                    return
                for i, job, reply in self._replies():
                    status, first, second = reply
                    if status != "ok":
                        raise self._failure(job, first, second)
                    done[i] = (job, first, second)
                while next_out in done:
                    job, updates, states = done.pop(next_out)
                    for cid, state in zip(job.clients, states, strict=True):
                        store[cid] = state  # (only now: the caller changes them next, before the cache moves on)
                    yield job, updates, states
                    next_out += 1
        finally:
            self._drain()  # a failure or an abandoned round: no stale reply may reach the next one

    def _send(self, w: int, job, states: list[ClientState]) -> None:
        try:
            self._conns[w].send_bytes(pickle.dumps((job, states), protocol=pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, OSError) as exc:
            self._broken = f"simulation worker {w} is gone (exit code {self._procs[w].exitcode}): {exc}"
            raise RuntimeError(self._broken) from None

    def _replies(self) -> Iterator[tuple[int, TrainJob, tuple]]:
        """``(job index, job, reply)`` of busy workers, as soon as one or more are ready (each worker is then free)."""
        by_conn = {self._conns[w]: w for w in self._busy}
        for ready in wait(list(by_conn)):
            conn = cast(Connection, ready)  # wait() returns the objects it was given: our Connections
            w = by_conn[conn]
            i, job = self._busy.pop(w)
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                self._procs[w].join(timeout=1)
                self._broken = (f"simulation worker {w} died while training (exit code {self._procs[w].exitcode}; "
                                f"out of memory or a kill are the usual causes)")
                raise RuntimeError(self._broken) from None
            try:
                reply = pickle.loads(data)
            except Exception as exc:
                reply = ("error", RuntimeError(f"the reply of simulation worker {w} does not unpickle: {exc}"), "")
            yield i, job, reply

    @staticmethod
    def _failure(job, exc: BaseException, detail: str) -> BaseException:
        clients = ", ".join(job.clients)
        note = f"(raised while training client(s) {clients} in a simulation worker process)"
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        else:  # Python 3.10: no exception notes
            log.error("%s %s", type(exc).__name__, note)
        log.debug("worker traceback for client(s) %s:\n%s", clients, detail)
        return exc

    def _drain(self) -> None:
        """Wait for the replies still owed and drop them (a dead worker is recorded, not raised)."""
        while self._busy:
            try:
                for _ in self._replies():
                    pass
            except RuntimeError as exc:
                log.warning("%s", exc)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        for conn in self._conns:
            try:
                conn.send_bytes(b"")
            except OSError:
                pass
            finally:
                conn.close()
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self._conns, self._procs, self._busy = [], [], {}
        self._broken = "the simulation's worker pool is closed"
