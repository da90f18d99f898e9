"""The codecs of a federation applied to what crosses the wire: RoundPlans down, ClientUpdates up.

Every runtime uses these helpers, so the simulation and Flower compress, count and decode the
same way:

- **Downlink** (server -> client): the plan's tensors (global params and tensor-valued
  objectives such as SCAFFOLD's ``c``) are encoded with ``codec_down``; a client trains from
  what it *decodes*, and its delta is computed against that decoded model. The server keeps its
  own full-precision global model and adds the aggregated deltas to it: the downlink's error is
  a perturbation of where clients start, it never accumulates in the global model (re-quantizing
  the global model every round would freeze updates smaller than one quantization step).
- **Uplink** (client -> server): the delta and every extras entry are encoded with ``codec_up``;
  the server aggregates what it decodes, so results reflect the codec. With error feedback
  (the default, for lossy uplink codecs) each client keeps what compression dropped in its
  ClientState (:data:`RESIDUAL`, and ``RESIDUAL + ":" + extras name``) and adds it to its next update.

Byte counts are ``len()`` of the encoded payloads: exactly what a transport sends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedtune.client.kinds import plan_kinds
from fedtune.codecs import Codec, CodecError, encode_with_feedback, parse_codec
from fedtune.types import ClientState, ClientUpdate, RoundPlan, TensorDict
from fedtune.wire import plan_tensors, with_tensors

UPLINK_ERROR = "uplink_error"
"""Client metric of a lossy uplink: ||x - sent|| / ||x||, x = the delta plus its residual (metrics.jsonl)."""

RESIDUAL = "codec_residual"
"""ClientState entry holding a client's uplink error-feedback residual for its delta."""


def residual_key(extra: str | None = None) -> str:
    """ClientState entry of the residual for the delta (``None``) or for an extras entry."""
    return RESIDUAL if extra is None else f"{RESIDUAL}:{extra}"


@dataclass(frozen=True)
class EncodedUpdate:
    """A ClientUpdate as it travels: its tensors as codec bytes, its scalars as they are."""

    client_id: str
    delta: bytes
    num_examples: int
    codec: str
    """Canonical spec of the uplink codec the tensors were encoded with."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    extras: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded tensors (delta plus extras)."""
        return len(self.delta) + sum(len(b) for b in self.extras.values())


