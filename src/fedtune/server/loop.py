"""The round loop: the only place that iterates over rounds. Transports plug in underneath."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedtune.channel import UPLINK_ERROR
from fedtune.divergence import Divergence
from fedtune.payload import CommStats
from fedtune.strategies.base import Strategy
from fedtune.types import ClientUpdate, Metrics, RoundPlan, ServerState
from fedtune.validation import accepted_updates

log = logging.getLogger(__name__)


class Transport(Protocol):
    """Carries a RoundPlan to clients and their updates back (in-process or over a network)."""

    def run_round(self, plan: RoundPlan, clients: Sequence[str], stats: CommStats) -> Iterator[ClientUpdate]:
        """Run local training on ``clients``; yield their updates as they arrive; count bytes in ``stats``."""
        ...


class RoundCallback(Protocol):
    """Called after every round with the new state and the round's record."""

    def __call__(self, state: ServerState, record: dict) -> None:
        """React to the round just finished: the new server state and the round's record."""


def sample_clients(clients: Sequence[str], rnd: int, count: int, seed: int) -> list[str]:
    """``count`` clients drawn without replacement, reproducible from (seed, round); all when count >= len."""
    if count >= len(clients):
        return list(clients)
    rng = random.Random(f"{seed}/sample/{rnd}")
    return sorted(rng.sample(list(clients), count), key=list(clients).index)


def clients_per_round(num_clients: int, count: int, fraction: float) -> int:
    """How many clients a round samples: ``count`` when set, else ceil-free round(fraction * n), at least 1."""
    if count > 0:
        return min(count, num_clients)
    return max(1, int(round(fraction * num_clients)))


@dataclass
class _ClientMetricsTap:
    """Collects per-client scalar metrics from the update stream without keeping tensors."""

    rows: list[tuple[str, int, dict]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    divergence: Divergence = field(default_factory=Divergence)

    def tap(self, updates: Iterable[ClientUpdate]) -> Iterator[ClientUpdate]:
        for u in updates:
            self.rows.append((u.client_id, u.num_examples, dict(u.metrics)))
            yield u

    def tap_accepted(self, updates: Iterable[ClientUpdate]) -> Iterator[ClientUpdate]:
        for u in updates:
            self.divergence.add(u.delta)
            yield u

    def weighted(self, key: str) -> float | None:
        pairs = [(n, m[key]) for _, n, m in self.rows if key in m]
        total = sum(n for n, _ in pairs)
        return sum(n * v for n, v in pairs) / total if total else None


def run_rounds(
    strategy: Strategy,
    transport: Transport,
    clients: Sequence[str],
    initial: ServerState,
    *,
    rounds: int,
    per_round: int,
    seed: int,
    evaluate: Callable[[ServerState], Metrics] | None = None,
    eval_every: int = 1,
    callbacks: Sequence[RoundCallback] = (),
    on_client_done: Callable[[str], None] | None = None,
    eval_initial: bool = False,
    wall_time_offset: float = 0.0,
    stop: Callable[[dict], str | None] | None = None,
) -> tuple[ServerState, list[dict]]:
    """Run rounds ``initial.round + 1 .. rounds``; return the final state and one record per round.

    With ``eval_initial`` the starting model is evaluated first and recorded as round ``initial.round``.
    ``wall_time_offset`` is added to every record's ``wall_time`` (a resumed run continues its clock).
    ``stop`` sees each round's record before evaluation; a reason it returns ends the run after that
    round (evaluated, recorded with ``"stopped": reason``), e.g. a communication budget (fedtune.budget).
    """
    state = initial
    history: list[dict] = []
    start = time.perf_counter() - wall_time_offset
    record: dict[str, Any]  # a round's record: numbers, and lists / strings for failures and stops
    if eval_initial and evaluate is not None:
        record = {"round": initial.round, "clients": 0, **{f"eval_{k}": v for k, v in evaluate(state).items()}}
        record["eval_time"] = record["wall_time"] = time.perf_counter() - start
        history.append(record)
        for cb in callbacks:
            cb(state, record)
    for rnd in range(initial.round + 1, rounds + 1):
        t0 = time.perf_counter()
        sampled = sample_clients(clients, rnd, per_round, seed)
        plan = strategy.configure(rnd, state, sampled)
        stats = CommStats()
        tap = _ClientMetricsTap()

        def reject(update: ClientUpdate, reason: str, tap: _ClientMetricsTap = tap) -> None:
            tap.rejected.append((update.client_id, reason))

        stream = transport.run_round(plan, sampled, stats)
        if on_client_done is not None:
            stream = _notify(stream, on_client_done)
        valid = tap.tap_accepted(accepted_updates(tap.tap(stream), state.params, reject))
        state, agg_metrics = strategy.aggregate(rnd, state, valid)
        train_time = time.perf_counter() - t0
        record = {
            "round": rnd,
            "clients": len(sampled),
            "clients_aggregated": len(tap.rows) - len(tap.rejected),
            "train_loss": tap.weighted("train_loss"),
            "bytes_down": stats.bytes_down,
            "bytes_up": stats.bytes_up,
            "divergence": tap.divergence.result(),
        }
        if plan.local.lr_schedule != "constant":
            record["lr"] = plan.local.round_lr(rnd)
        uplink_error = tap.weighted(UPLINK_ERROR)
        if uplink_error is not None:  # (a lossy codec_up: what the payloads left out, relative)
            record[UPLINK_ERROR] = uplink_error
        record.update({k: v for k, v in agg_metrics.items() if k not in record})
        if stats.failed:  # (a real federation: clients offline, timed out, failed or restarted)
            record["failed"] = [{"client": c, "reason": r} for c, r in stats.failed]
        if stats.restarted:
            record["restarted"] = list(stats.restarted)
        if tap.rejected:
            record["rejected"] = [{"client": c, "reason": r} for c, r in tap.rejected]
        stopped = stop(record) if stop is not None else None
        if stopped:
            record["stopped"] = stopped
            log.warning("stopping after round %d: %s", rnd, stopped)
        if evaluate is not None and (rnd % eval_every == 0 or rnd == rounds or stopped):
            t1 = time.perf_counter()
            record.update({f"eval_{k}": v for k, v in evaluate(state).items()})
            record["eval_time"] = time.perf_counter() - t1
        record["round_time"] = train_time
        record["wall_time"] = time.perf_counter() - start
        history.append(record)
        for cb in callbacks:
            cb(state, record)
        if stopped:
            break
    return state, history


def _notify(stream: Iterable[ClientUpdate], fn: Callable[[str], None]) -> Iterator[ClientUpdate]:
    for u in stream:
        fn(u.client_id)
        yield u
