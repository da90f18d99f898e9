"""Federated strategies: server maths plus the client-side objective they declare.

Every module of this package is imported here (``pkgutil``), so a strategy file registers itself
(:func:`~fedtune.strategies.base.register_strategy`) and its client kinds
(:func:`~fedtune.client.kinds.register_kind`) with no other edit (FedDyn, :mod:`.feddyn`, is
imported only by that loop: it is the proof).
"""

import importlib
import pkgutil

from fedtune.strategies.base import (
    BuildContext,
    Capabilities,
    Strategy,
    capabilities_of,
    register_strategy,
    strategy_names,
    strategy_spec,
)
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedtune.strategies.fedprox import FedProx
from fedtune.strategies.lora import LoraAggregation
from fedtune.strategies.personal import PersonalLayers
from fedtune.strategies.private import DifferentiallyPrivate
from fedtune.strategies.robust import Krum, Median, MultiKrum, TrimmedMean
from fedtune.strategies.scaffold import Scaffold

_EDGE = frozenset({"from_config"})
"""Modules that use the registry rather than fill it (the config edge imports the round loop): not auto-imported."""

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _EDGE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Strategy", "Capabilities", "BuildContext", "register_strategy", "strategy_spec", "strategy_names",
    "capabilities_of", "FedAvg", "FedProx", "Scaffold", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad",
    "Median", "TrimmedMean", "Krum", "MultiKrum", "DifferentiallyPrivate", "PersonalLayers", "LoraAggregation",
]
