"""Causal language models as Tasks: instruction tuning and generative classification.

Instruction tuning (``data.task = "causal_lm"``): Alpaca-format rows (instruction, input, output)
from ``$FEDTUNE_DATA_DIR/code_alpaca`` (``data.dataset = "code_alpaca"``), a local JSON file
(``data.train_file``, optional ``data.eval_file``) or a hub dataset with those columns. Loss on
the response tokens only; scored by response perplexity; greedy generations for the first
``eval.samples`` eval prompts are appended to ``samples.jsonl`` at every evaluation. Without an
eval file, a seeded ``data.eval_size`` rows (200 when 0) are held out of the training rows.

Generative classification (``data.task = "generative_classification"``): a classification
dataset's text is put in ``data.prompt_template``; the model learns to continue it with
``" " + label name``; a prediction is the label whose text has the highest length-normalized
log-likelihood, scored with the dataset's official metric.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fedtune.batching import EncodedDataset
from fedtune.config import DataConfig, EvalConfig, ModelConfig
from fedtune.generation import generate_batches
from fedtune.models import load_model
from fedtune.tasks.causal_lm import IGNORE_INDEX, EncodedLM, Instruction, _ids, candidate_ids, instruction_from_row, \
    load_instructions, perplexity, score_candidate_ids, score_candidates
from fedtune.tasks.prompt_format import PromptFormat, PromptFormatError
from fedtune.tasks.data import DataError, TaskData, seeded_rng, data_dir
from fedtune.tasks.metrics import compute_metrics, primary_metric
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
            self.train = _lm_rows(_with_answers(self.format.encode(train, data_cfg.max_length), "training",
                                                data_cfg.max_length))
            self._eval = _with_answers(self.format.encode(evals, data_cfg.max_length), "evaluation",
                                       data_cfg.max_length)
        except PromptFormatError as exc:
            raise DataError(str(exc)) from None

    @property
    def units(self) -> PartitionUnits:
        return PartitionUnits(len(self.train))

    def build_model(self, cfg: ModelConfig, seed: int) -> nn.Module:
        return load_model(cfg, "causal_lm", seed)

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        return perplexity(model, self._eval, pad_id=ctx.pad_id, batch_size=ctx.batch_size, device=ctx.device)

    def eval_inputs(self) -> EncodedDataset:
        return _lm_rows(self._eval)

    def score_rows(self, model: nn.Module, rows: EncodedDataset, ctx: EvalContext) -> float:
        """Response perplexity on some training rows (a client's own; per-client and federated evaluation)."""
        data = EncodedLM(list(rows.input_ids), list(rows.token_labels))
        return perplexity(model, data, pad_id=ctx.pad_id, batch_size=ctx.batch_size, device=ctx.device)["perplexity"]

    @torch.no_grad()
    def generate(self, model: nn.Module, examples: Sequence[Instruction], ctx: EvalContext) -> list[str]:
        """Greedy answers to ``examples``, generated in batches with the KV cache (:mod:`fedtune.generation`)."""
        new = generate_batches(model, self.tokenizer, [self.format.prompt_ids(ex) for ex in examples],
                               max_new_tokens=self.max_new_tokens, batch_size=8, device=ctx.device)
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]

    def write_samples(self, model: nn.Module, ctx: EvalContext, path: Path, rnd: int) -> None:
        examples = self.eval_examples[: self.samples]
        if not examples:
            return
        texts = self.generate(model, examples, ctx)
        with path.open("a") as f:
            for e, t in zip(examples, texts):
                f.write(json.dumps({"round": rnd, "prompt": self.format.prompt_text(e), "generation": t,
                                    "reference": e.output},
                                   ensure_ascii=False) + "\n")


class GenerativeClassificationTask(Task):
    """Classification by a causal LM: the label's name is the target text; prediction by log-likelihood."""

    kind = "generative_classification"

    def __init__(self, data: TaskData, data_cfg: DataConfig, tokenizer) -> None:
        if data.is_regression:
            raise DataError(f"{data.name}: generative classification needs class labels, not a regression target")
        self.data, self.name = data, data.name
        self.tokenizer, self.template = tokenizer, data_cfg.prompt_template
        self.metric = data.metric
        self.candidates = [" " + n for n in data.label_names]
        self.primary = primary_metric(data.metric)
        self.train = _lm_rows(self._encode(data.train, data_cfg.max_length), data.train.labels)
        first = next(iter(data.evals))
        self.headline = f"{first}_{self.primary}" if len(data.evals) > 1 else self.primary

    def prompts(self, ds) -> list[str]:
        """The filled-in prompt of every row."""
        pairs = ds.text_pairs or [""] * len(ds.texts)
        return [self.template.format(text=t, text_pair=p) for t, p in zip(ds.texts, pairs)]

    def _encode(self, ds, max_length: int) -> EncodedLM:
        tok = self.tokenizer
        ids_all, labels_all = [], []
        for prompt, label in zip(self.prompts(ds), ds.labels):
            target = _ids(tok, self.candidates[label], bos=False) + [tok.eos_token_id]
            p = _ids(tok, prompt, bos=True)[: max(1, max_length - len(target))]  # keep the whole label
            ids_all.append(p + target)
            labels_all.append([-100] * len(p) + target)
        return EncodedLM(ids_all, labels_all)

    @property
    def units(self) -> PartitionUnits:
        return PartitionUnits(len(self.train), list(self.data.train.labels), None, self.data.label_names)

    def build_model(self, cfg: ModelConfig, seed: int) -> nn.Module:
        return load_model(cfg, "causal_lm", seed)

    def score_rows(self, model: nn.Module, rows: EncodedDataset, ctx: EvalContext) -> float:
        """The dataset's metric on some training rows (a client's own), predicting as :meth:`evaluate` does.

        Each row is its prompt's tokens (truncated as trained) followed by the label's; the prompt part
        (tokens without a loss) is scored against every label text, and the best normalized log-likelihood is the guess.
        """
        prompts = [ids[: sum(1 for t in labels if t == IGNORE_INDEX)] for ids, labels in
                   zip(rows.input_ids, rows.token_labels)]
        scores = score_candidate_ids(model, prompts, candidate_ids(self.tokenizer, self.candidates),
                                     pad_id=ctx.pad_id, device=ctx.device)
        return compute_metrics(self.metric, scores.argmax(-1).tolist(), rows.labels.tolist())[self.primary]

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        multi = len(self.data.evals) > 1
        result: dict[str, float] = {}
        for split, ds in self.data.evals.items():
            scores = score_candidates(model, self.tokenizer, self.prompts(ds), self.candidates, device=ctx.device)
            preds = scores.argmax(-1).tolist()
            m = compute_metrics(self.metric, preds, list(ds.labels))
            result.update({(f"{split}_{k}" if multi else k): v for k, v in m.items()})
        return result

