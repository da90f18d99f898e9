"""Modules imported on their first attribute access, so that declaring things does not import torch.

The strategy files (one file per algorithm: options, server half, client half) are imported whenever
a configuration is read, to check its strategy options; their mathematics needs torch and fedtune's
tensor modules only when it runs. They bind those modules with :func:`lazy_module`, so
``fedtune config`` and the other configuration commands answer without importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any


class _LazyModule(ModuleType):
    """Stand-in for a module: its first attribute access imports the real module through
    :func:`importlib.import_module` (which holds the import lock, so two threads touching it at once
    import it once) and every access after that reads the real module."""

    def __init__(self, name: str) -> None:
        super().__init__(name, f"lazily imported module {name!r}")
        self.__dict__["_lazy_real"] = None

    def _lazy_load(self) -> ModuleType:
        real = self.__dict__["_lazy_real"]
        if real is None:
            real = importlib.import_module(self.__name__)
            self.__dict__["_lazy_real"] = real
        return real

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._lazy_load(), attr)

    def __dir__(self) -> list[str]:
        return dir(self._lazy_load())


def lazy_module(name: str) -> ModuleType:
    """Module ``name``: the imported one if it is already imported, else a stand-in that imports it on
    its first attribute access. Nothing is put into ``sys.modules`` until the real import runs.

    ``ModuleNotFoundError`` at once when the module does not exist (an install problem is not deferred).
    """
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return _LazyModule(name)
