"""In-process simulation: one resident model, each client's tensors swapped in, updates streamed out."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Generator, Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedtune.attacks import Attack, byzantine_update
from fedtune.batching import EncodedDataset
from fedtune.channel import Channel
from fedtune.client import local_train
from fedtune.client.evaluate import HELD_OUT, ScoreRequest, client_scores
from fedtune.payload import CommStats
from fedtune.runtime.train_job import TrainJob
from fedtune.types import ClientScore, ClientState, ClientUpdate, RoundPlan

if TYPE_CHECKING:
    from fedtune.runtime.workers import WorkerPool


def client_seed(seed: int, rnd: int, client_id: str) -> int:
    """A stable per-(run, round, client) seed for data order."""
    return zlib.crc32(f"{seed}/{rnd}/{client_id}".encode())


class SimulationTransport:
    """Runs every sampled client in turn on one resident model; yields each update as soon as it exists.

    Memory does not grow with the number of clients: the model is loaded once, and each update
    is consumed by the streaming aggregate before the next client starts.

    ``channel`` holds the codecs (:mod:`fedtune.channel`): clients train from the plan as they
    would decode it, the server gets their updates as it would decode them, and ``CommStats``
    counts the encoded bytes. The default sends float32 safetensors both ways.
    """

    def __init__(
        self,
        model: nn.Module,
        client_data: Mapping[str, EncodedDataset],
        *,
        pad_id: int,
        seed: int,
        device: torch.device,
        channel: Channel | None = None,
        attacks: Mapping[str, Attack] | None = None,
        client_states: MutableMapping[str, ClientState] | None = None,
    ) -> None:
        self.model = model
        self.attacks = dict(attacks or {})
        """The byzantine clients' attacks (their rows are poisoned by the caller, :func:`fedtune.attacks.poison_rows`)."""
        self.channel = channel if channel is not None else Channel()
        self.client_data = client_data
        self.pad_id = pad_id
        self.seed = seed
        self.device = device
        self.client_states: MutableMapping[str, ClientState] = client_states if client_states is not None else {}
        """Each client's persistent state (kept here because in a simulation the client is us): a dict, or a
        :class:`fedtune.client_store.ClientStateStore` that keeps most of it on disk."""
        self.workers: WorkerPool | None = None
        """The worker processes training the clients (:meth:`use_workers`), or None: this process trains them."""
        self.task = None
        self.held_out: Mapping[str, EncodedDataset] = {}
        self.eval_context = None

    def enable_scoring(self, task, held_out: Mapping[str, EncodedDataset], eval_context) -> None:
        """Let clients score models on their rows (:meth:`score_round`): the task, their held-out rows, how to run."""
        self.task, self.held_out, self.eval_context = task, held_out, eval_context

    def score_round(self, plan: RoundPlan, clients: Sequence[str], request: ScoreRequest,
                    stats: CommStats) -> Iterator[ClientScore]:
        """Each client scores the plan's model on its own rows (:func:`fedtune.client.evaluate.client_scores`)."""
        if self.task is None:
            raise RuntimeError("client scoring was not enabled on this transport (enable_scoring)")
        for cid in clients:
            received, down = self.channel.send_plan(plan, cid)
            stats.bytes_down += down
            train_rows = self.client_data[cid]  # (cut once: ClientRows cuts a client's rows on each access)
            rows = self.held_out.get(cid) if request.rows == HELD_OUT else train_rows
            scores = client_scores(self.model, self.task, received, cid, request, train_rows=train_rows,
                                   held_out=self.held_out.get(cid), state=self.client_states.get(cid, {}),
                                   ctx=self.eval_context, seed=client_seed(self.seed, plan.round, cid))
            yield ClientScore(cid, len(rows), scores)

    def run_round(self, plan: RoundPlan, clients: Sequence[str], stats: CommStats) -> Iterator[ClientUpdate]:
        """Train each client on the plan as it decodes it; yield the updates as the server decodes them.

        The round is cut into jobs (:meth:`plan_jobs`: one client each here, up to K batched in
        :class:`~fedtune.runtime.parallel.ParallelSimulationTransport`), run here or by the
        transport's worker processes (:meth:`use_workers`); updates come out in the order of ``clients``.
        """
        jobs = self.plan_jobs(plan, clients)
        results = self.workers.run(jobs) if self.workers is not None else self._run_here(jobs)
        with contextlib.closing(results):  # (an abandoned round closes the workers' side at once)
            for job, updates, states in results:
                if job.server_plan is None:  # (only the copy sent to a worker process drops it)
                    raise RuntimeError("a training job reached the uplink without the round's server plan")
                for update, state in zip(updates, states, strict=True):
                    stats.bytes_down += job.down
                    yield self.upload(update, state, stats, job.server_plan)

    def plan_jobs(self, plan: RoundPlan, clients: Sequence[str]) -> Iterator[TrainJob]:
        """The round's client work, one client per job, each with the plan as that client decodes it.

        Made lazily, one job when it is about to train, so a per-client plan exists for one client at a time.
        """
        shared = self.channel.send_plan(plan) if plan.adapter is None else None  # (the same for every client)
        for cid in clients:
            received, down = shared if shared is not None else self.channel.send_plan(plan, cid)
            yield TrainJob(received, plan, (cid,), down)

    def train_job(self, job: TrainJob, states: Sequence[ClientState]) -> list[ClientUpdate]:
        """Train the job's clients (changing ``states`` in place); their updates before the uplink."""
        (cid,), (state,) = job.clients, states
        return [local_train(self.model, self.client_data[cid], job.plan, cid, pad_id=self.pad_id,
                            seed=client_seed(self.seed, job.plan.round, cid), device=self.device, state=state)]

    def _run_here(self, jobs: Iterable[TrainJob]
                  ) -> Generator[tuple[TrainJob, list[ClientUpdate], list[ClientState]], None, None]:
        for job in jobs:
            states = [self.client_states.setdefault(cid, {}) for cid in job.clients]
            yield job, self.train_job(job, states), states

    def use_workers(self, workers: int, threads: int | None = None) -> None:
        """Train in ``workers`` forked processes from now on (:class:`fedtune.runtime.workers.WorkerPool`)."""
        from fedtune.runtime.workers import WorkerPool

        self.close()
        self.workers = WorkerPool(self, workers, threads)

    def close(self) -> None:
        """Stop the worker processes, if any (the transport then trains in this process again)."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def upload(self, update: ClientUpdate, state: ClientState, stats: CommStats, plan: RoundPlan) -> ClientUpdate:
        """The client's update (attacked if it is byzantine) through the uplink codec; bytes into ``stats``.

        Error feedback lives in ``state``; ``plan`` is the round's full plan (the server reads a cut LoRA adapter back at its shapes).
        """
        update = byzantine_update(update, self.attacks.get(update.client_id), self.seed, plan.round)
        update, size = self.channel.transmit_update(update, state, plan)
        stats.bytes_up += size
        return update
