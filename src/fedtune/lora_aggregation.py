"""LoRA-aware aggregation: rules that see each adapted module's (A, B) pair together.

Averaging A and B separately is not averaging the update ``scaling * B @ A``. The rules here take
each client's adapter per module — ``A`` of shape ``(r_i, in)``, ``B`` of shape ``(out, r_i)``
and the client's scaling ``s_i`` (peft: ``lora_alpha / r``) — so clients may train at different
ranks. Every other tensor (the task head, any ``modules_to_save``) is averaged by weight in
every rule.

Rules (``weights`` are example counts; ``mean`` below is the weighted mean over clients):

- ``fedit``: A and B averaged separately (zero-padded to the largest rank; B in units of the
  output scaling). The common baseline; *not* exact: ``s B̄ Ā != mean(s_i B_i A_i)``.
- ``svd``: the full ``mean(s_i B_i A_i)`` per module, truncated by SVD to the global rank
  (``B = U S / s``, ``A = V^T``); exact when the rank is at least the sum of client ranks.
  The share of singular-value energy kept (``sum_{k<r} S_k^2 / sum S_k^2``) is reported.
- ``ffa``: FFA-LoRA: A frozen at its shared initialization (every client's A must be the first
  ``r_i`` rows of it); only B is averaged. Exact.
- ``fedsa``: FedSA-LoRA: A shared and averaged, B personal (stays on each client). The server
  maths is fedit's; the global B it returns is the mean of the clients' B (the global model that
  is reported). The client side is in :mod:`fedtune.runtime.lora`.
- ``fedex``: FedEx-LoRA: A and B averaged, and the residual ``mean(s_i B_i A_i) - s B̄ Ā`` returned
  as a dense correction of the frozen base weight. Adapter plus residual is exact.
- ``flora``: FLoRA: the clients' adapters stacked along the rank dimension (rank ``sum r_i``),
  each client's weight and scaling folded into its B block, so the product is exactly the
  weighted sum. With ``merge=True`` the stacked product is returned as a base correction instead
  (merge into the base and start fresh adapters: the rank does not grow round after round).

Only torch is imported: no I/O, logging or globals. Factors are accumulated in float64 and
returned in float32, so the exact rules hold to float32 rounding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedtune.types import TensorDict

RULES = ("fedit", "svd", "ffa", "fedsa", "fedex", "flora")
"""The LoRA aggregation rules, by config name (``model.lora.aggregation``)."""

_LORA_A = re.compile(r"^(?P<module>.+)\.lora_A(?P<adapter>\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: the names of its A and B factors and of the frozen base weight."""

    name: str
    """The adapted module's path, e.g. ``base_model.model.bert.encoder.layer.0.attention.self.query``."""
    a: str
    """Name of the ``lora_A`` weight, shape ``(r, in)``."""
    b: str
    """Name of the ``lora_B`` weight, shape ``(out, r)``."""

    @property
    def base(self) -> str:
        """Name of the frozen base weight (peft wraps the original Linear as ``base_layer``)."""
        return f"{self.name}.base_layer.weight"


def lora_modules(names: Iterable[str]) -> list[LoraModule]:
    """The (A, B) pairs among tensor names, in order of the A names.

    Works for fedtune's trainable names (``...query.lora_A.default.weight``) and for peft's saved
    adapter keys (``...query.lora_A.weight``). An A without its B (or a B without its A) is an
    error naming the tensor.
    """
    names = list(names)
    present = set(names)
    modules: list[LoraModule] = []
    paired_b: set[str] = set()
    for name in names:
        m = _LORA_A.match(name)
        if m is None:
            continue
        b = f"{m['module']}.lora_B{m['adapter'] or ''}.weight"
        if b not in present:
            raise KeyError(f"LoRA factor {name} has no matching {b}")
        modules.append(LoraModule(m["module"], name, b))
        paired_b.add(b)
    stray = [n for n in names if ".lora_B" in n and n.endswith(".weight") and n not in paired_b]
    if stray:
        raise KeyError(f"LoRA factor {stray[0]} has no matching lora_A")
    return modules


def other_names(names: Iterable[str], modules: Sequence[LoraModule]) -> list[str]:
    """Tensor names that are not LoRA factors (task head, ``modules_to_save``): averaged in every rule."""
    factors = {m.a for m in modules} | {m.b for m in modules}
    return [n for n in names if n not in factors]


def module_rank(params: Mapping[str, torch.Tensor], module: LoraModule) -> int:
    """The rank of ``module``'s adapter in ``params`` (rows of A), checked against B's columns."""
    a, b = params[module.a], params[module.b]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"{module.name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a rank-r pair")
    return int(a.shape[0])


