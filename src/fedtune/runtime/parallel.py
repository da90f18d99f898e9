"""Batched multi-adapter training: up to K clients trained together on one frozen base model.

The base model is frozen in LoRA mode, so K clients' forward passes differ only in their LoRA
factors and their task head. :class:`ParallelSimulationTransport` concatenates the K clients'
batches, runs the frozen base once, and routes every row through its own client's adapter
(batched low-rank matmuls over per-client stacks of A and B) and its own copy of the head
(peft ``modules_to_save``: pooler, classifier). Each client keeps everything sequential
training gives it: its own seeded data order, step count (a client whose data is used up
leaves the concatenated batch), loss (the mean over its own rows), gradient clipping norm,
objective (FedProx ``ProxTerm``, SCAFFOLD ``ControlVariate``) and optimizer state (AdamW/SGD
over the stacks, stepping only the clients still active).

With dropout off and fp32 the updates equal sequential :func:`fedtune.client.local_train`
within float tolerance (rows are padded to the group's longest row instead of their own
client's, which changes only the order of float reductions). With dropout on, masks are drawn
for the whole concatenated batch from one generator seeded by (run, round, group), so an update
is a sample from the same distribution as the sequential one, not the same sample.

Causal LMs (instruction tuning, generative classification) batch the same way, each client's
loss being the next-token loss over its own non-ignored tokens. Other configurations (full or
partial fine-tuning, LoRA variants, fp16 loss scaling, multi-label and QA heads) fall back to one
client at a time, with a log line.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedtune import tensors
from fedtune.batching import IGNORE_INDEX, EncodedDataset, collate, epoch_batches
from fedtune.channel import Channel
from fedtune.client.kinds import LocalResult, StackedContext, plan_kinds
from fedtune.client.train import finish_update, planned_steps
from fedtune.precision import autocast
from fedtune.resident import sync_base
from fedtune.runtime.simulation import SimulationTransport, TrainJob, client_seed
from fedtune.shards import row_sources
from fedtune.sparse_logits import labelled_logits
from fedtune.types import ClientState, ClientUpdate, RoundPlan

log = logging.getLogger(__name__)

_ADAPTER = "default"
_PROBLEMS = ("single_label_classification", "regression")


# ---------------------------------------------------------------------------------------------
# What the model looks like: which modules carry the trainable tensors.


@dataclass
class _LoraSite:
    module: nn.Module
    a: str  # full trainable name of lora_A weight
    b: str  # full trainable name of lora_B weight
    scaling: float
    dropout: nn.Module


@dataclass
class _HeadSite:
    wrapper: nn.Module
    inner: nn.Module
    params: dict[str, str]  # inner parameter name -> full trainable name


@dataclass
class _Layout:
    lora: list[_LoraSite] = field(default_factory=list)
    heads: list[_HeadSite] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def _layout(model: nn.Module) -> tuple[_Layout | None, str]:
    """Map every trainable tensor to a LoRA site or a head copy; (None, reason) when that is impossible."""
    try:
        from peft import PeftModelForCausalLM, PeftModelForSequenceClassification
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - peft is a dependency
        return None, "peft is not installed"
    if not isinstance(model, (PeftModelForSequenceClassification, PeftModelForCausalLM)):
        return None, "the model is not a peft LoRA sequence-classification or causal-LM model (model.mode is not lora?)"
    problem = getattr(model.config, "problem_type", None)
    if problem not in _PROBLEMS and not isinstance(model, PeftModelForCausalLM):
        return None, f"problem_type {problem!r} (supported: {', '.join(_PROBLEMS)})"
    layout = _Layout(names=[n for n, p in model.named_parameters() if p.requires_grad])
    covered: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and _ADAPTER in getattr(mod, "lora_A", {}):
            if not isinstance(mod.lora_A[_ADAPTER], nn.Linear) or not hasattr(mod, "base_layer"):
                return None, f"{name}: only LoRA on Linear layers is batched"
            if _ADAPTER in getattr(mod, "lora_variant", {}) or mod.lora_B[_ADAPTER].bias is not None:
                return None, f"{name}: LoRA variants (DoRA, lora_bias, ...) are not batched"
            if mod.merged or mod.disable_adapters:
                return None, f"{name}: adapter merged or disabled"
            # (a peft LoraLayer is a mixin of the nn.Module named_modules yielded: the module itself)
            site = _LoraSite(cast(nn.Module, mod), f"{name}.lora_A.{_ADAPTER}.weight", f"{name}.lora_B.{_ADAPTER}.weight",
                             float(mod.scaling[_ADAPTER]), mod.lora_dropout[_ADAPTER])
            layout.lora.append(site)
            covered.update((site.a, site.b))
        elif isinstance(mod, ModulesToSaveWrapper) and _ADAPTER in mod.modules_to_save:
            inner = mod.modules_to_save[_ADAPTER]
            prefix = f"{name}.modules_to_save.{_ADAPTER}."
            params = {n: prefix + n for n, p in inner.named_parameters() if p.requires_grad}
            layout.heads.append(_HeadSite(mod, inner, params))
            covered.update(params.values())
    extra = [n for n in layout.names if n not in covered]
    if extra:
        return None, f"trainable tensors outside LoRA layers and the head: {extra[:3]}"
    if not layout.lora:
        return None, "no LoRA layers found"
    return layout, ""


def parallel_support(model: nn.Module, plan: RoundPlan, device: torch.device,
                     client_ids: Sequence[str] = ()) -> str:
    """Empty when the batched trainer can train ``plan`` on ``model`` for ``client_ids``; otherwise why not."""
    _, reason = _layout(model)
    if reason:
        return reason
    if plan.local.precision == "fp16":
        return "precision fp16 needs per-client loss scaling, which the batched trainer does not do yet"
    for kind in plan_kinds(plan):
        why = kind.stacked_refusal(client_ids)
        if why:
            return why
    if plan.local.optimizer not in ("adamw", "sgd"):
        return f"local optimizer {plan.local.optimizer!r}"
    if plan.personal:
        return "personal tensors (FedPer) are not supported by the batched trainer yet"
    return ""


# ---------------------------------------------------------------------------------------------
# Routing rows to their client's adapter and head.


class _Router:
    """Which client slot each row of the concatenated batch belongs to."""

    def __init__(self) -> None:
        self.segments: list[tuple[int, int, int]] = []  # (slot, start, stop), contiguous, in slot order
        self.index: torch.Tensor | None = None  # slot of each group passed to index_select
        self.groups = 0  # number of row groups the batch is viewed as (one per client, or one per row)

    def set(self, segments: list[tuple[int, int, int]], device: torch.device) -> None:
        self.segments = segments
        sizes = {b - a for _, a, b in segments}
        if len(sizes) == 1:  # every client contributes the same number of rows: one bmm per client
            slots = [i for i, _, _ in segments]
        else:  # ragged: one bmm per row
            slots = [i for i, a, b in segments for _ in range(b - a)]
        self.groups = len(slots)
        self.index = torch.as_tensor(slots, dtype=torch.long, device=device)


def _lora_forward(site: _LoraSite, stacks: Mapping[str, torch.Tensor], router: _Router):
    base = cast(nn.Module, site.module.base_layer)  # peft's LoRA layer holds the wrapped Linear as a submodule

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = base(x, *args, **kwargs)
        out_dtype = result.dtype
        index = router.index
        if index is None:
            raise RuntimeError("batched LoRA forward before the batch's client slots were set (_Router.set)")
        a = stacks[site.a].index_select(0, index)  # (G, r, in)
        b = stacks[site.b].index_select(0, index)  # (G, out, r)
        h = site.dropout(x.to(a.dtype))
        shape = h.shape
        h = h.reshape(router.groups, -1, shape[-1])  # (G, rows*T, in): rows of a group are contiguous
        low = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))  # (G, rows*T, out)
        result = result + low.reshape(*shape[:-1], low.shape[-1]) * site.scaling
        return result.to(out_dtype)

    return forward


def _head_forward(site: _HeadSite, stacks: Mapping[str, torch.Tensor], router: _Router):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        views = {n: stacks[full].unbind(0) for n, full in site.params.items()}
        outs = [
            functional_call(site.inner, {n: v[slot] for n, v in views.items()}, (x[start:stop], *args), kwargs)
            for slot, start, stop in router.segments
        ]
        return torch.cat(outs, 0)

    return forward


@contextlib.contextmanager
def _routed(layout: _Layout, stacks: Mapping[str, torch.Tensor], router: _Router):
    """Temporarily route the model's LoRA layers and head wrappers through the per-client stacks."""
    patched = []
    try:
        for s in layout.lora:
            s.module.forward = _lora_forward(s, stacks, router)
            patched.append(s.module)
        for h in layout.heads:
            h.wrapper.forward = _head_forward(h, stacks, router)
            patched.append(h.wrapper)
        yield
    finally:
        for m in patched:
            del m.forward  # back to the class's forward


