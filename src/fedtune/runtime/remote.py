"""The contract between ``run_experiment`` and a runtime whose clients live elsewhere (Flower)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fedtune.config import Experiment
    from fedtune.server import Transport
    from fedtune.tasks.data import TaskData


class RemoteClients(Protocol):
    """Clients that keep their own training data and train behind a Transport.

    ``run_experiment(exp, remote=...)`` loads only what the server needs through ``load_task``
    (label vocabulary and eval split), asks ``connect`` which clients exist, then runs the usual
    round loop over ``transport``.
    """

    @property
    def transport(self) -> Transport:
        """The Transport the round loop uses to reach these clients."""
        ...

    def load_task(self, exp: Experiment) -> TaskData:
        """The task as the server sees it: labels and eval split (its training rows are never used)."""
        ...

    def connect(self, task: TaskData) -> dict[str, int]:
        """Wait for the clients, tell them the task; return ``{client_id: num_examples}``."""
        ...
