"""The ONE table of "X cannot be combined with Y": every refusal of a configuration, each with its reason.

A check is here only when the combination cannot work (its mathematics, or data that is not where
it would have to be), or when it is not built yet on a runtime, which the message then says
plainly. :func:`check_experiment` runs the table before anything is loaded or written; each row
is one line of the feature x runtime matrix in the documentation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedtune.config import ConfigError, Experiment


@dataclass(frozen=True)
class Check:
    """One refused combination: when it applies, and the one-line error naming the settings and why."""

    name: str
    applies: Callable[[Experiment], bool]
    message: Callable[[Experiment], str]


def _kind(exp: Experiment) -> str:
    from fedtune.tasks.registry import task_kind

    return task_kind(exp)


def _flower(exp: Experiment) -> bool:
    return exp.runtime.mode != "simulation"


CHECKS: tuple[Check, ...] = (
    Check("personalization-needs-federation",
          lambda e: e.personalization.method != "none" and e.mode != "federated",
          lambda e: f"[personalization] personalizes the clients of a federation; mode = {e.mode!r} has none "
                    "(use mode = 'federated')"),
    Check("federated-eval-needs-federation",
          lambda e: e.eval.federated and e.mode != "federated",
          lambda e: f"eval.federated has each client of a federation score the global model; mode = {e.mode!r} "
                    "has none (use mode = 'federated')"),
    Check("label-flip-needs-classes",
          lambda e: e.attack.kind == "label_flip" and _kind(e) != "classification",
          lambda e: f"attack.kind = 'label_flip' flips class labels: single-label classification only, "
                    f"not data.task = {_kind(e)!r}"),
    Check("generated-labels-need-label-answers",
          lambda e: e.eval.generative and _kind(e) != "generative_classification",
          lambda e: "eval.generative parses generated answers to label names: data.task = "
                    f"'generative_classification' only, not {_kind(e)!r}"),
    Check("compile-one-client-at-a-time",
          lambda e: e.train.compile and e.simulation.parallel_clients > 1,
          lambda e: "train.compile = true needs simulation.parallel_clients = 1: the batched trainer routes rows "
                    "through per-client adapters and is not compiled"),
    Check("checkpointing-one-client-at-a-time",
          lambda e: e.train.gradient_checkpointing and e.simulation.parallel_clients > 1,
          lambda e: "train.gradient_checkpointing = true needs simulation.parallel_clients = 1: the batched trainer "
                    "swaps each client's adapter into a layer only during its forward, so a recomputation in the "
                    "backward pass would not see it"),
    Check("compile-in-process",
          lambda e: e.train.compile and _flower(e),
          lambda e: f"train.compile = true is for runtime.mode = 'simulation', not {e.runtime.mode!r}: a Flower "
                    "ClientApp runs in a fresh process per round and would compile every round"),
    Check("clients-per-round-within-partition",
          lambda e: e.federation.clients_per_round > e.partition.num_clients,
          lambda e: f"federation.clients_per_round = {e.federation.clients_per_round} is more than the "
                    f"partition's partition.num_clients = {e.partition.num_clients}"),
    Check("flower-needs-federation",
          lambda e: _flower(e) and e.mode != "federated",
          lambda e: f"mode = {e.mode!r} needs every client's data in one place; on runtime.mode = "
                    f"{e.runtime.mode!r} the data stays on the nodes (use runtime.mode = 'simulation')"),
    Check("secagg-weighted-mean",
          lambda e: e.runtime.secagg and bool(_secagg_problems(e)),
          lambda e: "runtime.secagg = true only hides the clients' updates inside an example-weighted mean of at "
                    f"least 2 clients (strategy.name = {_secagg_names()}, no [privacy], federation.codec_up = "
                    "'none'): SecAgg+ sums quantized vectors, so no rule that needs individual updates fits; "
                    "not with " + "; ".join(_secagg_problems(e))),
)
"""Every refused combination, in the order they are checked."""


def _secagg_names() -> str:
    from fedtune.strategies.base import registered_strategies

    return " or ".join(repr(n) for n, spec in registered_strategies().items() if spec.capabilities.secagg_safe)


def _secagg_problems(exp: Experiment) -> list[str]:
    from fedtune.server.loop import clients_per_round
    from fedtune.strategies.base import capabilities_of, strategy_spec
    from fedtune.strategies.from_config import build_strategy

    why = []
    if not strategy_spec(exp.strategy.name).capabilities.secagg_safe:
        why.append(f"strategy.name = {exp.strategy.name!r}")
    if exp.privacy.enabled:
        why.append("privacy.enabled = true (central DP clips each client's update on the server)")
    if exp.federation.codec_up.strip() not in ("", "none"):
        why.append(f"federation.codec_up = {exp.federation.codec_up!r} (SecAgg+ quantizes and masks the update "
                   "itself; the masked vector is uniformly random integers, which no codec, lossless gzip included, "
                   "makes smaller; federation.codec_down still applies)")
    f = exp.federation
    if clients_per_round(exp.partition.num_clients, f.clients_per_round, f.fraction) < 2:
        why.append(f"fewer than 2 clients per round (partition.num_clients = {exp.partition.num_clients}, "
                   f"federation.clients_per_round = {f.clients_per_round}, federation.fraction = {f.fraction:g})")
    if not why:
        built = build_strategy(exp)
        if not capabilities_of(built).secagg_safe:
            why.append(f"the strategy resolves to {type(built).__name__} (e.g. model.lora.aggregation)")
    return why


def check_experiment(exp: Experiment, checks: tuple[Check, ...] = CHECKS) -> None:
    """Raise ConfigError with the first applicable check's message (nothing is loaded or written before).

    The message starts with ``<file>:`` when ``exp`` was read from a TOML file, like every other config error.
    """
    for check in checks:
        if check.applies(exp):
            where = f"{exp.source_file}: " if exp.source_file else ""
            raise ConfigError(where + check.message(exp))
