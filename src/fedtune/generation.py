"""Batched generation with the KV cache: many prompts at once, left-padded, greedy or sampled.

Scoring a benchmark means generating for hundreds of prompts; one prompt at a time wastes the
CPU on tiny matrix products. :func:`generate_batches` sorts prompts by length, left-pads each
batch (so every row's next token sits in the last position), and lets ``model.generate`` reuse
its key/value cache; rows stop at the end-of-sequence token (or one of ``stop_ids``) and are
trimmed there. ``stop_strings`` (e.g. HumanEval's ``"\ndef "``) end a row once its text contains one
(the text after it is left to the caller to cut; a batch ends when all its rows have stopped).
Greedy by default; ``temperature > 0`` samples, seeded per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


@torch.inference_mode()
def generate_batches(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     batch_size: int = 8, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                     stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                     device: torch.device = torch.device("cpu")) -> list[list[int]]:
    """The new token ids generated for each prompt (token ids), in the prompts' order."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    stops = {t for t in (eos, *stop_ids) if t is not None}
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths together: less padding
    out: list[list[int]] = [[] for _ in prompts]
    if not hasattr(model, "generate"):  # an ONNX export: no cache; the whole sequence again for every token
        if temperature > 0:
            raise ValueError("sampling needs a PyTorch model (an ONNX export generates greedily only)")
        return [_greedy_without_cache(model, list(p), max_new_tokens, stops) for p in prompts]
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            n = len(prompts[i])
            ids[j, width - n:] = torch.as_tensor(list(prompts[i]))
            mask[j, width - n:] = 1
        sample = temperature > 0
        if sample:
            torch.manual_seed(seed + start)
        # (generate: transformers' method; nn.Module.__getattr__ is typed Tensor | Module)
        gen = model.generate(  # type: ignore[operator]
                             input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=sample, temperature=temperature if sample else None,
                             top_p=top_p if sample else None, top_k=None, pad_token_id=pad,
                             eos_token_id=sorted(stops) or None, use_cache=True,
                             **({"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}))
        for j, i in enumerate(rows):
            new = gen[j, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            out[i] = new[:cut]
    return out


def _greedy_without_cache(model, ids: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    new: list[int] = []
    for _ in range(max_new_tokens):
        t = torch.tensor([ids + new])
        nxt = int(model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0, -1].argmax())
        if nxt in stops:
            break
        new.append(nxt)
    return new
