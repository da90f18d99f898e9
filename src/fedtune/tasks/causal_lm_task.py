"""Causal language models as Tasks: instruction tuning and generative classification.

Instruction tuning (``data.task = "causal_lm"``): Alpaca-format rows (instruction, input, output)
from ``$FEDTUNE_DATA_DIR/code_alpaca`` (``data.dataset = "code_alpaca"``), a local JSON file
(``data.train_file``, optional ``data.eval_file``) or a hub dataset with those columns. Loss on
the response tokens only; scored by response perplexity; greedy generations for the first
``eval.samples`` eval prompts are appended to ``samples.jsonl`` at every evaluation. Without an
eval file, a seeded ``data.eval_size`` rows (200 when 0) are held out of the training rows.

Generative classification (``data.task = "generative_classification"``): a classification
dataset's rows become instructions (:mod:`fedtune.tasks.label_prompts`: the model's chat template,
or a plain prompt for base models) answered by the label's name; scored with the dataset's official
metric by the constrained prediction (the label with the highest length-normalized log-likelihood)
and, with ``eval.generative``, by greedy answers parsed to label names, side by side.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fedtune import encode_cache
from fedtune.batching import EncodedDataset
from fedtune.config import DataConfig, EvalConfig, ModelConfig
from fedtune.generation import generate_batches
from fedtune.models import load_model
from fedtune.precision import autocast
from fedtune.tasks.causal_lm import (
    IGNORE_INDEX,
    EncodedLM,
    Instruction,
    instruction_from_row,
    load_instructions,
    perplexity,
    score_candidate_ids,
)
from fedtune.tasks.classification_metrics import MetricChoice, per_class_report
from fedtune.tasks.data import DataError, TaskData, data_dir, seeded_rng
from fedtune.tasks.label_prompts import LabelPrompts
from fedtune.tasks.metrics import compute_metrics, metric_keys, primary_metric
from fedtune.tasks.prompt_format import PromptFormat, PromptFormatError
from fedtune.tasks.task import EvalContext, PartitionUnits, Task

log = logging.getLogger(__name__)

CODE_ALPACA = ("code_alpaca", "codealpaca", "sahil280114/codealpaca")
"""Dataset names that mean Code Alpaca."""
DEFAULT_HELD_OUT = 200
"""Eval rows held out of the training rows when there is no eval file and data.eval_size is 0."""


def load_instruction_data(cfg: DataConfig, seed: int) -> tuple[list[Instruction], list[Instruction]]:
    """Training and evaluation instructions (files, the local Code Alpaca folder, or the hub)."""
    if cfg.train_file:
        train = load_instructions(cfg.train_file)
        evals = load_instructions(cfg.eval_file) if cfg.eval_file else None
    else:
        root = data_dir()
        folder = root / "code_alpaca" if root else None
        files = sorted(folder.glob("*.json")) if folder is not None and folder.is_dir() else []
        if cfg.dataset.strip().lower() in CODE_ALPACA and files:
            train, evals = load_instructions(files[0]), None
        else:
            try:
                import datasets

                ds = datasets.load_dataset(cfg.dataset)
            except Exception as exc:
                raise DataError(f"could not load instruction dataset {cfg.dataset!r} from the hub "
                                f"({type(exc).__name__}); without hub access set data.train_file to an "
                                "Alpaca-format JSON file (or put code_alpaca in $FEDTUNE_DATA_DIR)") from exc
            part = ds[cfg.train_split]
            missing = [c for c in ("instruction", "output") if c not in part.column_names]
            if missing and "messages" not in part.column_names:
                raise DataError(f"{cfg.dataset} [{cfg.train_split}]: no column(s) {missing} and no 'messages'; "
                                f"columns: {', '.join(part.column_names)}")
            train = [instruction_from_row(r, f"{cfg.dataset} [{cfg.train_split}], row {i}")
                     for i, r in enumerate(part, start=1)]
            evals = None
    if evals is None:
        held = cfg.eval_size or DEFAULT_HELD_OUT
        if held >= len(train):
            raise DataError(f"cannot hold out {held} eval rows from {len(train)} instructions; set data.eval_size")
        order = seeded_rng(seed, 7).permutation(len(train)).tolist()
        evals = [train[i] for i in sorted(order[:held])]
        train = [train[i] for i in sorted(order[held:])]
    elif cfg.eval_size:
        evals = [evals[i] for i in sorted(seeded_rng(seed, 1).permutation(len(evals))[: cfg.eval_size].tolist())]
    if cfg.train_size and cfg.train_size < len(train):
        train = [train[i] for i in sorted(seeded_rng(seed, 0).permutation(len(train))[: cfg.train_size].tolist())]
    return train, evals


def _lm_rows(enc: EncodedLM, classes: Sequence[int] | None = None) -> EncodedDataset:
    """LM rows; ``labels`` holds each row's class id (generative classification) or zeros (unused)."""
    labels = torch.tensor(list(classes), dtype=torch.long) if classes is not None else torch.zeros(len(enc), dtype=torch.long)
    return EncodedDataset(enc.input_ids, None, labels, token_labels=enc.labels)


