"""Federated strategies: server maths plus the client-side objective they declare."""

from fedtune.strategies.base import Strategy
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.fedprox import FedProx

__all__ = ["Strategy", "FedAvg", "FedProx"]