# ---------------------------------------------------------------------------------------------
# Per-client optimizers over stacked tensors.


class _StackedOptimizer:
    """AdamW or SGD (as torch implements them, single-tensor path) over tensors stacked by client.

    Only the slots passed to :meth:`step` move: a finished client keeps its parameters and
    moments. Every active slot has taken the same number of steps (all start together), so
    the bias corrections are one scalar per step; ``steps`` still counts per slot.
    """

    def __init__(self, kind: str, params: Mapping[str, torch.Tensor], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.kind, self.params, self.lr, self.wd, self.betas, self.eps = kind, params, lr, weight_decay, betas, eps
        k = next(iter(params.values())).shape[0]
        self.steps = [0] * k
        if kind == "adamw":
            self.m = {n: torch.zeros_like(p) for n, p in params.items()}
            self.v = {n: torch.zeros_like(p) for n, p in params.items()}

    def step(self, slots: Sequence[int]) -> None:
        counts = {self.steps[s] for s in slots}
        if len(counts) != 1:
            raise RuntimeError(f"active clients out of step: {counts}")
        for s in slots:
            self.steps[s] += 1
        step = self.steps[slots[0]]
        k = len(self.steps)
        idx = None if len(slots) == k else torch.as_tensor(list(slots), device=next(iter(self.params.values())).device)
        with torch.no_grad():
            for name, p in self.params.items():
                if p.grad is None:
                    continue
                take = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))
                param, grad = take(p.data), take(p.grad)
                if self.kind == "sgd":
                    if self.wd != 0:
                        grad = grad.add(param, alpha=self.wd)
                    param.add_(grad, alpha=-self.lr)
                else:
                    beta1, beta2 = self.betas
                    m, v = take(self.m[name]), take(self.v[name])
                    if self.wd != 0:
                        param.mul_(1 - self.lr * self.wd)
                    m.lerp_(grad, 1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    step_size = self.lr / (1 - beta1**step)
                    bc2_sqrt = (1 - beta2**step) ** 0.5
                    denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
                    param.addcdiv_(m, denom, value=-step_size)
                    if idx is not None:
                        self.m[name].index_copy_(0, idx, m)
                        self.v[name].index_copy_(0, idx, v)
                if idx is not None:
                    p.data.index_copy_(0, idx, param)


# ---------------------------------------------------------------------------------------------
# One group of clients trained together.


def _client_batches(
    data: EncodedDataset, plan: RoundPlan, generator: torch.Generator, total: int
) -> Iterator[list[int]]:
    """The index lists local_train would draw, step by step (same generator use, same epochs)."""
    cfg = plan.local
    step = 0
    while step < total:
        for idx in epoch_batches(data, cfg.batch_size, generator, cfg.length_bucketing):
            yield idx
            step += 1
            if step >= total:
                return


def _per_client_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """(K,) L2 norm of each slot's gradient over all tensors (as clip_grad_norm_ computes it)."""
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2, dim=1) for g in grads])  # (P, K)
    return torch.linalg.vector_norm(norms, 2, dim=0)


