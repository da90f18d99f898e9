"""Extractive question answering (SQuAD v1.1): windows with stride, offsets, n-best decoding.

A long context is cut into overlapping windows (``max_length`` tokens, ``stride`` tokens of
overlap) by the fast tokenizer. Training windows get the answer's token span, or the [CLS]
position when the answer is not wholly inside the window. Evaluation windows keep each context
token's character offsets so predicted spans map back to text; ``postprocess`` searches the
n best start and end logits of every window of a question for the best valid span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtune.tasks.json_files import read_json


@dataclass(frozen=True)
class QAExample:
    """One question about one context, with its gold answers (text and character start)."""

    qid: str
    title: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class QAFeatures:
    """Tokenized windows: ids, and per window its example index and (eval) context offsets."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    example_index: list[int]
    start_positions: list[int] | None = None
    end_positions: list[int] | None = None
    offsets: list[list[tuple[int, int] | None]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def load_squad_json(path: str | Path) -> list[QAExample]:
    """Read a SQuAD v1.1 JSON file into examples (an error names the file and what is wrong)."""
    path = Path(path)
    raw = read_json(path, "SQuAD")
    if not isinstance(raw, dict) or "data" not in raw:
        raise ValueError(f"{path}: no top-level 'data' list (not SQuAD format)")
    examples = []
    for article in raw["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answers = tuple((a["text"], int(a["answer_start"])) for a in qa.get("answers", []))
                examples.append(QAExample(qa["id"], article.get("title", ""), qa["question"], para["context"], answers))
    if not examples:
        raise ValueError(f"{path}: no questions found")
    return examples


def _tokenize(tokenizer, examples: Sequence[QAExample], max_length: int, stride: int):
    pad_right = tokenizer.padding_side == "right"
    return tokenizer(
        [e.question.lstrip() for e in examples] if pad_right else [e.context for e in examples],
        [e.context for e in examples] if pad_right else [e.question.lstrip() for e in examples],
        truncation="only_second" if pad_right else "only_first",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )


def prepare_train_features(tokenizer, examples: Sequence[QAExample], max_length: int = 384, stride: int = 128) -> QAFeatures:
    """Windows labelled with the first gold answer's token span ([CLS] = 0 when not inside)."""
    enc = _tokenize(tokenizer, examples, max_length, stride)
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ex = examples[enc["overflow_to_sample_mapping"][i]]
        seq_ids = enc.sequence_ids(i)
        cls = enc["input_ids"][i].index(tokenizer.cls_token_id) if tokenizer.cls_token_id in enc["input_ids"][i] else 0
        if not ex.answers:
            starts.append(cls)
            ends.append(cls)
            continue
        text, char_start = ex.answers[0]
        char_end = char_start + len(text)
        ctx = [j for j, s in enumerate(seq_ids) if s == 1]
        first, last = ctx[0], ctx[-1]
        if offsets[first][0] > char_start or offsets[last][1] < char_end:
            starts.append(cls)
            ends.append(cls)
            continue
        s = first
        while s <= last and offsets[s][0] <= char_start:
            s += 1
        e = last
        while e >= first and offsets[e][1] >= char_end:
            e -= 1
        starts.append(s - 1)
        ends.append(e + 1)
    return QAFeatures(
        input_ids=list(enc["input_ids"]),
        token_type_ids=list(enc["token_type_ids"]) if "token_type_ids" in enc else None,
        example_index=list(enc["overflow_to_sample_mapping"]),
        start_positions=starts,
        end_positions=ends,
    )


def prepare_eval_features(tokenizer, examples: Sequence[QAExample], max_length: int = 384, stride: int = 128) -> QAFeatures:
    """Windows with character offsets for context tokens (None elsewhere)."""
    enc = _tokenize(tokenizer, examples, max_length, stride)
    offsets = []
    for i, offs in enumerate(enc["offset_mapping"]):
        seq_ids = enc.sequence_ids(i)
        offsets.append([tuple(o) if seq_ids[j] == 1 else None for j, o in enumerate(offs)])
    return QAFeatures(
        input_ids=list(enc["input_ids"]),
        token_type_ids=list(enc["token_type_ids"]) if "token_type_ids" in enc else None,
        example_index=list(enc["overflow_to_sample_mapping"]),
        offsets=offsets,
    )


def postprocess(
    examples: Sequence[QAExample],
    features: QAFeatures,
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """Best-scoring valid span per question over all its windows: {question id: answer text}."""
    if features.offsets is None:
        raise ValueError("postprocess needs evaluation features (with offsets)")
    best: dict[int, tuple[float, str]] = {}
    for i, ex_idx in enumerate(features.example_index):
        offsets = features.offsets[i]
        s_logits = np.asarray(start_logits[i])[: len(offsets)]
        e_logits = np.asarray(end_logits[i])[: len(offsets)]
        s_top = np.argsort(s_logits)[::-1][:n_best]
        e_top = np.argsort(e_logits)[::-1][:n_best]
        context = examples[ex_idx].context
        for s in s_top:
            if offsets[s] is None:
                continue
            for e in e_top:
                if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(s_logits[s] + e_logits[e])
                if ex_idx not in best or score > best[ex_idx][0]:
                    best[ex_idx] = (score, context[offsets[s][0] : offsets[e][1]])
    return {ex.qid: best[i][1] if i in best else "" for i, ex in enumerate(examples)}