def delta_weights(params: Mapping[str, torch.Tensor], scaling: float, modules: Sequence[LoraModule] | None = None
                  ) -> dict[str, torch.Tensor]:
    """``scaling * B @ A`` per module (float64), keyed by module name."""
    modules = lora_modules(params) if modules is None else modules
    return {m.name: scaling * (params[m.b].double() @ params[m.a].double()) for m in modules}


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B zero-padded (or, when ``rank`` is smaller, truncated) to ``rank`` components."""
    r = a.shape[0]
    if rank <= r:
        return a[:rank], b[:, :rank]
    a_pad = torch.zeros(rank, a.shape[1], dtype=a.dtype, device=a.device)
    b_pad = torch.zeros(b.shape[0], rank, dtype=b.dtype, device=b.device)
    a_pad[:r], b_pad[:, :r] = a, b
    return a_pad, b_pad


def truncate_rank(params: Mapping[str, torch.Tensor], rank: int, modules: Sequence[LoraModule]) -> TensorDict:
    """``params`` with every adapter cut to its first ``rank`` components (other tensors unchanged)."""
    out = dict(params)
    for m in modules:
        out[m.a], out[m.b] = params[m.a][:rank], params[m.b][:, :rank]
    return out


@dataclass
class LoraResult:
    """What a LoRA rule returns: the global tensors, base corrections and, for svd, the energy kept."""

    params: TensorDict
    """Global adapter factors and averaged other tensors (float32)."""
    base_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    """Dense corrections of frozen base weights, by module name (fedex residual, flora merge)."""
    energy: dict[str, tuple[float, float]] = field(default_factory=dict)
    """svd: per module, (singular-value energy kept, total energy)."""
    target: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per module, the weighted mean of the clients' ``s_i B_i A_i`` (float64): what an exact rule reproduces."""

    def delta(self, scaling: float, modules: Sequence[LoraModule] | None = None) -> dict[str, torch.Tensor]:
        """The merged update per module: ``scaling * B @ A`` of the result plus its base correction (float64)."""
        d = delta_weights(self.params, scaling, modules)
        return {k: v + self.base_delta[k].double() if k in self.base_delta else v for k, v in d.items()}

    def energy_kept(self) -> float | None:
        """Share of singular-value energy kept over all modules (None when no SVD was taken)."""
        total = sum(t for _, t in self.energy.values())
        if not self.energy:
            return None
        return 1.0 if total == 0 else sum(k for k, _ in self.energy.values()) / total

    def energy_kept_min(self) -> float | None:
        """The smallest per-module share of energy kept (None when no SVD was taken)."""
        shares = [k / t if t > 0 else 1.0 for k, t in self.energy.values()]
        return min(shares) if shares else None

    def gap(self, scaling: float, modules: Sequence[LoraModule] | None = None) -> float:
        """Relative Frobenius distance of the merged update from the clients' mean ``s B A`` (0 = exact)."""
        d = self.delta(scaling, modules)
        num = sum(float((d[k] - t).pow(2).sum()) for k, t in self.target.items())
        den = sum(float(t.pow(2).sum()) for t in self.target.values())
        return (num / den) ** 0.5 if den > 0 else num ** 0.5


