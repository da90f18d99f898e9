"""From ``[strategy]``, ``[privacy]``, ``[train]`` and ``model.lora`` to a Strategy object: the config edge.

The only place strategy names become classes. Refusals here are the combinations whose
mathematics does not fit (each message says why); where code merely lives elsewhere, it runs.
"""

from __future__ import annotations

import logging

from fedtune.config import ConfigError, Experiment
from fedtune.partition import client_ids
from fedtune.server.loop import clients_per_round
from fedtune.strategies.base import Strategy
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedtune.strategies.fedprox import FedProx
from fedtune.strategies.lora import LoraAggregation, client_rank_map
from fedtune.strategies.private import DifferentiallyPrivate
from fedtune.strategies.robust import Krum, Median, MultiKrum, TrimmedMean
from fedtune.strategies.scaffold import Scaffold
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
        length_bucketing=t.length_bucketing,
        compile=t.compile,
    )


def build_strategy(exp: Experiment, num_clients: int | None = None) -> Strategy:
    """Resolve ``[strategy]`` (and ``[privacy]``) to a Strategy object.

    ``num_clients`` is the federation's size (the partition's when None); the centralized and
    local baselines train one client at a time, so for them it is 1.
    """
    n = 1 if exp.mode != "federated" else (num_clients if num_clients is not None else exp.partition.num_clients)
    strategy = _base_strategy(exp, n)
    p = exp.privacy
    if not p.enabled:
        return strategy
    per_round = 1 if exp.mode != "federated" else clients_per_round(
        n, exp.federation.clients_per_round, exp.federation.fraction)
    try:
        return DifferentiallyPrivate(strategy, clip=p.clip, noise_multiplier=p.noise_multiplier, delta=p.delta,
                                     num_clients=n, clients_per_round=per_round, seed=exp.seed)
    except ValueError as exc:
        raise ConfigError(f"[privacy] with strategy.name = {exp.strategy.name!r}: {exc}") from None


def uses_lora_aggregation(exp: Experiment) -> bool:
    """True when ``model.lora.aggregation`` picks a LoRA-aware rule."""
    return exp.model.mode == "lora" and exp.model.lora.aggregation != "none"


def _base_strategy(exp: Experiment, num_clients: int) -> Strategy:
    local = local_train_config(exp)
    if uses_lora_aggregation(exp):  # model.lora.aggregation: a LoRA-aware rule replaces fedavg / fedprox's mean
        return build_lora_strategy(exp, local, num_clients)
    s = exp.strategy
    name = s.name
    lr = {"server_lr": s.server_lr} if s.server_lr > 0 else {}
    adaptive = dict(beta1=s.beta1, beta2=s.beta2, tau=s.tau, **lr)
    if name == "fedavg":
        return FedAvg(local=local)
    if name == "fedprox":
        return FedProx(local=local, mu=s.mu)
    if name == "scaffold":
        return Scaffold(local=local, num_clients=num_clients, **lr)
    if name == "fedavgm":
        return FedAvgM(local=local, momentum=s.momentum, **lr)
    if name == "fedadam":
        return FedAdam(local=local, **adaptive)
    if name == "fedyogi":
        return FedYogi(local=local, **adaptive)
    if name == "fedadagrad":
        return FedAdagrad(local=local, **adaptive)
    if name == "median":
        return Median(local=local)
    if name == "trimmed_mean":
        return TrimmedMean(local=local, beta=s.trim_beta)
    if name == "krum":
        return Krum(local=local, f=s.krum_f)
    if name == "multikrum":
        return MultiKrum(local=local, f=s.krum_f, m=s.krum_m)
    raise ValueError(f"unknown strategy {name!r}")


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
