"""Federated strategies: server maths plus the client-side objective they declare."""

from fedtune.strategies.base import Strategy
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedtune.strategies.fedprox import FedProx
from fedtune.strategies.lora import LoraAggregation
from fedtune.strategies.personal import PersonalLayers
from fedtune.strategies.private import DifferentiallyPrivate
from fedtune.strategies.robust import Krum, Median, MultiKrum, TrimmedMean
from fedtune.strategies.scaffold import Scaffold

__all__ = [
    "Strategy", "FedAvg", "FedProx", "Scaffold", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad",
    "Median", "TrimmedMean", "Krum", "MultiKrum", "DifferentiallyPrivate", "PersonalLayers", "LoraAggregation",
]
