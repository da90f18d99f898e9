"""The one typed (de)serializer between fedtune's payloads and Flower records.

Every record name and config key that crosses the wire is defined here and nowhere else:
the ServerApp and the ClientApp only call ``encode_*`` / ``decode_*``. Tensors travel as the
bytes of the federation's codecs (:mod:`fedtune.codecs`: safetensors, optionally quantized,
sparsified and compressed; never pickle), each in an ``ArrayRecord`` holding one opaque
``Array`` (stype ``"fedtune.codec"``, Flower chunks it like any array); scalars as
``ConfigRecord`` / ``MetricRecord`` values. A message that does not match the schema is a
:class:`MessageError` naming the record and key.

Layout of a train request (server -> node) ``RecordDict``; the plan's fields are walked
generically by :mod:`fedtune.wire`, so every RoundPlan field and every client-side kind travels::

    "fedtune.plan"    ConfigRecord  schema, client_id, task.label_names, task.regression,
                                    codec.up, codec.down, codec.error_feedback, and plan.<key> for every
                                    key of wire.plan_config (round, local.*, objective.kind, objective.<field>,
                                    adapter.kind, adapter.<field>, personal, tensors)
    "fedtune.tensor.<path>"  ArrayRecord   each TensorDict field (params, base_offset, objective.c, ...),
                                    encoded with codec.down

an IDENTIFY request carries ``"fedtune.task"`` (schema, task.*), its reply ``"fedtune.identity"``
(schema, client_id, num_examples); a train reply (node -> server)::

    "fedtune.update"  ConfigRecord  schema, client_id, num_examples, extras (names), codec (codec.up)
    "fedtune.delta"   ArrayRecord   ClientUpdate.delta, encoded with codec.up
    "fedtune.metrics" MetricRecord  ClientUpdate.metrics
    "fedtune.extra.<name>" ArrayRecord   ClientUpdate.extras[name], encoded with codec.up

and every reply may carry ``"fedtune.timing"`` (MetricRecord: phase -> seconds on the node,
:mod:`fedtune.runtime.flower.node_timing`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.channel import Channel, EncodedUpdate
from fedtune.client.evaluate import ScoreRequest
from fedtune.codecs import Codec, CodecError
from fedtune.types import ClientScore, ClientState, RoundPlan, TensorDict
from fedtune.wire import WireError, plan_config, plan_from_config, plan_tensors

if TYPE_CHECKING:
    from flwr.common import ConfigRecordValues

SCHEMA = 3
"""Version of this layout; a peer speaking another version is refused with a clear error."""

TRAIN = "train"
"""Flower message type of a training round."""
SCORE = "evaluate"
"""Flower message type asking a client to score a model on its own rows (federated evaluation)."""
IDENTIFY = "query.identify"
"""Flower message type asking a node which fedtune client it is."""

_PLAN, _TENSOR, _PLAN_KEY = "fedtune.plan", "fedtune.tensor.", "plan."
_UPDATE, _DELTA, _METRICS, _EXTRA = "fedtune.update", "fedtune.delta", "fedtune.metrics", "fedtune.extra."
_IDENTITY, _TASK = "fedtune.identity", "fedtune.task"
_SCORE_REQUEST, _SCORE_REPLY, _SCORES = "fedtune.score", "fedtune.scored", "fedtune.scores"
_STATE = "fedtune.state."
_TIMING = "fedtune.timing"
_PAYLOAD, _PAYLOAD_STYPE = "payload", "fedtune.codec"

class MessageError(ValueError):
    """A Flower message does not follow fedtune's schema (names the record and key)."""


@dataclass(frozen=True)
class TaskInfo:
    """What every client must agree on with the server to build the same model head."""

    label_names: tuple[str, ...] | None
    """Class names in id order; ``None`` for regression."""

    @property
    def num_labels(self) -> int:
        """Number of output units of the head."""
        return 1 if self.label_names is None else len(self.label_names)


@dataclass(frozen=True)
class TrainRequest:
    """A RoundPlan addressed to one client, plus the task it trains on."""

    client_id: str
    plan: RoundPlan
    task: TaskInfo
    channel: Channel = dataclasses.field(default_factory=Channel)
    """The federation's codecs: the plan travels with ``channel.down``; the reply must use ``channel.up``."""


@dataclass(frozen=True)
class Identity:
    """A node's answer to IDENTIFY: which fedtune client it is and how much data it holds."""

    client_id: str
    num_examples: int


# ----------------------------------------------------------------------------- tensors