def _bcast(vec: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return vec.view(-1, *([1] * (like.dim() - 1)))


def train_group(
    model: nn.Module,
    datas: Sequence[EncodedDataset],
    plan: RoundPlan,
    client_ids: Sequence[str],
    *,
    pad_id: int,
    seeds: Sequence[int],
    group_seed: int,
    device: torch.device,
    states: Sequence[ClientState],
) -> list[ClientUpdate]:
    """Train ``client_ids`` together from ``plan``; return their updates in order.

    ``seeds[i]`` fixes client i's data order exactly as ``local_train``'s seed does;
    ``group_seed`` seeds the dropout masks of the concatenated batches.
    """
    layout, reason = _layout(model)
    if layout is None:
        raise ValueError(f"batched training not possible: {reason}")
    for cid, d in zip(client_ids, datas, strict=True):
        if len(d) == 0:
            raise ValueError(f"client {cid} has no training examples")
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(group_seed)
        return _train_group(model, layout, datas, plan, client_ids, pad_id=pad_id, seeds=seeds,
                            device=device, states=states)


def _train_group(model, layout: _Layout, datas, plan: RoundPlan, client_ids, *, pad_id, seeds, device, states):
    cfg = plan.local.at_round(plan.round)  # (the round's learning rate under a schedule)
    k = len(client_ids)
    sync_base(model, plan.base_offset)
    reference = {n: plan.params[n].to(device, torch.float32) for n in layout.names}
    stacks = {n: reference[n].unsqueeze(0).repeat(k, *([1] * reference[n].dim())).requires_grad_(True)
              for n in layout.names}
    optimizer = _StackedOptimizer(cfg.optimizer, stacks, cfg.lr, cfg.weight_decay)
    ctx = StackedContext(client_ids=list(client_ids), reference=reference, states=states, local=cfg, device=device)
    hooks = []
    for kind in plan_kinds(plan):
        h = kind.start_stacked(ctx)
        if h is None:
            raise ValueError(f"batched training not possible: {kind.stacked_refusal(client_ids)}")
        hooks.append(h)
    totals = [planned_steps(len(d), cfg.batch_size, cfg.epochs, cfg.max_steps) for d in datas]
    batches = [_client_batches(d, plan, torch.Generator().manual_seed(s), t) for d, s, t in zip(datas, seeds, totals, strict=True)]
    problem = model.config.problem_type
    causal = datas[0].token_labels is not None
    router = _Router()
    loss_sum = [0.0] * k
    steps = [0] * k
    model.train()
    with _routed(layout, stacks, router):
        while True:
            active = [i for i in range(k) if steps[i] < totals[i]]
            if not active:
                break
            parts = [(i, next(batches[i])) for i in active]
            batch, segments, start = _collate_group(datas, parts, pad_id, cfg.pad_to, cfg.pad_multiple, cfg.pad_limit), [], 0
            for i, idx in parts:
                segments.append((i, start, start + len(idx)))
                start += len(idx)
            router.set(segments, device)
            batch = {n: t.to(device) for n, t in batch.items()}
            labels = batch.pop("labels")
            with autocast(cfg.precision, device):
                sparse = labelled_logits(model, batch["input_ids"], batch["attention_mask"], labels) if causal else None
                logits = model(**batch).logits if sparse is None else None
                losses = []
                for _, a, b in segments:
                    if sparse is not None:  # logits only where the loss is taken; the mean over the client's tokens
                        mine = (sparse[2] >= a) & (sparse[2] < b)
                        losses.append(F.cross_entropy(sparse[0][mine].float(), sparse[1][mine]))
                    elif logits is None:  # (computed above whenever sparse is None)
                        raise RuntimeError("batched training: the model's logits are missing")
                    elif causal:  # next-token loss, mean over the client's own (non-ignored) tokens
                        losses.append(F.cross_entropy(logits[a:b, :-1].reshape(-1, logits.shape[-1]).float(),
                                                      labels[a:b, 1:].reshape(-1), ignore_index=IGNORE_INDEX))
                    elif problem == "regression":
                        losses.append(F.mse_loss(logits[a:b].squeeze(-1), labels[a:b].squeeze(-1)))
                    else:
                        losses.append(F.cross_entropy(logits[a:b].view(-1, logits.shape[-1]), labels[a:b].view(-1)))
            values = [float(v.detach()) for v in losses]
            for (i, _, _), v in zip(segments, values, strict=True):
                if not math.isfinite(v):
                    raise FloatingPointError(f"client {client_ids[i]}: loss is {v} at local step {steps[i]}")
            for p in stacks.values():
                p.grad = None
            torch.stack([v.float() for v in losses]).sum().backward()
            grads = {n: p.grad for n, p in stacks.items() if p.grad is not None}
            with torch.no_grad():
                for h in hooks:
                    h.before_clip(stacks, grads, active)
                if cfg.grad_clip > 0 and grads:
                    coef = (cfg.grad_clip / (_per_client_norms(list(grads.values())) + 1e-6)).clamp(max=1.0)
                    for g in grads.values():
                        g.mul_(_bcast(coef, g))
                for h in hooks:
                    h.after_clip(stacks, grads, active)
            optimizer.step(active)
            for i, v in zip(active, values, strict=True):
                loss_sum[i] += v
                steps[i] += 1

    updates = []
    start_cpu = {n: plan.params[n] for n in layout.names}
    for i, cid in enumerate(client_ids):
        local = {n: stacks[n][i].detach().to("cpu", torch.float32, copy=True) for n in layout.names}
        result = LocalResult(client_id=cid, start=start_cpu, local=local, delta=tensors.sub(local, plan.params),
                             steps=steps[i], metrics={"train_loss": loss_sum[i] / steps[i], "steps": float(steps[i])})

        def finish(r: LocalResult, slot: int = i) -> None:
            for h in hooks:
                h.finish(slot, r)

        updates.append(finish_update(result, frozenset(), states[i], len(datas[i]), finish))
    return updates


def _batchable(data: EncodedDataset) -> bool:
    """Whether the batched trainer computes this data's loss: one label per row, or next-token targets."""
    return data.is_single_label or data.token_labels is not None


def _collate_group(datas, parts, pad_id: int, pad_to: int, pad_multiple: int = 1,
                   pad_limit: int = 0) -> dict[str, torch.Tensor]:
    """The clients' batches concatenated (in slot order) and padded to one width."""
    rows: list[list[int]] = []
    types: list[list[int]] = []
    labels: list[torch.Tensor] = []
    token_labels: list[list[int]] = []
    for i, idx in parts:
        d = datas[i]
        rows.extend(d.input_ids[j] for j in idx)
        if d.token_type_ids is not None:
            types.extend(d.token_type_ids[j] for j in idx)
        if d.token_labels is not None:
            token_labels.extend(d.token_labels[j] for j in idx)
        labels.append(d.labels[torch.as_tensor(idx, dtype=torch.long)])
    merged = EncodedDataset(rows, types if types else None, torch.cat(labels),
                            token_labels=token_labels if token_labels else None)
    return collate(merged, range(len(rows)), pad_id, pad_to, pad_multiple, pad_limit)


# ---------------------------------------------------------------------------------------------
# The transport.


class ParallelSimulationTransport(SimulationTransport):
    """The in-process simulation, training up to ``parallel_clients`` sampled clients at a time.

    Updates come out per client, in the order of ``clients``, exactly as from
    :class:`SimulationTransport` (a group's K updates are held until the group finishes, so
    memory is O(K) updates, not O(cohort)). When the model or plan is not supported, every
    client trains alone (logged once, with the reason).
    """

    def __init__(self, model: nn.Module, client_data: Mapping[str, EncodedDataset], *, pad_id: int, seed: int,
                 device: torch.device, parallel_clients: int, channel: Channel | None = None,
                 attacks=None, client_states=None) -> None:
        super().__init__(model, client_data, pad_id=pad_id, seed=seed, device=device, channel=channel,
                         attacks=attacks, client_states=client_states)
        if parallel_clients < 1:
            raise ValueError(f"parallel_clients must be >= 1, got {parallel_clients}")
        self.parallel_clients = parallel_clients
        self._fallback_logged = False

    def plan_jobs(self, plan: RoundPlan, clients: Sequence[str]) -> Iterator[TrainJob]:
        """Groups of up to ``parallel_clients`` clients trained together (or one client per job, logged once, when
        the model, plan or data is not supported)."""
        reason = (parallel_support(self.model, plan, self.device, clients) if self.parallel_clients > 1
                  else "parallel_clients = 1")
        if not reason and not all(_batchable(d) for d in row_sources(self.client_data, list(clients))):
            reason = "the batched trainer handles single-label classification, regression and causal LM only"
        if reason:
            if self.parallel_clients > 1 and not self._fallback_logged:
                log.warning("simulation.parallel_clients = %d: training clients one at a time instead (%s)",
                            self.parallel_clients, reason)
                self._fallback_logged = True
            return super().plan_jobs(plan, clients)
        plan, down = self.channel.send_plan(plan)  # every client trains from the plan as it decodes it
        clients = list(clients)
        return iter([TrainJob(plan, plan, tuple(clients[g : g + self.parallel_clients]), down, batched=True)
                     for g in range(0, len(clients), self.parallel_clients)])

    def train_job(self, job: TrainJob, states) -> list[ClientUpdate]:
        """A batched group through :func:`train_group` (a group of one, or an unbatched job, trains alone)."""
        if not job.batched or len(job.clients) == 1:
            return super().train_job(job, states)
        group = list(job.clients)
        return train_group(
            self.model, [self.client_data[c] for c in group], job.plan, group, pad_id=self.pad_id,
            seeds=[client_seed(self.seed, job.plan.round, cid) for cid in group],
            group_seed=client_seed(self.seed, job.plan.round, "parallel:" + ",".join(group)),
            device=self.device, states=list(states),
        )
