"""A RoundPlan's fields walked generically, by their declared types: the one schema of what a plan carries.

Every runtime sends a plan through these functions (the simulation's :class:`~fedtune.channel.Channel`
and the Flower message codec), so a new RoundPlan field or a new client-side kind
(:mod:`fedtune.client.kinds`) travels everywhere with no codec change, and a field whose type has
no encoding is an error at once (never silently dropped). Types:

- ``TensorDict`` fields (the plan's ``params``, ``base_offset``, a kind's tensors such as
  SCAFFOLD's ``c``): payloads of their own, encoded with the downlink codec, keyed by path
  (``params``, ``objective.c``);
- scalars (``int``, ``float``, ``str``, ``bool``) and ``LocalTrainConfig``'s fields: config values;
- ``frozenset[str]``: a list of strings; ``Mapping[str, int]`` / ``Mapping[str, float]``: JSON text;
- ``ClientKind | None``: ``<field>.kind`` (the registered wire name, ``""`` for none) plus its fields.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, cast

import fedtune.strategies  # noqa: F401  (registers the built-in client kinds: prox, scaffold, lora)
from fedtune.client.kinds import ClientKind, kind_named
from fedtune.types import LocalTrainConfig, RoundPlan, TensorDict

ConfigValue = int | float | str | bool | list
"""What a plan's non-tensor fields become on the wire."""

_SCALARS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,)}
_KIND_FIELD = "ClientKind | None"
TENSORS_KEY = "tensors"
"""Config key listing the paths of the non-empty TensorDict fields that travel as payloads."""


class WireError(ValueError):
    """A plan cannot be encoded, or a received one does not follow the schema (names the key)."""


def _fields(obj_or_cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(obj_or_cls) if f.init]


def plan_tensors(plan: RoundPlan) -> dict[str, TensorDict]:
    """Every non-empty TensorDict field of ``plan`` and of its kinds, by path (``params`` first)."""
    out: dict[str, TensorDict] = {}
    for f in _fields(RoundPlan):
        value = getattr(plan, f.name)
        if str(f.type) == "TensorDict" and value:
            out[f.name] = value
        elif str(f.type) == _KIND_FIELD and value is not None:
            for kf in _fields(value):
                if str(kf.type) == "TensorDict" and getattr(value, kf.name):
                    out[f"{f.name}.{kf.name}"] = getattr(value, kf.name)
    return out


def with_tensors(plan: RoundPlan, tensors: Mapping[str, TensorDict]) -> RoundPlan:
    """``plan`` with the TensorDict fields at the given paths replaced (inverse of :func:`plan_tensors`)."""
    top: dict[str, Any] = {}
    kinds: dict[str, dict[str, TensorDict]] = {}
    for path, value in tensors.items():
        head, _, rest = path.partition(".")
        if rest:
            kinds.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for name, changes in kinds.items():
        top[name] = dataclasses.replace(getattr(plan, name), **changes)
    return dataclasses.replace(plan, **top)


def _encode_scalar(key: str, value: Any, type_name: str) -> ConfigValue:
    if type_name in _SCALARS:
        return value
    if type_name in ("Mapping[str, int]", "Mapping[str, float]"):
        return json.dumps(dict(value), sort_keys=True)
    if type_name == "frozenset[str]":
        return sorted(value)
    raise WireError(f"{key}: field type {type_name} has no wire encoding")


def _decode_scalar(config: Mapping[str, Any], key: str, type_name: str) -> Any:
    if key not in config:
        raise WireError(f"plan has no key {key!r}")
    value = config[key]
    if type_name in _SCALARS:
        expected = _SCALARS[type_name]
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            raise WireError(f"plan key {key!r}: expected {type_name}, got {value!r}")
        # (a float field holds a float or an int: checked above; isinstance on a tuple of types narrows to object)
        return float(cast("float | int", value)) if type_name == "float" else value
    if type_name in ("Mapping[str, int]", "Mapping[str, float]"):
        try:
            mapping = json.loads(value)
        except (TypeError, ValueError):
            raise WireError(f"plan key {key!r}: expected a JSON object, got {value!r}") from None
        if not isinstance(mapping, dict):
            raise WireError(f"plan key {key!r}: expected a JSON object, got {value!r}")
        return mapping
    if type_name == "frozenset[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise WireError(f"plan key {key!r}: expected a list of names, got {value!r}")
        return frozenset(value)
    raise WireError(f"{key}: field type {type_name} has no wire encoding")


