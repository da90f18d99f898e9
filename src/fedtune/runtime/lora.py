"""The client side of the LoRA-aware rules on the in-process simulation (one resident model).

:class:`LoraTransport` wraps a simulation transport and, for a :class:`~fedtune.strategies.lora.LoraAggregation`:

- **base corrections** (fedex, flora): sets every adapted base weight to its pristine value plus
  the plan's ``base_offset`` before the round (and :meth:`LoraTransport.sync_state` does the same
  for evaluation and saving);
- **per-client ranks**: the resident model has the server's rank ``R``; a client of rank
  ``r < R`` gets the plan with components ``r..R-1`` of every A and B zeroed and their gradients
  masked, so it trains exactly a rank-``r`` adapter;
- **ffa**: A's gradient is dropped (set to None after accumulation), so no optimizer step or
  weight decay touches it: A stays at its shared initialization;
- **fedsa**: B is declared personal (the FedPer mechanism of :func:`fedtune.client.local_train`:
  kept in the client's state under ``PERSONAL_STATE_KEY``); the client then uploads its own B
  (as a change from the global B) so the server can report a global model, but B is sent down
  only to a client that has none of its own yet.

Bytes are counted honestly for what a real client would move, as float32 safetensors of: the
head, A and B cut to the client's rank (no A for ffa: it is regenerated from the shared seed; no B
down for a fedsa client that keeps its own), and, down, the dense base corrections once non-empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from fedtune.lora_aggregation import lora_modules, other_names
from fedtune.payload import CommStats, payload_bytes
from fedtune.personalization import PERSONAL_STATE_KEY
from fedtune.strategies.lora import BASE_OFFSET, LoraAggregation
from fedtune.types import ClientUpdate, RoundPlan, ServerState, TensorDict


class LoraTransport:
    """Runs a LoRA-aware rule's client side around an in-process transport (see the module docstring)."""

    def __init__(self, inner, strategy: LoraAggregation, model: nn.Module) -> None:
        self.inner = inner
        self.strategy = strategy
        self.model = model
        self.named = dict(model.named_parameters())
        trainable = [n for n, p in self.named.items() if p.requires_grad]
        self.modules = lora_modules(trainable)
        if not self.modules:
            raise ValueError("LoRA aggregation needs a LoRA model (no lora_A / lora_B among the trainable tensors)")
        self.heads = other_names(trainable, self.modules)
        missing = [m.base for m in self.modules if m.base not in self.named]
        if strategy.changes_base and missing:
            raise ValueError(f"{strategy.rule}: no frozen base weight {missing[0]} to correct")
        self.pristine: TensorDict = (
            {m.base: self.named[m.base].detach().clone() for m in self.modules} if strategy.changes_base else {}
        )

    @property
    def client_states(self):
        """The inner transport's per-client states (checkpointed; FedSA's personal B lives here)."""
        return self.inner.client_states

    # ------------------------------------------------------------------ frozen base

    def sync_base(self, offset: TensorDict) -> None:
        """Set every adapted base weight to pristine + ``offset`` (pristine where the offset has no entry)."""
        if not self.pristine:
            return
        with torch.no_grad():
            for name, w0 in self.pristine.items():
                target = self.named[name]
                target.copy_(w0 + offset[name].to(w0) if name in offset else w0)

    def sync_state(self, state: ServerState) -> None:
        """Give the resident model ``state``'s base corrections (call after ``set_trainable`` for evaluation)."""
        self.sync_base(state.buffers.get(BASE_OFFSET, {}))

    # ------------------------------------------------------------------ rounds

    def run_round(self, plan: RoundPlan, clients: Sequence[str], stats: CommStats) -> Iterator[ClientUpdate]:
        """Train every client at its own rank under the rule's client-side contract; count honest bytes."""
        self.sync_base(plan.base_offset)
        s = self.strategy
        per_client = s.rule in ("ffa", "fedsa") or any(s.client_rank(c) != s.rank for c in clients)
        scratch = CommStats()  # the inner transport's counts (full-rank tensors) are replaced by ours
        if not per_client:  # one call: keeps the batched multi-client trainer usable
            for update in self.inner.run_round(plan, clients, scratch):
                stats.bytes_down += self.down_bytes(plan, update.client_id, has_own_b=False)
                stats.bytes_up += self.up_bytes(update)
                yield update
            return
        for cid in clients:
            state = self.inner.client_states.setdefault(cid, {})
            has_own_b = s.rule == "fedsa" and all(m.b in state.get(PERSONAL_STATE_KEY, {}) for m in self.modules)
            client_plan = self.client_plan(plan, cid)
            stats.bytes_down += self.down_bytes(plan, cid, has_own_b=has_own_b)
            with self._gradient_masks(s.client_rank(cid), freeze_a=s.rule == "ffa"):
                for update in self.inner.run_round(client_plan, [cid], scratch):
                    if s.rule == "fedsa":  # upload the own B (as a change from the global B) for the global model
                        own = state[PERSONAL_STATE_KEY]
                        delta = dict(update.delta)
                        for m in self.modules:
                            delta[m.b] = own[m.b] - client_plan.params[m.b]
                        update = dataclasses.replace(update, delta=delta)
                    stats.bytes_up += self.up_bytes(update)
                    yield update

    def client_plan(self, plan: RoundPlan, client_id: str) -> RoundPlan:
        """``plan`` as ``client_id`` trains it: adapter cut to its rank (zeros beyond), FedSA's B personal."""
        r = self.strategy.client_rank(client_id)
        params = dict(plan.params)
        if r < self.strategy.rank:
            for m in self.modules:
                a, b = params[m.a].clone(), params[m.b].clone()
                a[r:], b[:, r:] = 0.0, 0.0
                params[m.a], params[m.b] = a, b
        personal = plan.personal | {m.b for m in self.modules} if self.strategy.rule == "fedsa" else plan.personal
        return dataclasses.replace(plan, params=params, personal=frozenset(personal))

    @contextlib.contextmanager
    def _gradient_masks(self, rank: int, freeze_a: bool):
        """While training: drop A's gradient (ffa) and zero the gradient of components >= ``rank``."""
        handles = []

        def drop(p: torch.Tensor) -> None:
            p.grad = None

        def mask_rows(p: torch.Tensor) -> None:
            if p.grad is not None:
                p.grad[rank:].zero_()

        def mask_cols(p: torch.Tensor) -> None:
            if p.grad is not None:
                p.grad[:, rank:].zero_()

        try:
            for m in self.modules:
                if freeze_a:
                    handles.append(self.named[m.a].register_post_accumulate_grad_hook(drop))
                elif rank < self.strategy.rank:
                    handles.append(self.named[m.a].register_post_accumulate_grad_hook(mask_rows))
                if rank < self.strategy.rank:
                    handles.append(self.named[m.b].register_post_accumulate_grad_hook(mask_cols))
            yield
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ bytes

    def _payload(self, tensors: TensorDict, rank: int, *, send_a: bool, send_b: bool) -> TensorDict:
        out = {n: tensors[n] for n in self.heads}
        for m in self.modules:
            if send_a:
                out[m.a] = tensors[m.a][:rank]
            if send_b:
                out[m.b] = tensors[m.b][:, :rank]
        return out

    def down_bytes(self, plan: RoundPlan, client_id: str, *, has_own_b: bool) -> int:
        """Bytes ``client_id`` receives: head, A and B at its rank (as the rule needs them), base corrections."""
        s = self.strategy
        payload = self._payload(plan.params, s.client_rank(client_id), send_a=s.rule != "ffa", send_b=not has_own_b)
        payload.update(plan.base_offset)
        return payload_bytes(payload) if payload else 0

    def up_bytes(self, update: ClientUpdate) -> int:
        """Bytes the client sends: the change of its head, A (not for ffa) and B at its rank."""
        s = self.strategy
        payload = self._payload(update.delta, s.client_rank(update.client_id), send_a=s.rule != "ffa", send_b=True)
        return payload_bytes(payload) + sum(payload_bytes(t) for t in update.extras.values())
