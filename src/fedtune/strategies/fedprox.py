"""FedProx (Li et al. 2020): FedAvg whose clients add a proximal term to their loss."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.strategies.fedavg import FedAvg
from fedtune.types import ProxTerm


@dataclass
class FedProx(FedAvg):
    """FedAvg aggregation; each client minimizes loss + mu/2 * ||w - w_global||^2 (enforced in local_train)."""

    mu: float = 0.01

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {self.mu}")

    def objective(self) -> ProxTerm:
        """The proximal term, as typed data in every RoundPlan."""
        return ProxTerm(mu=self.mu)
