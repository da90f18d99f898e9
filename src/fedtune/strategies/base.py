"""The Strategy contract (DESIGN.md): init, configure, aggregate; capability flags; the registry of names.

A strategy file registers itself: its build function is decorated with :func:`register_strategy`,
naming the strategy, its options dataclass (the ``[strategy]`` keys it reads) and its
:class:`Capabilities`. Every module of :mod:`fedtune.strategies` is imported when the package is
(``pkgutil``), so a new file is known to the config, the CLI, the checks, checkpointing and Flower
with no other edit. See ``docs/write-your-own-strategy.md``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fedtune.errors import ConfigError
from fedtune.types import ClientUpdate, LocalTrainConfig, Metrics, RoundPlan, ServerState, TensorDict


@runtime_checkable
class Strategy(Protocol):
    """A federated algorithm. The server loop calls these three methods and nothing else."""

    def init(self, params: TensorDict) -> ServerState:
        """The state before round 1, from the initial global trainable tensors."""
        ...

    def configure(self, rnd: int, state: ServerState, clients: Sequence[str]) -> RoundPlan:
        """The plan sent to this round's sampled clients."""
        ...

    def aggregate(
        self, rnd: int, state: ServerState, updates: Iterable[ClientUpdate]
    ) -> tuple[ServerState, Metrics]:
        """Fold the round's client updates (consumed once, as a stream) into a new state."""
        ...


@dataclass(frozen=True)
class Capabilities:
    """What a strategy's mathematics allows; the checks and wrappers read these, never class names.

    Every flag is stated by the strategy (no defaults): a wrong ``True`` lets a combination run
    whose result is wrong, so each one is a claim about the algorithm.
    """

    streams: bool
    """``aggregate`` folds updates in as a stream: server memory O(1) in the cohort size."""
    secagg_safe: bool
    """``aggregate`` needs only the example-weighted sum of the deltas (one update, the weighted mean,
    gives the same result), so SecAgg+ (``runtime.secagg``) may hide the individual updates."""
    dp_safe: bool
    """``aggregate`` may be given DP-FedAvg's single clipped, noised mean instead of the updates
    (:class:`~fedtune.strategies.private.DifferentiallyPrivate`) and stay correct."""
    client_state: bool
    """Clients keep state across rounds (``ClientState``): resumable in the simulation, which
    checkpoints it, but not on Flower, where every new run starts with empty node state."""


UNKNOWN_CAPABILITIES = Capabilities(streams=False, secagg_safe=False, dp_safe=False, client_state=True)
"""What is assumed of a strategy object that declares no capabilities: nothing is safe."""


def capabilities_of(strategy: object) -> Capabilities:
    """The strategy's declared ``capabilities`` (:data:`UNKNOWN_CAPABILITIES` when it declares none)."""
    caps = getattr(strategy, "capabilities", None)
    return caps if isinstance(caps, Capabilities) else UNKNOWN_CAPABILITIES


@dataclass(frozen=True)
class BuildContext:
    """What a build function gets besides its options: the run's facts, not ``[strategy]`` keys."""

    local: LocalTrainConfig
    """The clients' local training settings (``[train]``)."""
    num_clients: int
    """Clients in the federation (1 for the centralized and local baselines)."""
    seed: int = 0
    """The experiment's seed."""
    clients_per_round: int = 0
    """Clients sampled each round (0 when unknown): rules that need a cohort size check it when built."""


@dataclass(frozen=True)
class NoOptions:
    """The options of a strategy that takes none (FedAvg, Median)."""


@dataclass(frozen=True)
class StrategySpec:
    """One registered strategy: its name, options dataclass, capabilities and build function."""

    name: str
    options: type
    """A dataclass whose fields (each with a default and ``metadata={"help": ...}``) are ``[strategy]`` keys."""
    capabilities: Capabilities
    build: Callable[[Any, BuildContext], Strategy]
    """``build(options, ctx)``: the strategy object."""

    def option_names(self) -> list[str]:
        """The ``[strategy]`` keys this strategy reads, in declaration order."""
        return [f.name for f in dataclasses.fields(self.options)]

    def create(self, options: Any, ctx: BuildContext) -> Strategy:
        """``build(options, ctx)``, its capabilities checked against the registered ones.

        A strategy class may declare ``capabilities`` itself (then they must agree with the
        registration); an object that declares none gets the registered ones, so wrappers (DP)
        read the same flags as the config checks.
        """
        if not isinstance(options, self.options):
            raise TypeError(f"strategy {self.name!r} takes {self.options.__name__}, got {type(options).__name__}")
        strategy = self.build(options, ctx)
        own = getattr(strategy, "capabilities", None)
        if own is None:
            object.__setattr__(strategy, "capabilities", self.capabilities)
        elif own != self.capabilities:
            raise TypeError(f"strategy {self.name!r} is registered with {self.capabilities} but builds "
                            f"{type(strategy).__name__} declaring {own}")
        return strategy


