"""Trained peft adapters on disk: one-shot fusion (``fedtune merge``) and warm starts (``model.init_adapter``).

:func:`merge_adapters` reads already-trained LoRA adapters (folders with ``adapter_config.json``
and ``adapter_model.safetensors``), checks they adapt the same base model, the same modules with
the same shapes, fuses them with a rule of :mod:`fedtune.lora_aggregation` and writes a peft
adapter that loads with ``PeftModel.from_pretrained``, plus ``merge_manifest.json``.

Rules: ``svd`` (rank ``--rank``; the share of singular-value energy kept is reported), ``fedit``,
``ffa`` (the inputs must share A) and ``flora`` (stacked: rank = sum of the input ranks, exact).
``fedex`` (its residual changes the base weights) and ``fedsa`` (B stays per client) do not give
a single adapter and are refused. The written adapter has ``lora_alpha = r`` (scaling 1): each
input's own scaling is folded into the factors.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedtune.artifacts import BASE_OFFSET_FILE
from fedtune.errors import MergeError  # (re-exported here: raised by this module)
from fedtune.lora_aggregation import aggregate_lora, lora_modules, module_rank, other_names

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

ADAPTER_CONFIG = "adapter_config.json"
"""peft's adapter configuration file."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""peft's adapter tensors file."""
MERGE_MANIFEST = "merge_manifest.json"
"""What ``fedtune merge`` writes next to the merged adapter: inputs, weights, rule, rank, energy kept."""
MERGE_RULES = ("svd", "fedit", "ffa", "flora")
"""Rules ``fedtune merge`` can write as one peft adapter."""


@dataclass
class Adapter:
    """One peft LoRA adapter read from a folder."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def scaling(self) -> float:
        """peft's scaling of this adapter: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    @property
    def base_model(self) -> str | None:
        """The base model the adapter was trained on (peft's ``base_model_name_or_path``, else fedtune.json's)."""
        name = self.config.get("base_model_name_or_path")
        meta = self.path / "fedtune.json"
        if not name and meta.is_file():
            name = json.loads(meta.read_text()).get("base_model")
        return name or None


def read_adapter(path: str | Path) -> Adapter:
    """Read a peft LoRA adapter folder; a MergeError naming the folder when it is not one fedtune can fuse."""
    path = Path(path)
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise MergeError(f"adapter {path}: not a peft adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = json.loads(cfg_file.read_text())
    if config.get("peft_type") != "LORA":
        raise MergeError(f"adapter {path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise MergeError(f"adapter {path}: per-module {key} is not supported")
    if config.get("use_dora"):
        raise MergeError(f"adapter {path}: DoRA adapters are not supported")
    if (path / BASE_OFFSET_FILE).is_file():
        raise MergeError(f"adapter {path}: comes with base-weight corrections (a fedex / flora run); "
                         "the adapter alone is not the model")
    tensors = load_file(str(weights))
    if not lora_modules(tensors):
        raise MergeError(f"adapter {path}: no lora_A / lora_B weights in {ADAPTER_WEIGHTS}")
    return Adapter(path, config, tensors)


def check_compatible(adapters: Sequence[Adapter]) -> None:
    """Same base model, task, target modules, tensor names and shapes (ranks may differ); else a MergeError."""
    first = adapters[0]
    ref_mods = lora_modules(first.tensors)
    for ad in adapters[1:]:
        def refuse(why: str, ad: Adapter = ad) -> None:
            raise MergeError(f"adapter {ad.path} does not match {first.path}: {why}")

        if ad.base_model != first.base_model:
            refuse(f"base model {ad.base_model!r} != {first.base_model!r}")
        if ad.config.get("task_type") != first.config.get("task_type"):
            refuse(f"task type {ad.config.get('task_type')!r} != {first.config.get('task_type')!r}")
        targets = sorted(ad.config.get("target_modules") or []), sorted(first.config.get("target_modules") or [])
        if targets[0] != targets[1]:
            refuse(f"target modules {targets[0]} != {targets[1]}")
        if set(ad.tensors) != set(first.tensors):
            diff = sorted(set(ad.tensors) ^ set(first.tensors))
            refuse(f"different tensors, e.g. {diff[0]}")
        for m in ref_mods:
            a, b, a0, b0 = ad.tensors[m.a], ad.tensors[m.b], first.tensors[m.a], first.tensors[m.b]
            if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
                refuse(f"module {m.name} maps {a.shape[1]} -> {b.shape[0]}, not {a0.shape[1]} -> {b0.shape[0]}")
        for n in other_names(first.tensors, ref_mods):
            if ad.tensors[n].shape != first.tensors[n].shape:
                refuse(f"tensor {n} has shape {tuple(ad.tensors[n].shape)}, not {tuple(first.tensors[n].shape)}")


def read_manifest_sizes(paths: Sequence[str | Path]) -> list[float]:
    """Example counts from client manifests (``size`` of ``fedtune partition``'s client files)."""
    sizes = []
    for p in paths:
        try:
            size = json.loads(Path(p).read_text())["size"]
        except (OSError, ValueError, KeyError) as exc:
            raise MergeError(f"manifest {p}: cannot read its 'size' ({exc})") from None
        if not isinstance(size, int) or size < 1:
            raise MergeError(f"manifest {p}: size {size!r} is not a positive integer")
        sizes.append(float(size))
    return sizes


def merge_adapters(paths: Sequence[str | Path], out: str | Path, *, rule: str = "svd", rank: int | None = None,
                   weights: Sequence[float] | None = None) -> dict:
    """Fuse the adapters in ``paths`` with ``rule``; write the adapter and its manifest to ``out``; return the manifest.

    ``weights`` default to equal; ``rank`` is required for svd (the output rank), optional for
    fedit / ffa (at least the largest input rank), and for flora must be the sum of input ranks.
    """
    if rule not in MERGE_RULES:
        why = {"fedex": "its residual changes the frozen base weights", "fedsa": "B stays with each client"}.get(rule)
        raise MergeError(f"--rule {rule!r} cannot be written as one adapter" + (f" ({why})" if why else "")
                         + f"; use one of {', '.join(MERGE_RULES)}")
    if not paths:
        raise MergeError("no adapters to merge")
    adapters = [read_adapter(p) for p in paths]
    check_compatible(adapters)
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise MergeError(f"{len(weights)} weights for {len(adapters)} adapters")
    if any(not w > 0 for w in weights):
        raise MergeError(f"weights must be > 0, got {weights}")
    mods = lora_modules(adapters[0].tensors)
    ranks = [module_rank(ad.tensors, mods[0]) for ad in adapters]
    if rule == "svd" and rank is None:
        raise MergeError("--rule svd needs --rank R (the merged adapter's rank)")
    if rule == "flora":
        if rank is not None and rank != sum(ranks):
            raise MergeError(f"--rule flora stacks the inputs: its rank is the sum of theirs ({sum(ranks)}), "
                             f"not --rank {rank}")
        rank = None
    if rank is not None and rank < 1:
        raise MergeError(f"--rank must be >= 1, got {rank}")
    shared_a = None
    if rule == "ffa":
        widest = adapters[ranks.index(max(ranks))]
        shared_a = {m.name: widest.tensors[m.a] for m in mods}
    try:
        result = aggregate_lora(rule, [ad.tensors for ad in adapters], weights, scaling=1.0,
                                scalings=[ad.scaling for ad in adapters], rank=rank, shared_a=shared_a)
    except (ValueError, KeyError) as exc:
        raise MergeError(f"--rule {rule}: {exc}") from None
    out_rank = module_rank(result.params, mods[0])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = adapters[0].path
    for f in src.iterdir():  # tokenizer, fedtune.json, ... so the folder is usable like the inputs
        if f.is_file() and f.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGE_MANIFEST):
            shutil.copy2(f, out / f.name)
    config = dict(adapters[0].config)
    config.update(r=out_rank, lora_alpha=float(out_rank), use_rslora=False, rank_pattern={}, alpha_pattern={})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in result.params.items()}, str(out / ADAPTER_WEIGHTS))
    total = sum(weights)
    manifest = {
        "inputs": [str(ad.path) for ad in adapters],
        "input_ranks": ranks,
        "weights": [w / total for w in weights],
        "rule": rule,
        "rank": out_rank,
        "energy_kept": result.energy_kept(),
        "energy_kept_min": result.energy_kept_min(),
        "gap": result.gap(1.0),
        "base_model": adapters[0].base_model,
    }
    (out / MERGE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def warm_start(model: nn.Module, path: str | Path) -> None:
    """Load a trained peft adapter (``model.init_adapter``) into ``model``'s LoRA and head tensors, in place.

    Every trainable tensor must come from the adapter, with the model's shapes (same rank and
    target modules); otherwise a MergeError names the adapter and the first mismatch.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    adapter = read_adapter(path)
    expected = set(get_peft_model_state_dict(model))
    missing = sorted(expected - set(adapter.tensors))
    extra = sorted(set(adapter.tensors) - expected)
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model does not"
        raise MergeError(f"model.init_adapter = {str(path)!r}: the adapter {what} (target modules "
                         f"{adapter.config.get('target_modules')}; check model.lora)")
    own = get_peft_model_state_dict(model)
    for k, v in adapter.tensors.items():
        if own[k].shape != v.shape:
            raise MergeError(f"model.init_adapter = {str(path)!r}: tensor {k} has shape {tuple(v.shape)}, the model's "
                             f"is {tuple(own[k].shape)} (adapter rank {adapter.config.get('r')}; check model.lora.r)")
    peft_model = cast("PeftModel", model)  # (a peft model: get_peft_model_state_dict above reads it as one)
    lora = cast("LoraConfig", peft_model.peft_config["default"])  # (fedtune's adapters are LoRA)
    scaling = lora.lora_alpha / lora.r
    if not math.isclose(adapter.scaling, scaling):
        factor = adapter.scaling / scaling  # keep the adapter's update: fold the scaling difference into B
        adapter.tensors = {k: v * factor if ".lora_B." in k else v for k, v in adapter.tensors.items()}
    set_peft_model_state_dict(model, adapter.tensors)
