"""LoRA-aware aggregation as a Strategy: each adapted module's (A, B) pair aggregated together.

One file, both halves. The server maths is :mod:`fedtune.lora_aggregation`; the client half is
:class:`LoraClient`, typed data in every RoundPlan (``RoundPlan.adapter``) executed by the one
client runtime in every transport:

- **per-client ranks**: the resident model has the server's rank ``R``; a client of rank
  ``r < R`` receives and sends its factors cut to ``r`` components (:meth:`LoraClient.shrink`),
  trains with components ``r..R-1`` zeroed and their gradients masked: exactly a rank-``r`` adapter;
- **ffa**: A's gradient is dropped, so no optimizer step or weight decay touches it: A stays at
  its shared initialization (the same seed on every node), and the client never uploads it;
- **fedsa**: B is personal (kept in the client's state under ``PERSONAL_STATE_KEY``); the client
  uploads its own B (as a change from the global B) so the server can report a global model;
- **base corrections** (fedex, flora): the plan's ``base_offset`` (the global state's
  :data:`~fedtune.types.BASE_OFFSET`), applied to the frozen base by the client runtime.

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
from typing import TYPE_CHECKING

from fedtune.client.kinds import (
    ClientHooks,
    ClientKind,
    LocalContext,
    LocalResult,
    StackedContext,
    StackedHooks,
    register_kind,
)
from fedtune.lazy_import import lazy_module
from fedtune.strategies.fedprox import ProxTerm
from fedtune.types import BASE_OFFSET, ClientUpdate, LocalTrainConfig, Metrics, RoundPlan, ServerState, TensorDict

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedtune.lora_aggregation import LoraModule
else:
    torch = lazy_module("torch")
lora_aggregation = lazy_module("fedtune.lora_aggregation")
resident = lazy_module("fedtune.resident")

BASE_CHANGING_RULES = frozenset({"fedex", "flora"})
"""Rules that fold part of the update into the frozen base weights."""


@register_kind
@dataclass(frozen=True)
class LoraClient(ClientKind):
    """The client half of a LoRA-aware rule: each client's rank, FFA's frozen A, FedSA's personal B.

    ``rank`` is the server's (the resident model's) rank; ``client_ranks`` maps client ids to their
    own rank (absent clients train at ``rank``).
    """

    wire = "lora"
    rule: str
    rank: int
    client_ranks: Mapping[str, int] = field(default_factory=dict)

    @property
    def freeze_a(self) -> bool:
        """FFA-LoRA: A stays at its shared initialization; only B trains and travels up."""
        return self.rule == "ffa"

    @property
    def personal_b(self) -> bool:
        """FedSA-LoRA: each client keeps its own B."""
        return self.rule == "fedsa"

    def rank_of(self, client_id: str) -> int:
        """The LoRA rank ``client_id`` trains at."""
        return self.client_ranks.get(client_id, self.rank)

    def stacked_refusal(self, client_ids: Sequence[str]) -> str:
        """Clients differing in rank, or FFA / FedSA, train one at a time (their gradients are masked per client)."""
        if self.freeze_a or self.personal_b:
            return f"model.lora.aggregation = {self.rule!r} trains clients one at a time"
        if any(self.rank_of(c) != self.rank for c in client_ids):
            return "model.lora.client_ranks below model.lora.r train clients one at a time"
        return ""

    def start_stacked(self, ctx: StackedContext) -> StackedHooks | None:
        """No per-client behaviour when every client trains the full rank (fedit, svd, fedex, flora)."""
        return None if self.stacked_refusal(ctx.client_ids) else StackedHooks()

    def shrink(self, tensors: Mapping[str, torch.Tensor], client_id: str) -> TensorDict:
        """What travels for ``client_id``: its factors cut to its rank, and (FFA) no A.

        Applied by :class:`fedtune.channel.Channel` to plans and updates alike, so every runtime
        sends exactly a rank-``r`` adapter.
        """
        r = self.rank_of(client_id)
        out = dict(tensors)
        for m in lora_aggregation.lora_modules(tensors):
            if self.freeze_a:
                del out[m.a]
            else:
                out[m.a] = tensors[m.a][:r]
            out[m.b] = tensors[m.b][:, :r]
        return out

    def expand(self, tensors: Mapping[str, torch.Tensor], client_id: str, like: Mapping[str, torch.Tensor],
               frozen_a: Mapping[str, torch.Tensor] | None = None) -> TensorDict:
        """Inverse of :meth:`shrink` at the full shapes of ``like``: zeros beyond the client's rank.

        A missing A (FFA) is taken from ``frozen_a`` (the client's own shared A), else zeros (the
        server reading an update: A did not change).
        """
        r = self.rank_of(client_id)
        out = dict(tensors)
        for m in lora_aggregation.lora_modules(like):
            full = like[m.a].shape[0]
            a = tensors.get(m.a)
            if a is None:
                a = frozen_a[m.a] if frozen_a is not None else torch.zeros_like(like[m.a])
            a, _ = lora_aggregation.pad_rank(a, a.new_zeros(1, a.shape[0]), full)
            _, b = lora_aggregation.pad_rank(tensors[m.b].new_zeros(tensors[m.b].shape[1], 1), tensors[m.b], full)
            if r < full:
                a, b = a.clone(), b.clone()
                a[r:], b[:, r:] = 0.0, 0.0
            out[m.a], out[m.b] = a.to(like[m.a].dtype), b.to(like[m.b].dtype)
        return out

    def prepare(self, params: TensorDict, client_id: str, model: nn.Module) -> TensorDict:
        """The received (cut) adapter at the model's rank; FFA's A from the model's own loaded A."""
        current = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        modules = lora_aggregation.lora_modules(current)
        frozen = {m.a: resident.loaded_value(model, m.a) for m in modules} if self.freeze_a else None
        return self.expand(params, client_id, current, frozen)

    def personal_names(self, names: Sequence[str]) -> frozenset[str]:
        """FedSA: every B is personal."""
        return frozenset(m.b for m in lora_aggregation.lora_modules(names)) if self.personal_b else frozenset()

    def start(self, ctx: LocalContext) -> ClientHooks:
        """Gradient masks (rank, FFA) and FedSA's upload of the client's own B."""
        return _LoraHooks(self, ctx)


