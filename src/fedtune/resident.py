"""Frozen tensors of a resident model that a rule alters, kept as loaded so any state can be restored.

FedEx-LoRA / FLoRA correct the frozen base weights (``sync_base``); FFA's shared A is zeroed beyond
a client's rank in the resident model. Both are restored from :func:`loaded_value`, in every runtime.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fedtune.types import TensorDict

_PRISTINE: "weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()
"""Each resident model's frozen base weights as loaded, for the names a base correction ever touched."""


def sync_base(model: nn.Module, offset: TensorDict) -> None:
    """Set the frozen base weights ``offset`` names to their loaded value plus the offset.

    FedEx-LoRA and FLoRA fold part of every update into the frozen base (``RoundPlan.base_offset``,
    the global state's ``BASE_OFFSET`` buffer). Weights corrected before but absent from
    ``offset`` go back to their loaded value, so a model can serve any state in any order
    (training, evaluation, saving) and always equals pristine + that state's offset.
    """
    corrected = _CORRECTED.setdefault(model, set())
    if not offset and not corrected:
        return
    named = dict(model.named_parameters())
    unknown = [n for n in offset if n not in named]
    if unknown:
        raise KeyError(f"base correction for {unknown[0]}: the model has no such weight")
    with torch.no_grad():
        for name in list(offset) + [n for n in corrected if n not in offset]:
            w0 = loaded_value(model, name)
            named[name].copy_(w0 + offset[name].to(w0) if name in offset else w0)
    corrected.clear()
    corrected.update(offset)


_CORRECTED: "weakref.WeakKeyDictionary[nn.Module, set[str]]" = weakref.WeakKeyDictionary()
"""Names of the base weights each model currently holds corrected (so a later state can undo them)."""


def loaded_value(model: nn.Module, name: str) -> torch.Tensor:
    """Parameter ``name`` as it was when first asked for (a detached copy kept per model).

    Call it before anything changes that parameter: frozen tensors that a rule alters in the
    resident model (base weights under FedEx-LoRA / FLoRA; FFA's shared A, zeroed beyond a
    client's rank) are restored from here, in every runtime alike.
    """
    store = _PRISTINE.setdefault(model, {})
    if name not in store:
        store[name] = dict(model.named_parameters())[name].detach().clone()
    return store[name]
