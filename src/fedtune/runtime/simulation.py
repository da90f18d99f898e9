"""In-process simulation: one resident model, each client's tensors swapped in, updates streamed out."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from fedtune.batching import EncodedDataset
from fedtune.client import local_train
from fedtune.payload import CommStats, payload_bytes
from fedtune.types import ClientState, ClientUpdate, ControlVariate, RoundPlan


def client_seed(seed: int, rnd: int, client_id: str) -> int:
    """A stable per-(run, round, client) seed for data order."""
    return zlib.crc32(f"{seed}/{rnd}/{client_id}".encode())


class SimulationTransport:
    """Runs every sampled client in turn on one resident model; yields each update as soon as it exists.

    Memory does not grow with the number of clients: the model is loaded once, and each update
    is consumed by the streaming aggregate before the next client starts.
    """

    def __init__(
        self,
        model: nn.Module,
        client_data: Mapping[str, EncodedDataset],
        *,
        pad_id: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.client_data = client_data
        self.pad_id = pad_id
        self.seed = seed
        self.device = device
        self.client_states: dict[str, ClientState] = {}
        """Each client's persistent state (kept here because in a simulation the client is us)."""

    def run_round(self, plan: RoundPlan, clients: Sequence[str], stats: CommStats) -> Iterator[ClientUpdate]:
        """Train each client on the plan; count the bytes each payload would take on the wire."""
        down = payload_bytes(plan.params)
        if isinstance(plan.objective, ControlVariate):
            down += payload_bytes(plan.objective.c)
        for cid in clients:
            stats.bytes_down += down
            update = local_train(
                self.model,
                self.client_data[cid],
                plan,
                cid,
                pad_id=self.pad_id,
                seed=client_seed(self.seed, plan.round, cid),
                device=self.device,
                state=self.client_states.setdefault(cid, {}),
            )
            stats.bytes_up += payload_bytes(update.delta) + sum(payload_bytes(t) for t in update.extras.values())
            yield update