def _token_labels(rows: EncodedDataset) -> Sequence[list[int]]:
    """The per-token targets of LM rows (:func:`_lm_rows` always sets them)."""
    if rows.token_labels is None:
        raise ValueError("causal LM rows without per-token labels (token_labels)")
    return rows.token_labels


def _with_answers(enc: EncodedLM, split: str, max_length: int) -> EncodedLM:
    """The rows that keep answer tokens after truncation (a row without any has nothing to learn or score)."""
    keep = [i for i, labels in enumerate(enc.labels) if any(t != IGNORE_INDEX for t in labels)]
    if len(keep) == len(enc):
        return enc
    if not keep:
        raise DataError(f"no {split} instruction keeps any answer token within data.max_length = {max_length}: "
                        "the prompts are longer than that; raise data.max_length")
    log.warning("%d of %d %s instructions keep no answer token within data.max_length = %d (the prompt fills it) "
                "and are left out; raise data.max_length to keep them", len(enc) - len(keep), len(enc), split,
                max_length)
    return EncodedLM([enc.input_ids[i] for i in keep], [enc.labels[i] for i in keep])


class CausalLMTask(Task):
    """Instruction tuning of a causal LM: response-only loss, response perplexity, sample generations."""

    kind = "causal_lm"
    headline = "perplexity"
    higher_is_better = False

    def __init__(self, data_cfg: DataConfig, eval_cfg: EvalConfig, tokenizer, seed: int) -> None:
        train, evals = load_instruction_data(data_cfg, seed)
        self.name = data_cfg.dataset if not data_cfg.train_file else "files"
        self.tokenizer = tokenizer
        try:
            self.format = PromptFormat(tokenizer, data_cfg.prompt_format)
            self.eval_examples = evals
            self.samples, self.max_new_tokens = eval_cfg.samples, eval_cfg.max_new_tokens
            self.train = _lm_rows(_with_answers(self._encode_instructions(train, data_cfg.max_length), "training",
                                                data_cfg.max_length))
            self._eval = _with_answers(self.format.encode(evals, data_cfg.max_length), "evaluation",
                                       data_cfg.max_length)
        except PromptFormatError as exc:
            raise DataError(str(exc)) from None

    def _encode_instructions(self, examples: Sequence[Instruction], max_length: int) -> EncodedLM:
        """The prompt format's encoding of ``examples`` (through :mod:`fedtune.encode_cache` on a Flower node)."""
        if not encode_cache.is_enabled():
            return self.format.encode(examples, max_length)

        def compute() -> dict:
            enc = self.format.encode(examples, max_length)
            return {"input_ids": enc.input_ids, "labels": enc.labels}

        lists = encode_cache.cached_token_lists(
            "causal_lm", self.tokenizer, {"format": self.format.name, "max_length": max_length},
            encode_cache.inputs_digest([ex.messages() for ex in examples]), compute)
        return EncodedLM(encode_cache.token_list(lists, "input_ids"), encode_cache.token_list(lists, "labels"))

    @property
    def units(self) -> PartitionUnits:
        """The partitioning units of the training split (see :meth:`Task.units`)."""
        return PartitionUnits(len(self.train))

    def build_model(self, cfg: ModelConfig, seed: int) -> nn.Module:
        """This task's model for ``cfg`` (see :meth:`Task.build_model`)."""
        return load_model(cfg, "causal_lm", seed)

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        """This task's metrics of ``model`` on the eval split (see :meth:`Task.evaluate`)."""
        return perplexity(model, self._eval, pad_id=ctx.pad_id, batch_size=ctx.batch_size, device=ctx.device)

    def eval_inputs(self) -> EncodedDataset:
        """The encoded eval rows (see :meth:`Task.eval_inputs`)."""
        return _lm_rows(self._eval)

    def score_rows(self, model: nn.Module, rows: EncodedDataset, ctx: EvalContext) -> float:
        """Response perplexity on some training rows (a client's own; per-client and federated evaluation)."""
        data = EncodedLM(list(rows.input_ids), list(_token_labels(rows)))
        return perplexity(model, data, pad_id=ctx.pad_id, batch_size=ctx.batch_size, device=ctx.device)["perplexity"]

    @torch.inference_mode()
    def generate(self, model: nn.Module, examples: Sequence[Instruction], ctx: EvalContext) -> list[str]:
        """Greedy answers to ``examples``, generated in batches with the KV cache (:mod:`fedtune.generation`)."""
        new = generate_batches(model, self.tokenizer, [self.format.prompt_ids(ex) for ex in examples],
                               max_new_tokens=self.max_new_tokens, batch_size=8, device=ctx.device)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]

    def write_samples(self, model: nn.Module, ctx: EvalContext, path: Path, rnd: int) -> None:
        """Append generations of ``model`` after round ``rnd`` to ``path`` (see :meth:`Task.write_samples`)."""
        examples = self.eval_examples[: self.samples]
        if not examples:
            return
        texts = self.generate(model, examples, ctx)
        with path.open("a") as f:
            for e, t in zip(examples, texts, strict=True):
                f.write(json.dumps({"round": rnd, "prompt": self.format.prompt_text(e), "generation": t,
                                    "reference": e.output},
                                   ensure_ascii=False) + "\n")


