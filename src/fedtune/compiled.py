"""``train.compile``: the resident model's training forward through ``torch.compile``, built once.

The simulation keeps one model and swaps each client's tensors into it in place, so one compiled
forward serves every client and every round: the compile cost (about a minute for MiniLM on a
2-core CPU) is paid once per process. Shapes are compiled as dynamic, so dynamic padding and the
short last batch do not trigger recompiles. Evaluation stays eager.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

_ATTRIBUTE = "_fedtune_compiled_forward"


def training_forward(model: nn.Module, compile_model: bool) -> Callable:
    """What local training calls with a batch: the model itself, or its cached compiled form."""
    if not compile_model:
        return model
    compiled = model.__dict__.get(_ATTRIBUTE)
    if compiled is None:
        compiled = torch.compile(model, dynamic=True)
        # Stored outside nn.Module's registry: not a submodule, not in state_dict or parameters().
        object.__setattr__(model, _ATTRIBUTE, compiled)
    return compiled