class _LoraHooks(ClientHooks):
    def __init__(self, kind: LoraClient, ctx: LocalContext) -> None:
        self.kind = kind
        self.modules = lora_aggregation.lora_modules(ctx.reference)
        self.r = kind.rank_of(ctx.client_id)

    def on_backward(self, params: Mapping[str, nn.Parameter]) -> None:
        r, full = self.r, self.kind.rank
        for m in self.modules:
            a, b = params[m.a], params[m.b]
            if self.kind.freeze_a:
                a.grad = None
            elif r < full and a.grad is not None:
                a.grad[r:].zero_()
            if r < full and b.grad is not None:
                b.grad[:, r:].zero_()

    def finish(self, result: LocalResult) -> None:
        if self.kind.personal_b:  # upload the own B (as a change from the global B) for the global model
            for m in self.modules:
                result.delta[m.b] = result.local[m.b] - result.start[m.b]


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
        if self.rule not in lora_aggregation.RULES:
            raise ValueError(f"unknown LoRA aggregation rule {self.rule!r} "
                             f"(known: {', '.join(lora_aggregation.RULES)})")
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

    def objective(self) -> ProxTerm | None:
        """FedProx's term when ``mu`` > 0, else none."""
        return ProxTerm(self.mu) if self.mu > 0 else None

    def client_half(self) -> LoraClient:
        """The rule's client half, sent in every plan."""
        return LoraClient(rule=self.rule, rank=self.rank, client_ranks=dict(self.client_ranks))

    def modules(self, params: Mapping[str, torch.Tensor]) -> list[LoraModule]:
        """The adapted modules among the global tensors (an error when there are none)."""
        modules = lora_aggregation.lora_modules(params)
        if not modules:
            raise ValueError(f"lora aggregation {self.rule!r}: the trainable tensors hold no LoRA factors")
        for m in modules:
            if params[m.a].shape[0] != self.rank:
                raise ValueError(f"{m.a}: rank {params[m.a].shape[0]} != the server's rank {self.rank}")
        return modules

    def init(self, params: TensorDict) -> ServerState:
        """Round 0: the initial tensors (and an empty base correction for fedex / flora)."""
        self.modules(params)
        buffers: dict[str, TensorDict] = {BASE_OFFSET: {}} if self.changes_base else {}
        return ServerState(round=0, params={k: v.detach().clone() for k, v in params.items()}, buffers=buffers)

    def configure(self, rnd: int, state: ServerState, clients: Sequence[str]) -> RoundPlan:
        """The global tensors, the local config, FedProx's term and the base corrections."""
        return RoundPlan(round=rnd, params=state.params, local=self.local, objective=self.objective(),
                         adapter=self.client_half(), base_offset=dict(state.buffers.get(BASE_OFFSET, {})))

    def aggregate(self, rnd: int, state: ServerState, updates: Iterable[ClientUpdate]) -> tuple[ServerState, Metrics]:
        """Rebuild each client's adapter at its rank, fold it in (streamed), apply the rule."""
        modules = self.modules(state.params)
        shared_a = {m.name: state.params[m.a] for m in modules} if self.rule == "ffa" else None
        acc = lora_aggregation.LoraAccumulator(self.rule, scaling=self.scaling, rank=self.rank, shared_a=shared_a,
                              merge=self.rule == "flora")
        for u in updates:
            r = self.client_rank(u.client_id)
            start = lora_aggregation.truncate_rank(state.params, r, modules)
            delta = lora_aggregation.truncate_rank(u.delta, r, modules)
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