def tensors_to_record(tensors: TensorDict) -> ArrayRecord:
    """A TensorDict as an ArrayRecord (float32/int tensors; names kept, order kept)."""
    bad = [k for k, v in tensors.items() if v.dtype in (torch.bfloat16,)]
    if bad:
        raise MessageError(f"tensor {bad[0]!r} has dtype bfloat16, which Flower arrays (NumPy) cannot carry")
    return ArrayRecord(torch_state_dict={k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> TensorDict:
    """Inverse of :func:`tensors_to_record` (tensors own their memory)."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def payload_record(data: bytes) -> ArrayRecord:
    """Codec bytes as an ArrayRecord holding one opaque Array (Flower chunks and ships its bytes as they are)."""
    return ArrayRecord(array_dict={_PAYLOAD: Array(dtype="uint8", shape=(len(data),), stype=_PAYLOAD_STYPE, data=data)})


def record_payload(content: RecordDict, name: str) -> bytes:
    """The codec bytes of record ``name`` (inverse of :func:`payload_record`)."""
    rec = _record(content, name, ArrayRecord)
    if _PAYLOAD not in rec or rec[_PAYLOAD].stype != _PAYLOAD_STYPE:
        raise MessageError(f"record {name!r} does not hold a fedtune codec payload")
    return bytes(rec[_PAYLOAD].data)


def _decode_payload(codec: Codec, data: bytes, name: str) -> TensorDict:
    try:
        return codec.decode(data)
    except CodecError as exc:
        raise MessageError(f"record {name!r}: {exc}") from None


# ----------------------------------------------------------------------------- config helpers


def _get(record: ConfigRecord | MetricRecord, name: str, key: str, types: type | tuple[type, ...]):
    if key not in record:
        raise MessageError(f"record {name!r} has no key {key!r}")
    value = record[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise MessageError(f"record {name!r} key {key!r}: expected {types}, got {value!r}")
    if not isinstance(value, types):
        raise MessageError(f"record {name!r} key {key!r}: expected {types}, got {value!r}")
    return value


def _record(content: RecordDict, name: str, kind: type):
    if name not in content:
        raise MessageError(f"message has no record {name!r} (records: {sorted(content.keys())})")
    rec = content[name]
    if not isinstance(rec, kind):
        raise MessageError(f"record {name!r} is a {type(rec).__name__}, expected {kind.__name__}")
    return rec


def _check_schema(record: ConfigRecord, name: str) -> None:
    got = _get(record, name, "schema", int)
    if got != SCHEMA:
        raise MessageError(f"record {name!r} uses fedtune message schema {got}, this side speaks {SCHEMA}")


# ----------------------------------------------------------------------------- train request / reply


def _encode_task(task: TaskInfo) -> dict:
    return {"task.regression": task.label_names is None, "task.label_names": list(task.label_names or [])}


def _decode_task(record: ConfigRecord, name: str) -> TaskInfo:
    regression = _get(record, name, "task.regression", bool)
    names = record.get("task.label_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise MessageError(f"record {name!r} key 'task.label_names': expected a list of strings, got {names!r}")
    return TaskInfo(label_names=None if regression else tuple(cast("list[str]", names)))  # (strings: checked above)


def _encode_channel(channel: Channel) -> dict:
    return {"codec.up": str(channel.up), "codec.down": str(channel.down),
            "codec.error_feedback": bool(channel.error_feedback)}


def _decode_channel(record: ConfigRecord, name: str) -> Channel:
    up, down = _get(record, name, "codec.up", str), _get(record, name, "codec.down", str)
    try:
        return Channel.from_specs(up, down, _get(record, name, "codec.error_feedback", bool))
    except CodecError as exc:
        raise MessageError(f"record {name!r}: {exc}") from None


class SharedPayloads:
    """The encoded tensors of one round's messages, each encoded (and held) once however many carry it.

    Clients usually receive the very same tensors (the global model; a rank-``r`` cut of a LoRA
    adapter is the same view for every client of rank ``r``). Encoding them once per client held
    one copy per client in the ServerApp (538 MB each for a full SmolLM2-135M); with this cache the
    messages share one ``ArrayRecord`` per distinct tensor view, and Flower, which addresses the
    objects it pushes by content, sends it to the SuperLink once. Codecs are deterministic, so a
    shared encoding is exactly what each client's own would be. A view is keyed by its storage,
    offset, shape, stride and dtype; the cache keeps every keyed tensor alive, so a key can never
    be reused by another tensor while the cache lives (one round).
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._records: dict[tuple, tuple[TensorDict, ArrayRecord]] = {}

    def record(self, tensors: TensorDict) -> ArrayRecord:
        """``tensors`` encoded with the codec, as an ArrayRecord (the same object for the same views)."""
        key = tuple((name, _view_key(t)) for name, t in sorted(tensors.items()))
        if key not in self._records:
            self._records[key] = (dict(tensors), payload_record(self.codec.encode(tensors)))
        return self._records[key][1]

    def __len__(self) -> int:
        return len(self._records)


def _view_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def encode_train_request(request: TrainRequest, shared: SharedPayloads | None = None) -> RecordDict:
    """RecordDict of a train message (see the module docstring for the layout); tensors via ``channel.down``.

    ``shared`` (for the codec ``channel.down``) lets the messages of one round share their encoded tensors.
    """
    plan = request.plan
    down = request.channel.down
    try:
        fields = plan_config(plan)
    except WireError as exc:
        raise MessageError(str(exc)) from None
    config = {
        "schema": SCHEMA,
        "client_id": request.client_id,
        **{_PLAN_KEY + k: v for k, v in fields.items()},
        **_encode_task(request.task),
        **_encode_channel(request.channel),
    }
    if shared is not None and shared.codec is not down:
        raise ValueError("shared payloads were encoded with another codec than the request's channel.down")
    encode = shared.record if shared is not None else (lambda t: payload_record(down.encode(t)))
    arrays = {_TENSOR + path: encode(t) for path, t in plan_tensors(plan).items()}
    return RecordDict({_PLAN: ConfigRecord(config), **arrays})


def decode_train_request(content: RecordDict) -> TrainRequest:
    """Inverse of :func:`encode_train_request`; the plan holds the tensors as the downlink codec decodes them."""
    rec = _record(content, _PLAN, ConfigRecord)
    _check_schema(rec, _PLAN)
    channel = _decode_channel(rec, _PLAN)
    fields = {k[len(_PLAN_KEY):]: v for k, v in rec.items() if k.startswith(_PLAN_KEY)}
    paths = [k[len(_TENSOR):] for k in content.keys() if k.startswith(_TENSOR)]
    tensors = {p: _decode_payload(channel.down, record_payload(content, _TENSOR + p), _TENSOR + p) for p in paths}
    try:
        plan = plan_from_config(fields, tensors)
    except WireError as exc:
        raise MessageError(f"record {_PLAN!r}: {exc}") from None
    return TrainRequest(
        client_id=_get(rec, _PLAN, "client_id", str),
        plan=plan,
        task=_decode_task(rec, _PLAN),
        channel=channel,
    )


def encode_update(update: EncodedUpdate) -> RecordDict:
    """RecordDict of a train reply carrying ``update`` (already encoded by :meth:`Channel.encode_update`)."""
    config: dict[str, ConfigRecordValues] = {
        "schema": SCHEMA,
        "client_id": update.client_id,
        "num_examples": int(update.num_examples),
        "extras": sorted(update.extras),
        "codec": update.codec,
    }
    content = RecordDict({
        _UPDATE: ConfigRecord(config),
        _DELTA: payload_record(update.delta),
        _METRICS: MetricRecord({k: float(v) for k, v in update.metrics.items()}),
    })
    for name, data in update.extras.items():
        content[_EXTRA + name] = payload_record(data)
    return content


def with_timing(content: RecordDict, phases: dict[str, float]) -> RecordDict:
    """``content`` with the node's phase timings (seconds) added as the ``fedtune.timing`` record."""
    content[_TIMING] = MetricRecord({k: float(v) for k, v in phases.items()})
    return content


def read_timing(content: RecordDict) -> dict[str, float]:
    """The node's phase timings of a reply (empty when it carries none, e.g. a SecAgg+ reply)."""
    rec = content.get(_TIMING) if _TIMING in content else None
    if rec is None:
        return {}
    if not isinstance(rec, MetricRecord):
        raise MessageError(f"record {_TIMING!r}: expected a MetricRecord, got {type(rec).__name__}")
    timing: dict[str, float] = {}
    for k, v in rec.items():
        if not isinstance(v, (int, float)):  # (a MetricRecord may hold lists: a phase is one number of seconds)
            raise MessageError(f"record {_TIMING!r} key {k!r}: expected seconds, got {v!r}")
        timing[k] = float(v)
    return timing


def decode_update(content: RecordDict) -> EncodedUpdate:
    """Inverse of :func:`encode_update` (the server decodes the tensors with :meth:`Channel.decode_update`)."""
    rec = _record(content, _UPDATE, ConfigRecord)
    _check_schema(rec, _UPDATE)
    extras_names = rec.get("extras", [])
    if not isinstance(extras_names, list):
        raise MessageError(f"record {_UPDATE!r} key 'extras': expected a list of names, got {extras_names!r}")
    metrics = _record(content, _METRICS, MetricRecord)
    return EncodedUpdate(
        client_id=_get(rec, _UPDATE, "client_id", str),
        delta=record_payload(content, _DELTA),
        num_examples=_get(rec, _UPDATE, "num_examples", int),
        codec=_get(rec, _UPDATE, "codec", str),
        metrics={k: float(v) for k, v in metrics.items()},
        extras={n: record_payload(content, _EXTRA + n) for n in extras_names},
    )


# ----------------------------------------------------------------------------- scoring (evaluate messages)


def encode_score_request(request: TrainRequest, score: ScoreRequest,
                         shared: SharedPayloads | None = None) -> RecordDict:
    """An EVALUATE message: the plan to score (as a train request carries it) and what to score."""
    content = encode_train_request(request, shared)
    content[_SCORE_REQUEST] = ConfigRecord({"schema": SCHEMA, "rows": score.rows,
                                            "personalization": score.personalization,
                                            "finetune_steps": int(score.finetune_steps)})
    return content


def decode_score_request(content: RecordDict) -> tuple[TrainRequest, ScoreRequest]:
    """Inverse of :func:`encode_score_request`."""
    rec = _record(content, _SCORE_REQUEST, ConfigRecord)
    _check_schema(rec, _SCORE_REQUEST)
    score = ScoreRequest(rows=_get(rec, _SCORE_REQUEST, "rows", str),
                         personalization=_get(rec, _SCORE_REQUEST, "personalization", str),
                         finetune_steps=_get(rec, _SCORE_REQUEST, "finetune_steps", int))
    return decode_train_request(content), score


def encode_score(score: ClientScore) -> RecordDict:
    """An EVALUATE reply: the client's scores and how many rows they cover (never the rows)."""
    return RecordDict({
        _SCORE_REPLY: ConfigRecord({"schema": SCHEMA, "client_id": score.client_id,
                                    "num_examples": int(score.num_examples)}),
        _SCORES: MetricRecord({k: float(v) for k, v in score.scores.items()}),
    })


def decode_score(content: RecordDict) -> ClientScore:
    """Inverse of :func:`encode_score`."""
    rec = _record(content, _SCORE_REPLY, ConfigRecord)
    _check_schema(rec, _SCORE_REPLY)
    scores = _record(content, _SCORES, MetricRecord)
    return ClientScore(client_id=_get(rec, _SCORE_REPLY, "client_id", str),
                       num_examples=_get(rec, _SCORE_REPLY, "num_examples", int),
                       scores={k: float(v) for k, v in scores.items()})


# ----------------------------------------------------------------------------- identify


def encode_identify_request(task: TaskInfo) -> RecordDict:
    """RecordDict of an IDENTIFY request: the task, so the node can check its data against the labels."""
    return RecordDict({_TASK: ConfigRecord({"schema": SCHEMA, **_encode_task(task)})})


def decode_identify_request(content: RecordDict) -> TaskInfo:
    """Inverse of :func:`encode_identify_request`."""
    rec = _record(content, _TASK, ConfigRecord)
    _check_schema(rec, _TASK)
    return _decode_task(rec, _TASK)


def encode_identity(identity: Identity) -> RecordDict:
    """RecordDict of an IDENTIFY reply."""
    return RecordDict({_IDENTITY: ConfigRecord({
        "schema": SCHEMA, "client_id": identity.client_id, "num_examples": int(identity.num_examples),
    })})


def decode_identity(content: RecordDict) -> Identity:
    """Inverse of :func:`encode_identity`."""
    rec = _record(content, _IDENTITY, ConfigRecord)
    _check_schema(rec, _IDENTITY)
    return Identity(client_id=_get(rec, _IDENTITY, "client_id", str),
                    num_examples=_get(rec, _IDENTITY, "num_examples", int))


# ----------------------------------------------------------------------------- client state


def save_client_state(state: ClientState, store: RecordDict) -> None:
    """Write a client's persistent state into a Flower ``context.state`` (one ArrayRecord per purpose)."""
    for key in [k for k in store.keys() if k.startswith(_STATE)]:
        if key[len(_STATE):] not in state:
            del store[key]
    for purpose, tensors in state.items():
        store[_STATE + purpose] = tensors_to_record(tensors)


def load_client_state(store: RecordDict) -> ClientState:
    """Inverse of :func:`save_client_state`; ``{}`` on a node's first round."""
    return {
        key[len(_STATE):]: record_to_tensors(rec)
        for key, rec in store.items()
        if key.startswith(_STATE) and isinstance(rec, ArrayRecord)
    }


# ----------------------------------------------------------------------------- byte accounting


def encoded_size(content: RecordDict) -> int:
    """Exact bytes of the serialized records Flower ships for ``content``.

    Flower deflates a message's RecordDict into content-addressed objects (records, arrays,
    array chunks) and uploads each one; this is the sum of their serialized sizes (HTTP/TLS
    framing and the message envelope excluded).
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())

