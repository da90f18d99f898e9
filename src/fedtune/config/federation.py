"""``[strategy]``, ``[federation]``, ``[privacy]``, ``[attack]``: the server's algorithm and the rounds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedtune.config.schema import _coerce, _help
from fedtune.errors import ConfigError


class StrategyConfig:
    """Server-side algorithm: ``[strategy]`` is ``name`` plus one flat table of options.

    The options are not listed here: every registered strategy declares its own options dataclass
    (:func:`fedtune.strategies.base.register_strategy`) and each of its fields is a key of this
    table (``strategy.mu``, ``strategy.alpha``, ...), with its type, default, help and validation.
    A key any registered strategy declares is accepted whatever ``name`` is (so one sweep may set
    ``strategy.mu`` for fedavg and fedprox alike), is checked by its declaring options class, and
    reaches only the strategies that declare it; any other key is an error naming it and the
    chosen strategy's options. Every key is always present with its value (the resolved
    configuration, checkpoints and reports see the same table). ``strategy.mu`` reads as
    ``exp.strategy.mu``; :meth:`options` is the chosen strategy's options object.
    """

    def __init__(self, name: str = "fedavg", **options: Any) -> None:
        from fedtune.strategies.base import option_table, registered_strategies, strategy_spec

        name = _coerce(str, name, "strategy.name")
        spec = strategy_spec(name)
        table = option_table()
        unknown = sorted(options.keys() - table.keys())
        if unknown:
            own = ", ".join(spec.option_names()) or "no options"
            others = ", ".join(k for k in table if k not in spec.option_names())
            raise ConfigError(f"unknown key 'strategy.{unknown[0]}' (strategy {name!r} takes: {own}; the other "
                              f"keys here: name, {others})")
        values = {k: f.default for k, f in table.items()}
        values.update({k: _coerce(table[k].type, v, f"strategy.{k}") for k, v in options.items()})
        for other in registered_strategies().values():  # every options class checks the keys it declares
            other.options(**{k: values[k] for k in other.option_names()})
        self.__dict__.update(name=name, _values=values)

    @classmethod
    def from_table(cls, raw: Mapping[str, Any]) -> "StrategyConfig":
        """Build from a ``[strategy]`` table (config loading; errors name the key)."""
        return cls(**raw)

    def to_table(self) -> dict[str, Any]:
        """``{"name": ..., <every option>: value}``: what TOML, checkpoints and reports hold."""
        return {"name": self.name, **self._values}

    def options(self) -> Any:
        """The chosen strategy's options dataclass, filled from this table."""
        from fedtune.strategies.base import strategy_spec

        spec = strategy_spec(self.name)
        return spec.options(**{k: self._values[k] for k in spec.option_names()})

    def __getattr__(self, key: str) -> Any:
        values = self.__dict__.get("_values")
        if values is None or key.startswith("_") or key not in values:
            raise AttributeError(f"StrategyConfig has no option {key!r}")
        return values[key]

    def __setattr__(self, key: str, value: Any) -> None:
        if key != "name" and key not in self._values:
            raise AttributeError(f"StrategyConfig has no option {key!r}")
        if key == "name":
            self.__dict__["name"] = value
        else:
            self._values[key] = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StrategyConfig) and self.to_table() == other.to_table()

    __hash__ = None  # type: ignore[assignment]  # unhashable: mutable, as the other sections (typeshed types __hash__ as a method)

    def __repr__(self) -> str:
        return "StrategyConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_table().items()) + ")"


@dataclass
class PrivacyConfig:
    """Central differential privacy (DP-FedAvg): clip each delta, noise the sum, account epsilon."""

    enabled: bool = field(default=False, metadata=_help("Turn central DP on (fedavg, fedprox and the FedOpt family)."))
    clip: float = field(default=1.0, metadata=_help("L2 norm every client delta is clipped to (> 0)."))
    noise_multiplier: float = field(
        default=1.0, metadata=_help("Noise std on the sum of clipped deltas, in units of clip (>= 0).")
    )
    delta: float = field(default=1e-5, metadata=_help("delta at which epsilon is reported each round, in (0, 1)."))

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ConfigError(f"privacy.clip must be > 0, got {self.clip}")
        if self.noise_multiplier < 0:
            raise ConfigError(f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta}")


