"""Client-side kinds: typed data in a RoundPlan that carries its own local-training behaviour.

A strategy's client half (FedProx's proximal term, SCAFFOLD's control variate, a LoRA rule's
per-client rank and frozen factors, ...) is a frozen dataclass deriving from :class:`ClientKind`.
The one client runtime (:func:`fedtune.client.train.local_train`) and the batched multi-adapter
trainer (:mod:`fedtune.runtime.parallel`) never test which kind they hold: they call its hooks.
The message codec (:mod:`fedtune.wire`) carries its fields generically, by their declared types,
so a new kind travels to Flower nodes with no codec change: register it with :func:`register_kind`.

The hooks of one round, in the order the trainers call them on every local step::

    prepare(params)           once, before training: the tensors this client starts from
    on_backward(params)       right after backward (e.g. gradient masks)
    before_clip(params)       gradient terms of a modified objective (e.g. a proximal term)
    after_clip(params)        corrections applied after clipping (e.g. SCAFFOLD's c - c_i)
    finish(result)            once, after training: metrics, extras, the client's own state
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

from fedtune.types import ClientState, LocalTrainConfig, Metrics, TensorDict


@dataclass
class LocalContext:
    """What a client-side kind sees of one client's round in the sequential trainer."""

    client_id: str
    reference: TensorDict
    """The tensors training starts from (on the training device): the plan's, as prepared."""
    state: ClientState
    """The client's own memory across rounds (kept on the client, never sent whole)."""
    local: LocalTrainConfig
    device: torch.device


@dataclass
class LocalResult:
    """The outcome of one client's round, as the kinds' ``finish`` hooks may amend it."""

    client_id: str
    start: TensorDict
    """Where training started (CPU, float32): the prepared plan tensors."""
    local: TensorDict
    """The trained tensors (CPU, float32)."""
    delta: TensorDict
    """``local - start``; a kind may change entries (e.g. FedSA sends its own B)."""
    steps: int
    metrics: Metrics = field(default_factory=dict)
    extras: dict[str, TensorDict] = field(default_factory=dict)


class ClientHooks:
    """One round of a client-side kind in the sequential trainer; every hook defaults to nothing."""

    def on_backward(self, params: Mapping[str, nn.Parameter]) -> None:
        """Right after ``backward`` (gradients unscaled): e.g. mask or drop gradients."""

    def before_clip(self, params: Mapping[str, nn.Parameter]) -> None:
        """Add the gradient of an extra objective term, before gradient clipping."""

    def after_clip(self, params: Mapping[str, nn.Parameter]) -> None:
        """Change the clipped gradients just before the optimizer step."""

    def finish(self, result: LocalResult) -> None:
        """After training: add metrics or extras, keep state (``result`` is amended in place)."""


class StackedHooks:
    """One round of a client-side kind in the batched trainer: tensors stacked by client slot.

    ``stacks[name]`` has shape ``(K, *shape)``; ``grads`` are their gradients; ``active`` the
    slots still training this step.
    """

    def before_clip(self, stacks: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
                    active: Sequence[int]) -> None:
        """Per-slot version of :meth:`ClientHooks.before_clip`."""

    def after_clip(self, stacks: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor],
                   active: Sequence[int]) -> None:
        """Per-slot version of :meth:`ClientHooks.after_clip` (a missing gradient may be set)."""

    def finish(self, slot: int, result: LocalResult) -> None:
        """Per-slot version of :meth:`ClientHooks.finish`."""


@dataclass
class StackedContext:
    """What a client-side kind sees of a group of clients trained together."""

    client_ids: Sequence[str]
    reference: TensorDict
    """The shared starting tensors (on the device), unstacked."""
    states: Sequence[ClientState]
    local: LocalTrainConfig
    device: torch.device


class ClientKind:
    """Base of every client-side kind a RoundPlan carries; subclasses are frozen dataclasses.

    ``wire`` names the kind in messages (:func:`register_kind`). Fields may be scalars
    (``int``, ``float``, ``str``, ``bool``), ``TensorDict`` (sent with the downlink codec) or
    ``Mapping[str, int]`` (client-keyed settings).
    """

    wire: ClassVar[str] = ""

    def prepare(self, params: TensorDict, client_id: str, model: nn.Module) -> TensorDict:
        """The tensors ``client_id`` starts from, given what it received and the resident ``model``."""
        return params

    def shrink(self, tensors: Mapping[str, torch.Tensor], client_id: str) -> TensorDict:
        """What of ``tensors`` (plan params, an update's delta) travels for ``client_id`` (all, by default)."""
        return dict(tensors)

    def expand(self, tensors: Mapping[str, torch.Tensor], client_id: str,
               like: Mapping[str, torch.Tensor]) -> TensorDict:
        """Inverse of :meth:`shrink` on the server: ``tensors`` at the shapes of ``like``."""
        return dict(tensors)

    def personal_names(self, names: Sequence[str]) -> frozenset[str]:
        """Trainable tensors this kind keeps on the client (trained from the client's own copy)."""
        return frozenset()

    def start(self, ctx: LocalContext) -> ClientHooks:
        """This kind's hooks for one client's round in the sequential trainer."""
        return ClientHooks()

    def start_stacked(self, ctx: StackedContext) -> StackedHooks | None:
        """Hooks for a group trained together, or None when this kind needs clients one at a time."""
        return None

    def stacked_refusal(self, client_ids: Sequence[str]) -> str:
        """Why these clients cannot be trained together under this kind ('' when they can)."""
        return "" if type(self).start_stacked is not ClientKind.start_stacked else \
            f"client kind {type(self).__name__} has no batched form"


def plan_kinds(plan) -> list[ClientKind]:
    """The client-side kinds a RoundPlan carries (adapter first, then objective): the order hooks run in."""
    return [k for k in (plan.adapter, plan.objective) if k is not None]


_KINDS: dict[str, type[ClientKind]] = {}


def register_kind(cls: type[ClientKind]) -> type[ClientKind]:
    """Class decorator: make a client-side kind known to the message codec under ``cls.wire``."""
    if not cls.wire:
        raise TypeError(f"{cls.__name__}.wire must name the kind")
    other = _KINDS.get(cls.wire)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise TypeError(f"client kind {cls.wire!r} is registered twice ({other.__name__}, {cls.__name__})")
    _KINDS[cls.wire] = cls
    return cls


def kind_named(wire: str) -> type[ClientKind]:
    """The registered client-side kind called ``wire`` (KeyError listing the known ones).

    A kind is known once the module defining it is imported (:mod:`fedtune.wire` imports the built-in ones).
    """
    if wire not in _KINDS:
        raise KeyError(f"unknown client kind {wire!r} (known: {sorted(_KINDS)})")
    return _KINDS[wire]
