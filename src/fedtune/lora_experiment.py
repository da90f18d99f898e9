"""Where ``model.lora.aggregation`` and ``model.init_adapter`` meet a run (the config edge).

:func:`build_lora_strategy` checks the combination of settings and builds the
:class:`~fedtune.strategies.lora.LoraAggregation`; :func:`lora_transport` wraps the simulation
transport with the rule's client side; :func:`save_base_offset` writes FedEx-LoRA's / FLoRA's
base corrections next to the saved adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import save_file

from fedtune.artifacts import BASE_OFFSET_FILE
from fedtune.config import ConfigError, Experiment
from fedtune.partition import client_ids
from fedtune.strategies.lora import BASE_OFFSET, LoraAggregation, client_rank_map, find_lora
from fedtune.types import LocalTrainConfig, ServerState

log = logging.getLogger(__name__)


def uses_lora_aggregation(exp: Experiment) -> bool:
    """True when ``model.lora.aggregation`` picks a LoRA-aware rule."""
    return exp.model.mode == "lora" and exp.model.lora.aggregation != "none"


def build_lora_strategy(exp: Experiment, local: LocalTrainConfig, num_clients: int) -> LoraAggregation:
    """The LoRA-aware strategy of ``exp``; a ConfigError naming the setting for unsupported combinations."""
    lcfg = exp.model.lora
    rule = lcfg.aggregation
    where = f"model.lora.aggregation = {rule!r}"
    if exp.strategy.name not in ("fedavg", "fedprox"):
        raise ConfigError(f"{where} replaces the averaging of strategy fedavg / fedprox; "
                          f"strategy.name = {exp.strategy.name!r} is not supported with it")
    if exp.privacy.enabled:
        raise ConfigError(f"{where}: central DP ([privacy] enabled) clips flat deltas; not supported with it")
    if exp.mode == "local":
        raise ConfigError(f"{where}: mode = 'local' trains every client alone; use mode = 'federated' or 'centralized'")
    if exp.runtime.mode != "simulation":
        raise ConfigError(f"{where} runs on the in-process simulation (runtime.mode = 'simulation'), "
                          f"not runtime.mode = {exp.runtime.mode!r}")
    for key in ("codec_up", "codec_down"):
        if getattr(exp.federation, key) != "none":
            raise ConfigError(f"{where}: federation.{key} = {getattr(exp.federation, key)!r} is not supported "
                              "(bytes are counted for float32 payloads cut to each client's rank)")
    ranks = client_rank_map(client_ids(num_clients), lcfg.client_ranks) if exp.mode == "federated" else {}
    per_client = rule in ("ffa", "fedsa") or any(r != lcfg.r for r in ranks.values())
    if per_client and exp.simulation.parallel_clients > 1:
        why = f"rule {rule!r}" if rule in ("ffa", "fedsa") else "model.lora.client_ranks below model.lora.r"
        raise ConfigError(f"simulation.parallel_clients = {exp.simulation.parallel_clients}: {why} needs clients "
                          "trained one at a time (set simulation.parallel_clients = 1)")
    if lcfg.dropout > 0 and rule == "ffa":
        log.info("ffa: LoRA dropout %.2f applies to the input of the frozen A", lcfg.dropout)
    mu = exp.strategy.mu if exp.strategy.name == "fedprox" else 0.0
    return LoraAggregation(rule=rule, local=local, scaling=lcfg.alpha / lcfg.r, rank=lcfg.r,
                           client_ranks=ranks, mu=mu, seed=exp.seed)


def lora_transport(strategy, transport, model):
    """``transport`` wrapped with the LoRA rule's client side when ``strategy`` holds one, else unchanged."""
    lora = find_lora(strategy)
    if lora is None:
        return transport
    from fedtune.runtime.lora import LoraTransport

    return LoraTransport(transport, lora, model)


def sync_model(transport, state: ServerState) -> None:
    """Give the resident model ``state``'s base corrections when ``transport`` is a LoraTransport."""
    sync = getattr(transport, "sync_state", None)
    if sync is not None:
        sync(state)


def save_base_offset(state: ServerState, directory: Path) -> Path | None:
    """Write the state's base corrections (fedex / flora) to ``directory``; None when there are none."""
    offset = state.buffers.get(BASE_OFFSET)
    if not offset:
        return None
    path = Path(directory) / BASE_OFFSET_FILE
    save_file({k: v.contiguous() for k, v in offset.items()}, str(path))
    return path
