"""`fedtune predict`: run a trained model (a run folder or any export) on new inputs, JSON lines out.

Inputs by task: ``text`` (and optional ``text_pair``) for classification, multi-label and
generative classification; ``question`` + ``context`` for QA; ``prompt`` for causal LM (the
prompt is used as given — wrap it in the training template yourself, or pass ``instruction`` /
``input`` fields and they are rendered as in training: the model's chat template, or the Alpaca
template, per the run's ``data.prompt_format``). ONNX exports run through onnxruntime.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from fedtune.artifacts import ModelMeta, load_for_inference
from fedtune.batching import EncodedDataset, collate, encode_texts
from fedtune.errors import PredictError  # (re-exported here: raised by this module)
from fedtune.generation import generate_batches
from fedtune.tasks.causal_lm import Instruction, _ids, score_candidate_ids
from fedtune.tasks.label_prompts import LabelPrompts
from fedtune.tasks.prompt_format import PromptFormat
from fedtune.tasks.qa import QAExample, postprocess, prepare_eval_features

REQUIRED = {
    "classification": ("text",),
    "multilabel": ("text",),
    "generative_classification": ("text",),
    "qa": ("question", "context"),
    "causal_lm": (),
}
"""Input fields each task needs (causal LM needs ``prompt`` or ``instruction``)."""


class Predictor:
    """A loaded model plus what it needs to turn raw inputs into outputs."""

    def __init__(self, path: str, *, max_new_tokens: int = 64) -> None:
        self.model, self.tokenizer, self.meta = load_for_inference(path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_new_tokens = max_new_tokens

    @property
    def task(self) -> str:
        """The model's task kind."""
        return self.meta.task

    def check(self, row: dict[str, Any], where: str) -> None:
        """Raise PredictError naming ``where`` and the missing field."""
        missing = [k for k in REQUIRED[self.task] if not isinstance(row.get(k), str)]
        if self.task == "causal_lm" and not isinstance(row.get("prompt"), str) and \
                not isinstance(row.get("instruction"), str):
            missing = ["prompt (or instruction)"]
        if missing:
            raise PredictError(f"{where}: a {self.task} model needs field(s) {missing}; got {sorted(row)}")

    def predict(self, rows: Iterable[dict[str, Any]], batch_size: int = 32) -> Iterator[dict[str, Any]]:
        """One output dict per input row, in order."""
        rows = list(rows)
        for i, r in enumerate(rows, start=1):  # rows count from 1, as in every other error
            self.check(r, f"input row {i}")
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            yield from getattr(self, f"_{self.task}")(chunk)

    @torch.no_grad()
    def _logits(self, chunk: list[dict[str, Any]]) -> torch.Tensor:
        texts = [r["text"] for r in chunk]
        pairs = [r.get("text_pair", "") for r in chunk] if any("text_pair" in r for r in chunk) else None
        enc = encode_texts(self.tokenizer, texts, pairs, [0] * len(chunk), self.meta.max_length, False)
        batch = collate(enc, range(len(chunk)), self.pad_id)
        batch.pop("labels")
        return self.model(**batch).logits.float()

    def _classification(self, chunk):
        logits = self._logits(chunk)
        if self.meta.problem_type == "regression":
            return [{**r, "value": float(v)} for r, v in zip(chunk, logits.squeeze(-1), strict=True)]
        probs = torch.softmax(logits, -1)
        names = self.meta.label_names or [str(i) for i in range(probs.shape[-1])]
        return [{**r, "label": names[int(p.argmax())], "scores": dict(zip(names, map(float, p), strict=True))}
                for r, p in zip(chunk, probs, strict=True)]

    def _multilabel(self, chunk):
        probs = torch.sigmoid(self._logits(chunk))
        names = self.meta.label_names or [str(i) for i in range(probs.shape[-1])]
        t = self.meta.threshold
        return [{**r, "labels": [n for n, v in zip(names, p, strict=True) if float(v) >= t], "threshold": t,
                 "scores": dict(zip(names, map(float, p), strict=True))} for r, p in zip(chunk, probs, strict=True)]

    @torch.no_grad()
    def _qa(self, chunk):
        examples = [QAExample(str(i), "", r["question"], r["context"], ()) for i, r in enumerate(chunk)]
        feats = prepare_eval_features(self.tokenizer, examples, self.meta.max_length, self.meta.doc_stride)
        data = EncodedDataset(feats.input_ids, feats.token_type_ids, torch.zeros(len(feats), dtype=torch.long))
        batch = collate(data, range(len(data)), self.pad_id)
        batch.pop("labels")
        out = self.model(**batch)
        starts = [out.start_logits[i, : len(feats.input_ids[i])].float().numpy() for i in range(len(data))]
        ends = [out.end_logits[i, : len(feats.input_ids[i])].float().numpy() for i in range(len(data))]
        answers = postprocess(examples, feats, starts, ends)
        return [{**r, "answer": answers[str(i)]} for i, r in enumerate(chunk)]

    @functools.cached_property
    def _label_prompts(self) -> LabelPrompts:
        """How the model's run rendered its rows (chat or plain, its resolved template)."""
        return LabelPrompts(self.tokenizer, self.meta.label_names or [], template=self.meta.prompt_template,
                            max_length=self.meta.max_length,
                            prompt_format="chat" if self.meta.prompt_format == "chat" else "alpaca")

    @torch.no_grad()
    def _generative_classification(self, chunk):
        names, lp = self.meta.label_names or [], self._label_prompts
        prompts = [lp.prompt_ids(r["text"], r.get("text_pair", "")) for r in chunk]
        scores = score_candidate_ids(self.model, prompts, lp.candidates, pad_id=self.pad_id)
        return [{**r, "label": names[int(s.argmax())], "log_likelihoods": dict(zip(names, map(float, s), strict=True))}
                for r, s in zip(chunk, scores, strict=True)]

    @torch.no_grad()
    def _causal_lm(self, chunk):
        out = []
        fmt = PromptFormat(self.tokenizer, self.meta.prompt_format)
        for r in chunk:
            if isinstance(r.get("prompt"), str):
                ids = _ids(self.tokenizer, r["prompt"], bos=True)
            else:  # rendered as in training: the chat template, or the Alpaca template
                ids = fmt.prompt_ids(Instruction(r["instruction"], r.get("input", ""), ""))
            out.append({**r, "generation": self.generate_ids(ids)})
        return out

    @torch.no_grad()
    def generate_ids(self, ids: list[int]) -> str:
        """Greedy continuation of the token ids ``ids`` (``max_new_tokens``; stops at end-of-sequence)."""
        new = generate_batches(self.model, self.tokenizer, [ids], max_new_tokens=self.max_new_tokens)[0]
        return self.tokenizer.decode(new, skip_special_tokens=True)


def describe(meta: ModelMeta) -> str:
    """One line: task, format and base model."""
    return f"{meta.task} model ({meta.format}, base {meta.base_model})"