class GenerativeClassificationTask(Task):
    """Classification by a causal LM: the label's name is the answer (:mod:`fedtune.tasks.label_prompts`).

    Scored by the constrained prediction (the label with the highest likelihood; the dataset's
    metric under its usual keys) and, with ``eval.generative``, by greedy answers parsed to labels
    (``gen_<metric>`` and ``gen_unparsed``, the fraction of answers that name no label, counted wrong).
    """

    kind = "generative_classification"

    def __init__(self, data: TaskData, data_cfg: DataConfig, eval_cfg: EvalConfig, tokenizer) -> None:
        if data.label_names is None:  # (a regression task)
            raise DataError(f"{data.name}: generative classification needs class labels, not a regression target")
        self.label_names: list[str] = data.label_names
        self.data, self.name = data, data.name
        self.tokenizer = tokenizer
        try:
            self.prompts = LabelPrompts(tokenizer, self.label_names, template=data_cfg.prompt_template,
                                        prompt_format=data_cfg.prompt_format, max_length=data_cfg.max_length)
        except PromptFormatError as exc:
            raise DataError(f"{data.name}: {exc}") from None
        self.metric = data.metric
        self.choice = MetricChoice.resolve(eval_cfg, data.label_names or [], metric_keys(data.metric),
                                           primary_metric(data.metric), regression=False, task=data.name)
        self.primary = self.choice.primary
        self._reports: dict[str, dict] = {}
        self.generative, self.max_new_tokens, self.samples = eval_cfg.generative, eval_cfg.max_new_tokens, eval_cfg.samples
        self.train = _lm_rows(self._encode(data.train), data.class_ids(data.train))
        self._answers: list[dict] = []
        first = next(iter(data.evals))
        self.headline = f"{first}_{self.primary}" if len(data.evals) > 1 else self.primary

    @functools.cached_property
    def _eval_prompts(self) -> dict[str, list[list[int]]]:
        """Every eval split's prompt ids, rendered at the first evaluation (a client that only trains never does)."""
        return {split: [self.prompts.prompt_ids(t, p) for t, p in self._texts(ds)] for split, ds in self.data.evals.items()}

    def meta_fields(self) -> dict:
        """The template and format in use (an empty ``data.prompt_template`` and ``auto`` resolved)."""
        return {"prompt_template": self.prompts.template, "prompt_format": self.prompts.format_name}

    @staticmethod
    def _texts(ds) -> list[tuple[str, str]]:
        return list(zip(ds.texts, ds.text_pairs or [""] * len(ds.texts), strict=True))

    def _encode(self, ds) -> EncodedLM:
        def compute() -> dict:
            rows = [self.prompts.row(t, p, label) for (t, p), label in zip(self._texts(ds), ds.labels, strict=True)]
            return {"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]}

        options = {"template": self.prompts.template, "format": self.prompts.format_name,
                   "max_length": self.prompts.max_length, "label_names": self.prompts.label_names}
        lists = encode_cache.cached_token_lists("generative_classification", self.tokenizer, options,
                                                encode_cache.inputs_digest(ds.texts, ds.text_pairs, ds.labels), compute)
        return EncodedLM(encode_cache.token_list(lists, "input_ids"), encode_cache.token_list(lists, "labels"))

    @property
    def units(self) -> PartitionUnits:
        """The partitioning units of the training split (see :meth:`Task.units`)."""
        return PartitionUnits(len(self.train), list(self.data.class_ids(self.data.train)), None, self.data.label_names)

    def build_model(self, cfg: ModelConfig, seed: int) -> nn.Module:
        """This task's model for ``cfg`` (see :meth:`Task.build_model`)."""
        return load_model(cfg, "causal_lm", seed)

    def _constrained(self, model: nn.Module, prompts: list[list[int]], ctx: EvalContext, gold: list[int],
                     report_as: str = "") -> dict[str, float]:
        """The metrics of the constrained prediction (the likeliest label's answer); its per-class report."""
        with autocast(ctx.precision, ctx.device):
            scores = score_candidate_ids(model, prompts, self.prompts.candidates, pad_id=ctx.pad_id, device=ctx.device)
        preds = scores.argmax(-1).tolist()
        m = compute_metrics(self.metric, preds, gold)
        m.update(self.choice.compute(gold, preds, num_labels=len(self.label_names),
                                     scores=scores.float().softmax(-1).cpu().numpy()))
        if report_as:
            self._reports[report_as] = per_class_report(gold, preds, self.label_names)
        return m

    def details(self) -> dict:
        """Per eval split of the latest evaluation: the constrained prediction's per-class report and confusion matrix."""
        return {"classes": self._reports} if self._reports else {}

    def score_rows(self, model: nn.Module, rows: EncodedDataset, ctx: EvalContext) -> float:
        """The dataset's metric on some training rows (a client's own), predicting as :meth:`evaluate` does.

        Each row is its prompt's tokens (fitted as trained) followed by the label's answer; the prompt
        (the tokens before the first one with a loss) is scored against every label's answer.
        """
        prompts = [ids[: next(k for k, t in enumerate(labels) if t != IGNORE_INDEX)]
                   for ids, labels in zip(rows.input_ids, _token_labels(rows), strict=True)]
        return self._constrained(model, prompts, ctx, rows.labels.tolist())[self.primary]

    def answer(self, model: nn.Module, prompts: list[list[int]], ctx: EvalContext) -> list[str]:
        """Greedy answers to prompt ids (batched, with the KV cache), as text."""
        with autocast(ctx.precision, ctx.device):
            new = generate_batches(model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                                   batch_size=min(ctx.batch_size, 32), device=ctx.device)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]

    def _generated(self, model: nn.Module, split: str, gold: list[int], ctx: EvalContext) -> dict[str, float]:
        answers = self.answer(model, self._eval_prompts[split], ctx)
        parsed = [self.prompts.parse(a) for a in answers]
        n = len(self.label_names)
        preds = [p if p is not None else (g + 1) % n for p, g in zip(parsed, gold, strict=True)]  # unparsed: wrong
        if not self._answers:
            self._answers = [{"split": split, "answer": a, "parsed": None if p is None else self.label_names[p],
                              "reference": self.label_names[g]} for a, p, g in zip(answers, parsed, gold, strict=True)]
        m = {f"gen_{k}": v for k, v in compute_metrics(self.metric, preds, gold).items()}
        m["gen_unparsed"] = sum(p is None for p in parsed) / len(parsed)
        return m

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        """This task's metrics of ``model`` on the eval split (see :meth:`Task.evaluate`)."""
        multi = len(self.data.evals) > 1
        result: dict[str, float] = {}
        self._answers, self._reports = [], {}
        for split, ds in self.data.evals.items():
            gold = list(self.data.class_ids(ds))
            m = self._constrained(model, self._eval_prompts[split], ctx, gold, report_as=split)
            if self.generative:
                m.update(self._generated(model, split, gold, ctx))
            result.update({(f"{split}_{k}" if multi else k): v for k, v in m.items()})
        return result

    def write_samples(self, model: nn.Module, ctx: EvalContext, path: Path, rnd: int) -> None:
        """The first ``eval.samples`` generated answers of the latest evaluation (``eval.generative``)."""
        answers = self._answers[: self.samples]
        if not answers:
            return
        texts = self._texts(next(iter(self.data.evals.values())))[: len(answers)]
        with path.open("a") as f:
            for (text, pair), a in zip(texts, answers, strict=True):
                f.write(json.dumps({"round": rnd, "prompt": self.prompts.prompt_text(text, pair), **a},
                                   ensure_ascii=False) + "\n")
