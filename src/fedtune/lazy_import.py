"""Modules executed on their first attribute access, so that declaring things does not import torch.

The strategy files (one file per algorithm: options, server half, client half) are imported whenever
a configuration is read, to check its strategy options; their mathematics needs torch and fedtune's
tensor modules only when it runs. They bind those modules with :func:`lazy_module`, so
``fedtune config`` and the other configuration commands answer without importing torch.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """Module ``name``: the imported one if it is already imported, else one that imports itself on its
    first attribute access (:class:`importlib.util.LazyLoader`).

    ``ModuleNotFoundError`` at once when the module does not exist (an install problem is not deferred).
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    if parent:  # (as an import does: ``import fedtune.tensors`` then ``fedtune.tensors.x`` finds it)
        setattr(sys.modules[parent], child, module)
    return module
