"""From ``[strategy]``, ``[privacy]``, ``[train]`` and ``model.lora`` to a Strategy object: the config edge.

The only place strategy names become objects: ``strategy.name`` is looked up in the registry
(:func:`~fedtune.strategies.base.strategy_spec`) and its build function gets the strategy's own
options (``exp.strategy.options()``) and a :class:`~fedtune.strategies.base.BuildContext`.
Refusals here are the combinations whose mathematics does not fit (each message says why);
where code merely lives elsewhere, it runs.
"""

from __future__ import annotations

import logging

from fedtune.config import ConfigError, Experiment
from fedtune.partition import client_ids
from fedtune.server.loop import clients_per_round
from fedtune.strategies.base import BuildContext, Strategy, strategy_spec
from fedtune.strategies.lora import LoraAggregation, client_rank_map
from fedtune.strategies.private import DifferentiallyPrivate
from fedtune.types import LocalTrainConfig

log = logging.getLogger(__name__)


def local_train_config(exp: Experiment) -> LocalTrainConfig:
    """The clients' local training settings from ``[train]``."""
    t = exp.train
    return LocalTrainConfig(
        epochs=t.epochs,
        max_steps=t.max_steps,
        lr=t.lr,
        batch_size=t.batch_size,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        precision=t.precision,
        optimizer=t.optimizer,
        pad_to=exp.data.max_length if exp.data.pad_to_max_length else 0,
        pad_multiple=t.pad_multiple,
        pad_limit=exp.data.max_length,
        length_bucketing=t.length_bucketing,
        compile=t.compile,
        gradient_checkpointing=t.gradient_checkpointing,
        lr_schedule=t.lr_schedule,
        lr_min=t.lr_min,
        rounds=exp.federation.rounds,
    )


def build_strategy(exp: Experiment, num_clients: int | None = None) -> Strategy:
    """Resolve ``[strategy]`` (and ``[privacy]``) to a Strategy object.

    ``num_clients`` is the federation's size (the partition's when None); the centralized and
    local baselines train one client at a time, so for them it is 1.
    """
    n = 1 if exp.mode != "federated" else (num_clients if num_clients is not None else exp.partition.num_clients)
    per_round = 1 if exp.mode != "federated" else clients_per_round(
        n, exp.federation.clients_per_round, exp.federation.fraction)
    strategy = _base_strategy(exp, n, per_round)
    p = exp.privacy
    if not p.enabled:
        return strategy
    try:
        return DifferentiallyPrivate(strategy, clip=p.clip, noise_multiplier=p.noise_multiplier, delta=p.delta,
                                     num_clients=n, clients_per_round=per_round, seed=exp.seed)
    except ValueError as exc:
        raise ConfigError(f"[privacy] with strategy.name = {exp.strategy.name!r}: {exc}") from None


def uses_lora_aggregation(exp: Experiment) -> bool:
    """True when ``model.lora.aggregation`` picks a LoRA-aware rule."""
    return exp.model.mode == "lora" and exp.model.lora.aggregation != "none"


def _base_strategy(exp: Experiment, num_clients: int, per_round: int) -> Strategy:
    local = local_train_config(exp)
    if uses_lora_aggregation(exp):  # model.lora.aggregation: a LoRA-aware rule replaces fedavg / fedprox's mean
        return build_lora_strategy(exp, local, num_clients)
    spec = strategy_spec(exp.strategy.name)
    return spec.create(exp.strategy.options(), BuildContext(local=local, num_clients=num_clients, seed=exp.seed,
                                                            clients_per_round=per_round))


def build_lora_strategy(exp: Experiment, local: LocalTrainConfig, num_clients: int) -> LoraAggregation:
    """The LoRA-aware strategy of ``exp``; a ConfigError naming the setting where the maths does not fit."""
    lcfg = exp.model.lora
    rule = lcfg.aggregation
    where = f"model.lora.aggregation = {rule!r}"
    if exp.strategy.name not in ("fedavg", "fedprox"):
        raise ConfigError(f"{where} replaces the averaging of strategy fedavg / fedprox; "
                          f"strategy.name = {exp.strategy.name!r} is another aggregation rule, not combinable with it")
    if exp.privacy.enabled:
        raise ConfigError(f"{where}: central DP ([privacy] enabled) releases one clipped, noised mean of flat "
                          "deltas; a LoRA-aware rule needs each client's factors, so the two do not compose")
    if exp.mode == "local":
        raise ConfigError(f"{where}: mode = 'local' trains every client alone; use mode = 'federated' or 'centralized'")
    ranks = client_rank_map(client_ids(num_clients), lcfg.client_ranks) if exp.mode == "federated" else {}
    if lcfg.dropout > 0 and rule == "ffa":
        log.info("ffa: LoRA dropout %.2f applies to the input of the frozen A", lcfg.dropout)
    mu = exp.strategy.mu if exp.strategy.name == "fedprox" else 0.0
    return LoraAggregation(rule=rule, local=local, scaling=lcfg.alpha / lcfg.r, rank=lcfg.r,
                           client_ranks=ranks, mu=mu, seed=exp.seed)