class _ModuleSums:
    """Running sums for one module (float64)."""

    def __init__(self) -> None:
        self.a: torch.Tensor | None = None  # sum w_i A_i (padded)
        self.b: torch.Tensor | None = None  # sum w_i (s_i / s) B_i (padded)
        self.dense: torch.Tensor | None = None  # sum w_i s_i B_i A_i
        self.stack_a: list[torch.Tensor] = []
        self.stack_b: list[torch.Tensor] = []  # w_i (s_i / s) B_i, divided by the total at the end
        self.max_rank = 0

    def grow(self, rank: int) -> None:
        if self.a is not None and rank > self.a.shape[0]:
            self.a, self.b = pad_rank(*self.factors(), rank)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded factor sums ``(a, b)``: both set by the same (first non-stacked) client."""
        if self.a is None or self.b is None:
            raise RuntimeError("LoRA aggregation: no factor sums for this module (no client folded in)")
        return self.a, self.b

    def dense_sum(self) -> torch.Tensor:
        """The dense sum ``sum w_i s_i B_i A_i`` (set by every client)."""
        if self.dense is None:
            raise RuntimeError("LoRA aggregation: no dense sum for this module (no client folded in)")
        return self.dense


class LoraAccumulator:
    """Streaming LoRA aggregation: fold clients in one at a time, then :meth:`result` for a rule.

    Memory is one dense ``out x in`` matrix plus one padded factor pair per module whatever the
    number of clients — except ``flora`` without ``merge``, whose stacked result grows with them.

    ``scaling`` is the output adapter's scaling (the merged delta is ``scaling * B @ A``);
    ``rank`` the output rank (svd: required; fedit / fedex / fedsa: the factors are padded to it,
    default the largest client rank); ``shared_a`` (ffa) the shared frozen A per module name.
    """

    def __init__(self, rule: str, *, scaling: float, rank: int | None = None,
                 shared_a: Mapping[str, torch.Tensor] | None = None, merge: bool = False) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown LoRA aggregation rule {rule!r} (known: {', '.join(RULES)})")
        if not scaling > 0:
            raise ValueError(f"LoRA output scaling must be > 0, got {scaling}")
        if rule == "svd" and (rank is None or rank < 1):
            raise ValueError(f"svd aggregation needs a global rank >= 1, got {rank}")
        if rule == "ffa" and shared_a is None:
            raise ValueError("ffa aggregation needs the shared frozen A of every module (shared_a)")
        self.rule, self.scaling, self.rank, self.merge = rule, float(scaling), rank, merge
        self.shared_a = dict(shared_a or {})
        self.modules: list[LoraModule] | None = None
        self.others: list[str] = []
        self._sums: dict[str, _ModuleSums] = {}
        self._other_sums: TensorDict = {}
        self._total = 0.0
        self.count = 0

    def add(self, params: Mapping[str, torch.Tensor], weight: float, scaling: float | None = None) -> None:
        """Fold in one client's adapter (``params``: its LoRA factors at its own rank and other tensors)."""
        if not weight > 0:
            raise ValueError(f"client weight must be > 0, got {weight}")
        s_i = self.scaling if scaling is None else float(scaling)
        if not s_i > 0:
            raise ValueError(f"client LoRA scaling must be > 0, got {s_i}")
        if self.modules is None:
            self.modules = lora_modules(params)
            if not self.modules:
                raise ValueError("no LoRA factors (lora_A / lora_B weights) among the tensors")
            self.others = other_names(params, self.modules)
            self._sums = {m.name: _ModuleSums() for m in self.modules}
        expected = {m.a for m in self.modules} | {m.b for m in self.modules} | set(self.others)
        if set(params) != expected:
            diff = sorted(set(params) ^ expected)
            raise KeyError(f"client tensors differ from the first client's: {diff[:3]}")
        ratio = s_i / self.scaling
        for m in self.modules:
            r = module_rank(params, m)
            a, b = params[m.a].double(), params[m.b].double()
            acc = self._sums[m.name]
            acc.max_rank = max(acc.max_rank, r)
            dense = (weight * s_i) * (b @ a)
            acc.dense = dense if acc.dense is None else acc.dense.add_(dense)
            if self.rule == "ffa":
                shared = self.shared_a.get(m.name)
                if shared is None:
                    raise KeyError(f"ffa: no shared A for module {m.name}")
                if r > shared.shape[0] or not torch.allclose(a, shared[:r].double(), rtol=0, atol=1e-6):
                    raise ValueError(f"ffa: a client's lora_A of {m.name} is not the shared frozen A "
                                     f"(FFA-LoRA trains B only)")
            if self.rule == "flora" and not self.merge:
                acc.stack_a.append(a.clone())
                acc.stack_b.append((weight * ratio) * b)
                continue
            width = max(r, acc.a.shape[0] if acc.a is not None else 0,
                        self.shared_a[m.name].shape[0] if self.rule == "ffa" else 0)
            acc.grow(width)
            a_pad, b_pad = pad_rank(a, b, width)
            if acc.a is None or acc.b is None:  # both unset: the first client (they are set together)
                acc.a, acc.b = weight * a_pad, (weight * ratio) * b_pad
            else:
                acc.a.add_(a_pad, alpha=weight)
                acc.b.add_(b_pad, alpha=weight * ratio)
        for n in self.others:
            v = params[n].detach().double()
            if n in self._other_sums:
                if v.shape != self._other_sums[n].shape:
                    raise ValueError(f"tensor {n}: shape {tuple(v.shape)} != {tuple(self._other_sums[n].shape)}")
                self._other_sums[n].add_(v, alpha=weight)
            else:
                self._other_sums[n] = weight * v
        self._total += weight
        self.count += 1

    def result(self) -> LoraResult:
        """The rule's global tensors (and base corrections / energy) from everything added."""
        if self.modules is None:
            raise ValueError("no clients to aggregate")
        total = self._total
        out = LoraResult(params={n: (v / total).float() for n, v in self._other_sums.items()})
        for m in self.modules:
            acc = self._sums[m.name]
            target = acc.dense_sum() / total
            out.target[m.name] = target
            if self.rule == "svd":
                if self.rank is None:  # checked in __init__: svd needs a global rank
                    raise ValueError("svd aggregation needs a global rank")
                a, b, kept, energy = _svd_factors(target, self.rank, self.scaling)
                out.energy[m.name] = (kept, energy)
            elif self.rule == "flora" and not self.merge:
                a = torch.cat(acc.stack_a, dim=0)
                b = torch.cat(acc.stack_b, dim=1) / total
            elif self.rule == "flora":  # merged into the base; the caller starts fresh adapters
                rank = self.rank or acc.max_rank
                a = torch.zeros(rank, target.shape[1], dtype=torch.float64)
                b = torch.zeros(target.shape[0], rank, dtype=torch.float64)
                out.base_delta[m.name] = target.float()
            else:
                sum_a, sum_b = acc.factors()
                rank = self.rank if self.rank is not None else sum_a.shape[0]
                if rank < acc.max_rank:
                    raise ValueError(f"{self.rule}: output rank {rank} is below a client's rank {acc.max_rank} "
                                     f"({m.name})")
                a, b = pad_rank(sum_a / total, sum_b / total, rank)
                if self.rule == "ffa":
                    a = self.shared_a[m.name].double()
                    b = pad_rank(a, b, a.shape[0])[1]
                if self.rule == "fedex":
                    out.base_delta[m.name] = (target - self.scaling * (b @ a)).float()
            out.params[m.a], out.params[m.b] = a.float().contiguous(), b.float().contiguous()
        return out