@dataclass
class FederationConfig:
    """Rounds and client sampling."""

    rounds: int = field(default=5, metadata=_help("Number of federated rounds."))
    clients_per_round: int = field(default=0, metadata=_help("Clients sampled each round (0 = use fraction)."))
    fraction: float = field(default=1.0, metadata=_help("Fraction of clients sampled each round."))
    codec_up: str = field(
        default="none",
        metadata=_help("Codec of client updates, '+'-joined stages: topk:F, fp16|bf16|int8[:channel]|int16[:channel], "
                       "gzip[:L]|zstd[:L]; e.g. 'topk:0.01+int8+gzip' ('none' = float32). See fedtune.codecs."),
    )
    codec_down: str = field(
        default="none",
        metadata=_help("Codec of the model the server sends (as codec_up, without topk); clients train from the "
                       "decoded model and send their change relative to it."),
    )
    error_feedback: bool = field(
        default=True,
        metadata=_help("Lossy codec_up: each client keeps what compression dropped and adds it to its next update."),
    )
    comm_budget_bytes: int = field(
        default=0,
        metadata=_help("Communication budget: bytes moved both ways over the whole run (bytes_down + bytes_up, "
                       "summed over rounds); 0 = none. Passing it warns or stops the run (budget_action)."),
    )
    budget_action: Literal["warn", "stop"] = field(
        default="warn",
        metadata=_help("When comm_budget_bytes is passed: 'warn' (once, the run goes on) or 'stop' (the run ends "
                       "cleanly after the round that passed it: that round is evaluated, the model saved)."),
    )

    def __post_init__(self) -> None:
        from fedtune.codecs import CodecError, parse_codec

        for key, downlink in (("codec_up", False), ("codec_down", True)):
            try:
                parse_codec(getattr(self, key), downlink=downlink)
            except CodecError as exc:
                raise ConfigError(f"federation.{key} = {getattr(self, key)!r}: {exc}") from None
        if self.rounds < 1:
            raise ConfigError(f"federation.rounds must be >= 1, got {self.rounds}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"federation.fraction must be in (0, 1], got {self.fraction}")
        if self.clients_per_round < 0:
            raise ConfigError("federation.clients_per_round must be >= 0")
        if self.comm_budget_bytes < 0:
            raise ConfigError(f"federation.comm_budget_bytes must be >= 0 (0 = none), got {self.comm_budget_bytes}")


@dataclass
class AttackConfig:
    """Simulated byzantine clients (for studying robust aggregation)."""

    kind: Literal["none", "sign_flip", "scale", "noise", "label_flip"] = field(
        default="none", metadata=_help("What malicious clients do (none = no attack).")
    )
    fraction: float = field(default=0.0, metadata=_help("Fraction of clients that are malicious (seeded choice)."))
    clients: list[str] = field(default_factory=list, metadata=_help("Explicit malicious client ids (overrides fraction)."))
    scale: float = field(default=1.0, metadata=_help("sign_flip sends -scale*delta; scale sends scale*delta."))
    noise_std: float = field(default=1.0, metadata=_help("noise: standard deviation of the sent noise."))

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"attack.fraction must be in [0, 1], got {self.fraction}")
        if self.noise_std < 0:
            raise ConfigError(f"attack.noise_std must be >= 0, got {self.noise_std}")
        if self.kind != "none" and self.fraction == 0.0 and not self.clients:
            raise ConfigError(f"attack.kind = {self.kind!r} needs attack.fraction > 0 or attack.clients")