def plan_config(plan: RoundPlan) -> dict[str, ConfigValue]:
    """The plan's non-tensor fields as flat config values (see the module docstring)."""
    config: dict[str, ConfigValue] = {TENSORS_KEY: list(plan_tensors(plan))}
    for f in _fields(RoundPlan):
        value, type_name = getattr(plan, f.name), str(f.type)
        if type_name == "TensorDict":
            continue
        if type_name == "LocalTrainConfig":
            for lf in _fields(LocalTrainConfig):
                config[f"{f.name}.{lf.name}"] = _encode_scalar(f"{f.name}.{lf.name}", getattr(value, lf.name),
                                                               str(lf.type))
        elif type_name == _KIND_FIELD:
            config[f"{f.name}.kind"] = _kind_wire(f.name, value)
            if value is not None:
                for kf in _fields(value):
                    if str(kf.type) != "TensorDict":
                        key = f"{f.name}.{kf.name}"
                        config[key] = _encode_scalar(key, getattr(value, kf.name), str(kf.type))
        else:
            config[f.name] = _encode_scalar(f.name, value, type_name)
    return config


def _kind_wire(field_name: str, value: ClientKind | None) -> str:
    if value is None:
        return ""
    if not isinstance(value, ClientKind) or not value.wire:
        raise WireError(f"plan.{field_name}: {type(value).__name__} is not a registered client kind")
    try:
        registered = kind_named(value.wire)
    except KeyError as exc:
        raise WireError(f"plan.{field_name}: {exc.args[0]}") from None
    if registered is not type(value):
        raise WireError(f"plan.{field_name}: wire name {value.wire!r} belongs to {registered.__name__}")
    return value.wire


def plan_from_config(config: Mapping[str, Any], tensors: Mapping[str, TensorDict]) -> RoundPlan:
    """Inverse of :func:`plan_config` plus :func:`plan_tensors` (WireError names a missing or bad key)."""
    listed = config.get(TENSORS_KEY, [])
    missing = [p for p in listed if p not in tensors]
    if missing:
        raise WireError(f"plan lists tensor payload(s) {missing} that did not arrive")
    kwargs: dict[str, Any] = {}
    for f in _fields(RoundPlan):
        type_name = str(f.type)
        if type_name == "TensorDict":
            kwargs[f.name] = dict(tensors.get(f.name, {}))
        elif type_name == "LocalTrainConfig":
            kwargs[f.name] = LocalTrainConfig(**{
                lf.name: _decode_scalar(config, f"{f.name}.{lf.name}", str(lf.type)) for lf in _fields(LocalTrainConfig)
            })
        elif type_name == _KIND_FIELD:
            wire = _decode_scalar(config, f"{f.name}.kind", "str")
            if not wire:
                kwargs[f.name] = None
                continue
            try:
                cls = kind_named(wire)
            except KeyError as exc:
                raise WireError(f"plan key '{f.name}.kind': {exc.args[0]}") from None
            values = {}
            for kf in _fields(cls):
                key = f"{f.name}.{kf.name}"
                values[kf.name] = dict(tensors.get(key, {})) if str(kf.type) == "TensorDict" else \
                    _decode_scalar(config, key, str(kf.type))
            kwargs[f.name] = cls(**values)
        else:
            kwargs[f.name] = _decode_scalar(config, f.name, type_name)
    return RoundPlan(**kwargs)