def _svd_factors(w: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-``rank`` factors of ``w`` (``scaling * B @ A ~= w``) and the (kept, total) squared singular values."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = min(rank, s.shape[0])
    energy = float(s.pow(2).sum())
    kept = float(s[:k].pow(2).sum())
    b = (u[:, :k] * s[:k]) / scaling
    a = vh[:k]
    a, b = pad_rank(a, b, rank)
    return a, b, kept, energy


def aggregate_lora(rule: str, clients: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], *,
                   scaling: float = 1.0, scalings: Sequence[float] | None = None, rank: int | None = None,
                   shared_a: Mapping[str, torch.Tensor] | None = None, merge: bool = False) -> LoraResult:
    """Apply ``rule`` to whole client adapters at once (see the module docstring for the rules).

    ``scalings`` are the clients' own scalings (default: all ``scaling``, the output's).
    """
    if len(clients) != len(weights) or not clients:
        raise ValueError(f"need one weight per client (got {len(clients)} clients, {len(weights)} weights)")
    if scalings is not None and len(scalings) != len(clients):
        raise ValueError(f"need one scaling per client (got {len(scalings)} for {len(clients)} clients)")
    acc = LoraAccumulator(rule, scaling=scaling, rank=rank, shared_a=shared_a, merge=merge)
    for i, (c, w) in enumerate(zip(clients, weights, strict=True)):
        acc.add(c, w, None if scalings is None else scalings[i])
    return acc.result()


def fedit(clients, weights, **kw) -> LoraResult:
    """FedIT: A and B averaged separately (not exact). See :func:`aggregate_lora` for the arguments."""
    return aggregate_lora("fedit", clients, weights, **kw)


def svd(clients, weights, *, rank: int, **kw) -> LoraResult:
    """Mean of the full updates, truncated by SVD to ``rank`` (exact at rank >= sum of client ranks)."""
    return aggregate_lora("svd", clients, weights, rank=rank, **kw)


def ffa(clients, weights, *, shared_a: Mapping[str, torch.Tensor], **kw) -> LoraResult:
    """FFA-LoRA: A frozen at ``shared_a`` (per module name), B averaged (exact)."""
    return aggregate_lora("ffa", clients, weights, shared_a=shared_a, **kw)


def fedsa(clients, weights, **kw) -> LoraResult:
    """FedSA-LoRA server side: A averaged; the returned B is the clients' mean B (the reported global model)."""
    return aggregate_lora("fedsa", clients, weights, **kw)


def fedex(clients, weights, **kw) -> LoraResult:
    """FedEx-LoRA: A and B averaged, residual folded into ``base_delta`` (exact)."""
    return aggregate_lora("fedex", clients, weights, **kw)


def flora(clients, weights, *, merge: bool = False, **kw) -> LoraResult:
    """FLoRA: adapters stacked along the rank (exact); ``merge=True`` returns the product as ``base_delta``."""
    return aggregate_lora("flora", clients, weights, merge=merge, **kw)