_REGISTRY: dict[str, StrategySpec] = {}
_RESERVED = frozenset({"name", "options", "to_table", "from_table"})
"""Names an option cannot have: ``[strategy]``'s ``name`` and StrategyConfig's own attributes."""


def register_strategy(name: str, options_cls: type, capabilities: Capabilities):
    """Decorator of a build function ``(options, ctx: BuildContext) -> Strategy``: make ``name`` a strategy.

    ``options_cls`` is a dataclass; its fields become ``[strategy]`` keys (``strategy.<field>``),
    each needing a default and a help text. A key several strategies declare (``server_lr``)
    must have the same type and default in each: it is one key of the one ``[strategy]`` table.
    """
    if not name or not name.replace("_", "").isalnum():
        raise TypeError(f"strategy name {name!r} must be a non-empty word (letters, digits, _)")
    if not isinstance(capabilities, Capabilities):
        raise TypeError(f"strategy {name!r}: capabilities must be a Capabilities, got {capabilities!r}")
    _check_options_class(name, options_cls)

    def decorator(build: Callable[[Any, BuildContext], Strategy]) -> Callable[[Any, BuildContext], Strategy]:
        other = _REGISTRY.get(name)
        if other is not None and other.build.__qualname__ != build.__qualname__:
            raise TypeError(f"strategy {name!r} is registered twice ({other.build.__qualname__}, {build.__qualname__})")
        spec = StrategySpec(name, options_cls, capabilities, build)
        _check_shared_keys(spec)
        _REGISTRY[name] = spec
        return build

    return decorator


def _check_options_class(name: str, options_cls: type) -> None:
    if not dataclasses.is_dataclass(options_cls) or not isinstance(options_cls, type):
        raise TypeError(f"strategy {name!r}: options must be a dataclass class, got {options_cls!r}")
    for f in dataclasses.fields(options_cls):
        if f.name in _RESERVED or f.name.startswith("_"):
            raise TypeError(f"strategy {name!r}: option name {f.name!r} is reserved")
        if not f.metadata.get("help"):
            raise TypeError(f"strategy {name!r}: option {f.name!r} needs metadata={{'help': ...}}")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"strategy {name!r}: option {f.name!r} needs a default")
    options_cls()  # the defaults must be valid: every run carries every strategy's options


def _check_shared_keys(spec: StrategySpec) -> None:
    mine = option_table_of(spec.options)
    for other in _REGISTRY.values():
        if other.name == spec.name:
            continue
        for key, theirs in option_table_of(other.options).items():
            if key in mine and (mine[key].type, mine[key].default) != (theirs.type, theirs.default):
                raise TypeError(f"strategy {spec.name!r} declares option {key!r} as {mine[key].type} = "
                                f"{mine[key].default!r}, but {other.name!r} as {theirs.type} = {theirs.default!r}: "
                                "a [strategy] key means one thing")


@dataclass(frozen=True)
class OptionField:
    """One ``[strategy]`` key: its type, default and help (from the declaring options dataclass)."""

    type: Any
    default: Any
    help: str


def option_table_of(options_cls: type) -> dict[str, OptionField]:
    """The keys of one options dataclass, in declaration order."""
    hints = typing.get_type_hints(options_cls)
    table = {}
    for f in dataclasses.fields(options_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"{options_cls.__name__}.{f.name}: an option needs a default (or a default_factory)")
        table[f.name] = OptionField(hints[f.name], default, f.metadata["help"])
    return table


def registered_strategies() -> Mapping[str, StrategySpec]:
    """Every registered strategy by name, in registration order.

    Complete whenever this module is importable: importing it imports its package first, whose
    ``__init__`` imports every strategy module (each registers itself).
    """
    return dict(_REGISTRY)


def strategy_names() -> list[str]:
    """The registered strategy names, sorted."""
    return sorted(registered_strategies())


def strategy_spec(name: str) -> StrategySpec:
    """The registered strategy ``name``; a ConfigError naming the key and listing the known names."""
    specs = registered_strategies()
    if name not in specs:
        raise ConfigError(f"strategy.name: {name!r} is not one of the registered strategies {sorted(specs)}")
    return specs[name]


def option_table() -> dict[str, OptionField]:
    """Every ``[strategy]`` key any registered strategy declares (the one flat table), in registration order."""
    table: dict[str, OptionField] = {}
    for spec in registered_strategies().values():
        for key, f in option_table_of(spec.options).items():
            table.setdefault(key, f)
    return table


def option_error(key: str, rule: str, value: Any) -> ConfigError:
    """The error of an options dataclass's ``__post_init__``: ``strategy.<key> must be <rule>, got <value>``."""
    return ConfigError(f"strategy.{key} must be {rule}, got {value!r}")
