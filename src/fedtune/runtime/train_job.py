"""A unit of client work handed to a transport or to a worker process (see :class:`TrainJob`)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.types import RoundPlan


@dataclass(frozen=True)
class TrainJob:
    """A unit of client work: ``clients`` trained from ``plan`` (as they decode it), ``batched`` together or alone.

    ``server_plan`` is the plan the server reads their updates back against (the round's full plan;
    None in the copy a worker process gets), ``down`` the downlink bytes counted per client.
    """

    plan: RoundPlan
    server_plan: RoundPlan | None
    clients: tuple[str, ...]
    down: int
    batched: bool = False
