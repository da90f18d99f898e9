"""LoRA-aware aggregation as a Strategy: each adapted module's (A, B) pair aggregated together.

The server maths is :mod:`fedtune.lora_aggregation`; the client side (per-client ranks, FFA's
frozen A, FedSA's personal B, the base corrections of FedEx-LoRA and FLoRA) runs in
:class:`fedtune.runtime.lora.LoraTransport`.

State: ``ServerState.params`` holds the global adapter at the server's rank ``rank`` (the
resident model's ``model.lora.r``) plus the averaged head. FedEx-LoRA and FLoRA also change the
frozen base: the cumulative dense correction of every adapted base weight lives in
``ServerState.buffers[BASE_OFFSET]`` (checkpointed with the rest) and reaches clients as
``RoundPlan.base_offset``.

A client of rank ``r_i < rank`` starts from the first ``r_i`` components of the global adapter
(for ``svd`` these are the top singular directions); its update is read back at rank ``r_i``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedtune.lora_aggregation import RULES, LoraAccumulator, LoraModule, lora_modules, truncate_rank
from fedtune.types import ClientObjective, ClientUpdate, LocalTrainConfig, Metrics, ProxTerm, RoundPlan, ServerState, TensorDict

BASE_OFFSET = "lora_base_offset"
"""ServerState.buffers entry: cumulative dense corrections of the frozen base weights (fedex, flora)."""

BASE_CHANGING_RULES = frozenset({"fedex", "flora"})
"""Rules that fold part of the update into the frozen base weights."""


@dataclass
class LoraAggregation:
    """A LoRA-aware rule (``fedit``, ``svd``, ``ffa``, ``fedsa``, ``fedex``, ``flora``) as a Strategy.

    ``scaling`` is the global adapter's ``lora_alpha / r``; ``rank`` its rank; ``client_ranks``
    maps client ids to their own rank (<= ``rank``; absent clients train at ``rank``); ``mu`` > 0
    adds FedProx's proximal term to local training; ``seed`` seeds FLoRA's fresh adapters.
    """

    rule: str
    local: LocalTrainConfig
    scaling: float
    rank: int
    client_ranks: Mapping[str, int] = field(default_factory=dict)
    mu: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown LoRA aggregation rule {self.rule!r} (known: {', '.join(RULES)})")
        bad = {c: r for c, r in self.client_ranks.items() if not 1 <= r <= self.rank}
        if bad:
            cid, r = next(iter(bad.items()))
            raise ValueError(f"client {cid}: LoRA rank {r} is not in 1..{self.rank} (the server's rank)")

    @property
    def changes_base(self) -> bool:
        """Whether this rule folds updates into the frozen base weights (fedex, flora)."""
        return self.rule in BASE_CHANGING_RULES

    def client_rank(self, client_id: str) -> int:
        """The LoRA rank ``client_id`` trains at."""
        return self.client_ranks.get(client_id, self.rank)

    def objective(self) -> ClientObjective | None:
        """FedProx's term when ``mu`` > 0, else none."""
        return ProxTerm(self.mu) if self.mu > 0 else None

    def modules(self, params: Mapping[str, torch.Tensor]) -> list[LoraModule]:
        """The adapted modules among the global tensors (an error when there are none)."""
        modules = lora_modules(params)
        if not modules:
            raise ValueError(f"lora aggregation {self.rule!r}: the trainable tensors hold no LoRA factors")
        for m in modules:
            if params[m.a].shape[0] != self.rank:
                raise ValueError(f"{m.a}: rank {params[m.a].shape[0]} != the server's rank {self.rank}")
        return modules

    def init(self, params: TensorDict) -> ServerState:
        """Round 0: the initial tensors (and an empty base correction for fedex / flora)."""
        self.modules(params)
        buffers = {BASE_OFFSET: {}} if self.changes_base else {}
        return ServerState(round=0, params={k: v.detach().clone() for k, v in params.items()}, buffers=buffers)

    def configure(self, rnd: int, state: ServerState, clients: Sequence[str]) -> RoundPlan:
        """The global tensors, the local config, FedProx's term and the base corrections."""
        return RoundPlan(round=rnd, params=state.params, local=self.local, objective=self.objective(),
                         base_offset=dict(state.buffers.get(BASE_OFFSET, {})))

    def aggregate(self, rnd: int, state: ServerState, updates: Iterable[ClientUpdate]) -> tuple[ServerState, Metrics]:
        """Rebuild each client's adapter at its rank, fold it in (streamed), apply the rule."""
        modules = self.modules(state.params)
        shared_a = {m.name: state.params[m.a] for m in modules} if self.rule == "ffa" else None
        acc = LoraAccumulator(self.rule, scaling=self.scaling, rank=self.rank, shared_a=shared_a,
                              merge=self.rule == "flora")
        for u in updates:
            r = self.client_rank(u.client_id)
            start = truncate_rank(state.params, r, modules)
            delta = truncate_rank(u.delta, r, modules)
            acc.add({k: start[k] + delta[k].to(start[k].dtype) for k in start}, float(u.num_examples))
        if acc.count == 0:
            raise ValueError(f"round {rnd}: no client updates to aggregate")
        result = acc.result()
        metrics: Metrics = {"clients_aggregated": float(acc.count), "lora_gap": result.gap(self.scaling, modules)}
        if result.energy:
            metrics["lora_energy_kept"] = result.energy_kept()
            metrics["lora_energy_kept_min"] = result.energy_kept_min()
        params = result.params
        buffers = dict(state.buffers)
        if self.rule == "flora":  # everything is in the base now: start fresh adapters (peft's init)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + rnd)
            for m in modules:
                a = torch.empty_like(state.params[m.a])
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
                params[m.a], params[m.b] = a, torch.zeros_like(state.params[m.b])
        if self.changes_base:
            offset = dict(state.buffers.get(BASE_OFFSET, {}))
            for m in modules:
                d = result.base_delta[m.name]
                offset[m.base] = offset[m.base] + d if m.base in offset else d
            buffers[BASE_OFFSET] = offset
            metrics["lora_base_offset_norm"] = math.sqrt(sum(float(v.double().pow(2).sum()) for v in offset.values()))
        params = {k: params[k].to(state.params[k].dtype) for k in state.params}
        return ServerState(round=rnd, params=params, buffers=buffers), metrics


def client_rank_map(client_ids: Sequence[str], ranks: Sequence[int]) -> dict[str, int]:
    """``client_ids[k]`` -> ``ranks[k % len(ranks)]`` (empty when no ranks are given)."""
    return {cid: ranks[k % len(ranks)] for k, cid in enumerate(client_ids)} if ranks else {}


def find_lora(strategy: object) -> LoraAggregation | None:
    """The LoraAggregation inside ``strategy`` (through wrappers with an ``inner``), or None."""
    while strategy is not None:
        if isinstance(strategy, LoraAggregation):
            return strategy
        strategy = getattr(strategy, "inner", None)
    return None
