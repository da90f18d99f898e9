"""Causal language models: instruction formatting with response-only loss, perplexity, and
generative classification by label log-likelihood.

Instruction tuning encodes ``prompt + response + eos`` and sets the labels of the prompt tokens
to -100, so the loss (and the perplexity) covers the response only. Generative classification
scores every candidate label text as a continuation of the prompt and predicts the one with the
highest (optionally length-normalized) log-likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedtune.batching import bounded_text
from fedtune.tasks.json_files import read_json

IGNORE_INDEX = -100
"""Label value that the loss skips (prompt tokens, padding)."""

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Instruction:
    """One instruction-following example."""

    instruction: str
    input: str
    output: str

    def prompt(self) -> str:
        """The prompt text (Alpaca template)."""
        if self.input.strip():
            return ALPACA_TEMPLATE.format(instruction=self.instruction, input=self.input)
        return ALPACA_TEMPLATE_NO_INPUT.format(instruction=self.instruction)


def load_instructions(path: str | Path) -> list[Instruction]:
    """Read an Alpaca-style JSON list (instruction, input, output); errors name the file and row."""
    path = Path(path)
    rows = read_json(path, "instruction")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty JSON list of objects")
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}: row {i} lacks text field(s) {missing}")
        out.append(Instruction(row["instruction"], row.get("input", "") or "", row["output"]))
    return out


@dataclass(frozen=True)
class EncodedLM:
    """Token ids and labels (-100 where no loss is taken), unpadded."""

    input_ids: list[list[int]]
    labels: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)


def _ids(tokenizer, text: str, bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []) + ids


def encode_instructions(tokenizer, examples: Sequence[Instruction], max_length: int) -> EncodedLM:
    """bos + prompt + response + eos, truncated to ``max_length``; loss on response (+eos) only.

    An overlong prompt or response is cut before tokenizing (:func:`fedtune.batching.bounded_text`:
    the same first ``max_length`` tokens, memory bounded by ``max_length``).
    """
    ids_all, labels_all = [], []
    for ex in examples:
        prompt = _ids(tokenizer, bounded_text(tokenizer, ex.prompt(), max_length), bos=True)
        response = _ids(tokenizer, bounded_text(tokenizer, ex.output, max_length), bos=False) + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
        ids_all.append(ids)
        labels_all.append(labels)
    return EncodedLM(ids_all, labels_all)


def collate_lm(data: EncodedLM, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padded label positions are -100."""
    rows = [data.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for j, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[j, :n] = torch.as_tensor(data.input_ids[i])
        mask[j, :n] = 1
        labels[j, :n] = torch.as_tensor(data.labels[i])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log p(label token | prefix) over non-ignored labels, and their counts."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    shift_logits = logits[:, :-1]
    shift_labels = batch["labels"][:, 1:]
    keep = shift_labels != IGNORE_INDEX
    logp = torch.log_softmax(shift_logits, dim=-1)
    picked = logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1), keep.sum(-1)


def perplexity(model: nn.Module, data: EncodedLM, *, pad_id: int, batch_size: int = 16,
               device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """exp(mean negative log-likelihood per response token) and that mean loss."""
    model.eval()
    total_lp, total_n = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate_lm(data, range(start, min(start + batch_size, len(data))), pad_id)
        lp, n = token_logprobs(model, {k: v.to(device) for k, v in batch.items()})
        total_lp += float(lp.sum())
        total_n += int(n.sum())
    if total_n == 0:
        raise ValueError("no response tokens to score (all truncated?)")
    loss = -total_lp / total_n
    return {"loss": loss, "perplexity": math.exp(loss)}


def score_candidates(model: nn.Module, tokenizer, prompts: Sequence[str], candidates: Sequence[str], *,
                     normalize: bool = True, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Log-likelihood of every candidate continuation for every prompt: a (prompts, candidates) tensor.

    With ``normalize`` the sum is divided by the candidate's token count (fair to long labels).
    """
    return score_candidate_ids(model, [_ids(tokenizer, p, bos=True) for p in prompts], candidate_ids(tokenizer, candidates),
                               pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                               normalize=normalize, device=device)


def candidate_ids(tokenizer, candidates: Sequence[str]) -> list[list[int]]:
    """Each candidate's token ids (no special tokens); a candidate that tokenizes to nothing is an error."""
    out = []
    for c in candidates:
        ids = _ids(tokenizer, c, bos=False)
        if not ids:
            raise ValueError(f"candidate label {c!r} tokenizes to nothing")
        out.append(ids)
    return out


@torch.no_grad()
def score_candidate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]], *,
                        pad_id: int, normalize: bool = True, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """:func:`score_candidates` on token ids: prompts already tokenized (with BOS), candidates too."""
    rows, labels = [], []
    for pids in prompts:
        for cids in candidates:
            rows.append(list(pids) + list(cids))
            labels.append([IGNORE_INDEX] * len(pids) + list(cids))
    data = EncodedLM(rows, labels)
    model.eval()
    scores = []
    for start in range(0, len(data), 32):
        batch = collate_lm(data, range(start, min(start + 32, len(data))), pad_id)
        lp, n = token_logprobs(model, {k: v.to(device) for k, v in batch.items()})
        scores.append((lp / n if normalize else lp).cpu())
    return torch.cat(scores).view(len(prompts), len(candidates))
