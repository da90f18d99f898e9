"""Causal language models: instruction formatting with response-only loss, perplexity, and
generative classification by label log-likelihood.

Instruction tuning encodes ``prompt + response + eos`` and sets the labels of the prompt tokens
to -100, so the loss (and the perplexity) covers the response only. Generative classification
scores every candidate label text as a continuation of the prompt and predicts the one with the
highest (optionally length-normalized) log-likelihood.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedtune.batching import IGNORE_INDEX, bounded_text
from fedtune.sparse_logits import labelled_logits
from fedtune.tasks.json_files import read_json
from fedtune.token_rows import length_order

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass(frozen=True)
class Instruction:
    """One instruction-following example: an instruction (with optional input) and its response.

    A chat conversation is an Instruction too: ``system`` (an optional system message) and
    ``history`` (earlier ``(user, assistant)`` turns) come before the last user turn
    (``instruction``) and its answer (``output``); those need a chat template
    (:mod:`fedtune.tasks.prompt_format`).
    """

    instruction: str
    input: str
    output: str
    system: str = ""
    history: tuple[tuple[str, str], ...] = ()

    def prompt(self) -> str:
        """The prompt text (Alpaca template)."""
        if self.input.strip():
            return ALPACA_TEMPLATE.format(instruction=self.instruction, input=self.input)
        return ALPACA_TEMPLATE_NO_INPUT.format(instruction=self.instruction)

    def user_text(self) -> str:
        """The last user turn: the instruction, and its input after a blank line."""
        return f"{self.instruction}\n\n{self.input}" if self.input.strip() else self.instruction

    def messages(self) -> list[dict[str, str]]:
        """The conversation in the OpenAI chat format, the answer last."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.history:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return out + [{"role": "user", "content": self.user_text()}, {"role": "assistant", "content": self.output}]


ROLES = ("system", "user", "assistant")


def instruction_from_row(row: object, where: str) -> Instruction:
    """An Instruction from one data row: ``instruction``/``input``/``output`` fields, or a ``messages`` list
    (OpenAI chat format: an optional system message, then user and assistant turns alternating, the
    assistant last). ``where`` names the row in errors."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    if "messages" in row:
        return _from_messages(row["messages"], where)
    missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
    if missing:
        raise ValueError(f"{where} lacks text field(s) {missing} (or a 'messages' list)")
    return Instruction(row["instruction"], row.get("input", "") or "", row["output"])


def _from_messages(messages: object, where: str) -> Instruction:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}, message {j + 1}: expected {{\"role\": one of {list(ROLES)}, "
                             f"\"content\": text}}, got {str(m)[:80]}")
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    roles = [m["role"] for m in turns]
    if len(turns) < 2 or len(turns) % 2 or roles != ["user", "assistant"] * (len(turns) // 2):
        raise ValueError(f"{where}: messages must be user and assistant turns alternating after an optional "
                         f"system message, the assistant last; got {roles}")
    pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]
    return Instruction(pairs[-1][0], "", pairs[-1][1], system=system, history=tuple(pairs[:-1]))


def load_instructions(path: str | Path) -> list[Instruction]:
    """Read instructions from a JSON list or a JSONL file: Alpaca rows (instruction, input, output) or
    chat rows (``messages``, see :func:`instruction_from_row`); errors name the file and row (from 1)."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"instruction file not found: {path}")
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}, line {n}: not valid JSON: {exc}") from None
        where = "line"
    else:
        data = read_json(path, "instruction")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects (or a .jsonl file)")
        rows, where = list(enumerate(data, start=1)), "row"
    if not rows:
        raise ValueError(f"{path}: no instructions")
    return [instruction_from_row(row, f"{path}, {where} {n}") for n, row in rows]


@dataclass(frozen=True)
class EncodedLM:
    """Token ids and labels (-100 where no loss is taken), unpadded."""

    input_ids: Sequence[list[int]]  # lists of lists, or a compact TokenRows (read from the encoding cache)
    labels: Sequence[list[int]]

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


@torch.inference_mode()
def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of log p(label token | prefix) over non-ignored labels, and their counts.

    Plain-head causal LMs project only the labelled positions onto the vocabulary
    (:mod:`fedtune.sparse_logits`); other models (e.g. an ONNX export) give their full logits.
    """
    rows = batch["input_ids"].shape[0]
    sparse = labelled_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    if sparse is not None:
        logits, targets, row = sparse
        picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        sums = torch.zeros(rows, dtype=picked.dtype, device=picked.device).index_add_(0, row, picked)
        counts = torch.zeros(rows, dtype=torch.long, device=picked.device).index_add_(0, row, torch.ones_like(row))
        return sums, counts
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


@torch.inference_mode()
def score_candidate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]], *,
                        pad_id: int, normalize: bool = True, device: torch.device = torch.device("cpu"),
                        batch_size: int = 32) -> torch.Tensor:
    """:func:`score_candidates` on token ids: prompts already tokenized (with BOS), candidates too.

    When every candidate is one token (e.g. SmolLM2's "negative" / "positive"), one forward of each
    prompt scores them all (its next-token distribution); otherwise each (prompt, candidate) pair
    is scored. Rows are batched by length (less padding); the result is in the prompts' order.
    """
    model.eval()
    if all(len(c) == 1 for c in candidates):
        first = [c[0] for c in candidates]
        data = EncodedLM([list(p) + first[:1] for p in prompts], [[IGNORE_INDEX] * len(p) + first[:1] for p in prompts])
        return _by_length(data, batch_size, pad_id, device,
                          lambda batch: _next_token_logprobs(model, batch)[:, first]).view(len(prompts), len(candidates))
    rows, labels = [], []
    for pids in prompts:
        for cids in candidates:
            rows.append(list(pids) + list(cids))
            labels.append([IGNORE_INDEX] * len(pids) + list(cids))

    def score(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        lp, n = token_logprobs(model, batch)
        return lp / n if normalize else lp

    return _by_length(EncodedLM(rows, labels), batch_size, pad_id, device, score).view(len(prompts), len(candidates))


def _by_length(data: EncodedLM, batch_size: int, pad_id: int, device: torch.device, score) -> torch.Tensor:
    """``score`` of every row (one value or one vector per row), batched in order of length, in the data's order."""
    order = length_order(data.input_ids)
    parts = []
    for start in range(0, len(order), batch_size):
        batch = collate_lm(data, order[start:start + batch_size], pad_id)
        parts.append(score({k: v.to(device) for k, v in batch.items()}).float().cpu())
    scored = torch.cat(parts)
    out = torch.empty_like(scored)
    out[torch.as_tensor(order)] = scored
    return out


def _next_token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities over the vocabulary at each row's one labelled position: a (rows, vocab) tensor."""
    sparse = labelled_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    if sparse is not None:
        return torch.log_softmax(sparse[0].float(), dim=-1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    at = (batch["labels"] != IGNORE_INDEX).float().argmax(-1) - 1  # the position that predicts the label
    return torch.log_softmax(logits[torch.arange(len(at)), at].float(), dim=-1)