@dataclass(frozen=True)
class Channel:
    """The uplink and downlink codecs of a federation, and whether clients use error feedback."""

    up: Codec = field(default_factory=Codec)
    down: Codec = field(default_factory=Codec)
    error_feedback: bool = True

    @classmethod
    def from_specs(cls, up: str = "none", down: str = "none", error_feedback: bool = True) -> "Channel":
        """Parse both spec strings (CodecError on a bad one)."""
        return cls(parse_codec(up), parse_codec(down, downlink=True), error_feedback)

    @classmethod
    def from_config(cls, federation) -> "Channel":
        """From ``[federation]`` (``codec_up``, ``codec_down``, ``error_feedback``)."""
        return cls.from_specs(federation.codec_up, federation.codec_down, federation.error_feedback)

    # ------------------------------------------------------------------ downlink

    def send_plan(self, plan: RoundPlan, client_id: str | None = None) -> tuple[RoundPlan, int]:
        """The plan as ``client_id`` decodes it, and the bytes it receives.

        Every TensorDict field of the plan and of its client-side kinds travels (params, base
        corrections, SCAFFOLD's ``c``, ...; :mod:`fedtune.wire`). A LoRA rule's adapter is cut to
        the client's rank first (:func:`client_view`). Lossless codecs give back the very same
        tensors (a test checks decode(encode(x)) == x).
        """
        view = client_view(plan, client_id)
        payloads = {path: self.down.encode(t) for path, t in plan_tensors(view).items()}
        size = sum(len(b) for b in payloads.values())
        if self.down.is_lossless:
            return view, size
        return with_tensors(view, {path: self.down.decode(b) for path, b in payloads.items()}), size

    # ------------------------------------------------------------------ uplink

    @property
    def keeps_residuals(self) -> bool:
        """Whether clients keep error-feedback residuals in their state (a lossy uplink with feedback on)."""
        return self.error_feedback and not self.up.is_lossless

    def encode_update(self, update: ClientUpdate, state: ClientState, plan: RoundPlan | None = None) -> EncodedUpdate:
        """Client side: encode ``update``'s tensors, with error feedback kept in ``state`` when lossy.

        ``plan`` is the round's plan as the client received it: a LoRA rule's adapter then
        travels cut to the client's rank (:func:`wire_update`).

        A lossy uplink adds the metric :data:`UPLINK_ERROR`: how much of the delta (plus its
        residual) this round's payload left out, relative, so a run shows what its codec costs.
        """
        feedback = self.keeps_residuals
        update = wire_update(update, plan)

        def encode(tensors, key: str) -> tuple[bytes, TensorDict | None, TensorDict | None]:
            """The payload, what the server decodes, and what it left out (both None when lossless)."""
            if self.up.is_lossless:
                return self.up.encode(tensors), None, None
            data, decoded, residual = encode_with_feedback(self.up, tensors, state.get(key) if feedback else None)
            if feedback:
                state[key] = residual
            return data, decoded, residual

        delta, decoded, left_out = encode(update.delta, residual_key())
        metrics = dict(update.metrics)
        if decoded is not None and left_out is not None:  # (the delta's only: extras are not scored; both or neither)
            metrics[UPLINK_ERROR] = relative_error(decoded, left_out)
        return EncodedUpdate(
            client_id=update.client_id,
            delta=delta,
            num_examples=update.num_examples,
            codec=str(self.up),
            metrics=metrics,
            extras={name: encode(t, residual_key(name))[0] for name, t in update.extras.items()},
        )

    def decode_update(self, encoded: EncodedUpdate, plan: RoundPlan | None = None) -> ClientUpdate:
        """Server side: the update the strategy aggregates (what the codec let through).

        ``plan`` is the round's full plan: a LoRA adapter sent at a client's rank is read back
        at the global shapes (zeros beyond its rank; FFA's unsent A unchanged).
        """
        if encoded.codec != str(self.up):
            raise CodecError(f"client {encoded.client_id} encoded its update with {encoded.codec!r}, "
                             f"the server expects codec_up = {str(self.up)!r}")
        update = ClientUpdate(
            client_id=encoded.client_id,
            delta=self.up.decode(encoded.delta),
            num_examples=encoded.num_examples,
            metrics=dict(encoded.metrics),
            extras={name: self.up.decode(b) for name, b in encoded.extras.items()},
        )
        return server_update(update, plan)

    def transmit_update(self, update: ClientUpdate, state: ClientState,
                        plan: RoundPlan | None = None) -> tuple[ClientUpdate, int]:
        """Both halves in one process (the simulation): what the server aggregates, and the bytes sent."""
        if self.up.is_identity:  # float32 safetensors round-trips exactly: count the bytes, keep the tensors
            sent = wire_update(update, plan)  # (what is cut away is exactly zero: see LoraClient.shrink)
            size = len(self.up.encode(sent.delta)) + sum(len(self.up.encode(t)) for t in sent.extras.values())
            return update, size
        encoded = self.encode_update(update, state, plan)
        return self.decode_update(encoded, plan), encoded.nbytes


def client_view(plan: RoundPlan, client_id: str | None) -> RoundPlan:
    """``plan`` as it travels to ``client_id``: a LoRA adapter cut to the client's rank (else unchanged)."""
    if client_id is None:
        return plan
    params = plan.params
    for kind in plan_kinds(plan):
        params = kind.shrink(params, client_id)
    return dataclasses.replace(plan, params=params)


def wire_update(update: ClientUpdate, plan: RoundPlan | None) -> ClientUpdate:
    """``update`` as it travels: a LoRA adapter's delta and extras cut to the client's rank."""
    return _reshape(update, plan, lambda kind, t: kind.shrink(t, update.client_id), reverse=False)


def server_update(update: ClientUpdate, plan: RoundPlan | None) -> ClientUpdate:
    """Inverse of :func:`wire_update` on the server: tensors at the global shapes of ``plan.params``."""
    if plan is None:  # (no plan, no adapter kinds: nothing to expand, as in _reshape)
        return update
    return _reshape(update, plan, lambda kind, t: kind.expand(t, update.client_id, plan.params), reverse=True)


def _reshape(update: ClientUpdate, plan: RoundPlan | None, apply, *, reverse: bool) -> ClientUpdate:
    """``apply(kind, tensors)`` to the delta and every extras entry, for each of the plan's kinds."""
    kinds = plan_kinds(plan) if plan is not None else []
    if not kinds:
        return update
    delta, extras = update.delta, dict(update.extras)
    for kind in (reversed(kinds) if reverse else kinds):
        delta, extras = apply(kind, delta), {k: apply(kind, v) for k, v in extras.items()}
    return dataclasses.replace(update, delta=delta, extras=extras)


def relative_error(sent: TensorDict, left_out: TensorDict) -> float:
    """``||left_out|| / ||sent + left_out||`` over all tensors of ``left_out`` (0 when both are zero)."""
    lost = sum(float(r.double().pow(2).sum()) for r in left_out.values())
    whole = sum(float((sent[k].double() + r.double()).pow(2).sum()) for k, r in left_out.items())
    return (lost / whole) ** 0.5 if whole > 0 else 0.0
