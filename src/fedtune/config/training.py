"""``[train]``, ``[eval]``, ``[personalization]``: how clients train and how models are scored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedtune.config.schema import _help
from fedtune.errors import ConfigError


@dataclass
class TrainConfig:
    """Local training on each client."""

    epochs: float = field(default=1.0, metadata=_help("Local epochs per round."))
    max_steps: int = field(default=0, metadata=_help("Cap on local optimizer steps per round (0 = no cap)."))
    lr: float = field(default=5e-4, metadata=_help("Learning rate (AdamW); the schedule's maximum with lr_schedule."))
    lr_schedule: Literal["constant", "cosine"] = field(
        default="constant",
        metadata=_help("Learning rate across rounds: constant, or cosine from lr in round 1 to lr_min in the last "
                       "round (federation.rounds), as FlowerTune and OpenFedLLM schedule it; constant within a round."),
    )
    lr_min: float = field(default=0.0, metadata=_help("lr_schedule = cosine: the last round's learning rate."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    batch_size: int = field(default=16, metadata=_help("Local batch size."))
    grad_clip: float = field(default=1.0, metadata=_help("Max gradient norm (0 = off)."))
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto",
        metadata=_help("Autocast precision for forward/backward and evaluation; weights stay float32. auto: bf16 "
                       "where the device computes it natively (CUDA with bf16, CPUs with AVX-512 BF16 or AMX), "
                       "fp32 elsewhere; the run logs its choice and writes it to config.toml."),
    )
    optimizer: Literal["adamw", "sgd"] = field(
        default="adamw", metadata=_help("Local optimizer; sgd is what SCAFFOLD's control-variate update assumes.")
    )
    length_bucketing: bool = field(
        default=False,
        metadata=_help("Draw batches from length-sorted buckets (seeded shuffles) so dynamic padding wastes less."),
    )
    pad_multiple: int = field(
        default=8,
        metadata=_help("Round each training batch's padded width up to a multiple of this (1 = the batch's longest "
                       "row): few distinct shapes, so the CPU kernels' per-shape caches stay small (about 30% less "
                       "peak memory at no speed cost, measured); padding is masked, results change at float rounding."),
    )
    compile: bool = field(
        default=False,
        metadata=_help("torch.compile the training forward once per process (in-process simulation, one client at "
                       "a time): faster steps after a one-time compile of about a minute; needs a C++ compiler."),
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata=_help("Keep only each layer's inputs and recompute its activations in the backward pass: a "
                       "fraction of the activation memory for about 1.3-2x the step time (one client at a time)."),
    )

    def __post_init__(self) -> None:
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("train.epochs or train.max_steps must be > 0")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.pad_multiple < 1:
            raise ConfigError(f"train.pad_multiple must be >= 1 (1 = pad to the longest row), got {self.pad_multiple}")
        if not 0 <= self.lr_min <= self.lr:
            raise ConfigError(f"train.lr_min must be in [0, train.lr = {self.lr:g}], got {self.lr_min:g}")
        for name in ("weight_decay", "grad_clip", "max_steps", "epochs"):  # 0 means off; below 0 is a mistake
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0 (0 = off), got {getattr(self, name)}")


@dataclass
class EvalConfig:
    """When and how the global model is evaluated."""

    every: int = field(default=1, metadata=_help("Evaluate every N rounds (the last round always)."))
    batch_size: int = field(default=128, metadata=_help("Evaluation batch size."))
    per_client: bool = field(default=False, metadata=_help("Also evaluate on each client's own training shard."))
    federated: bool = field(default=False, metadata=_help(
        "Federated evaluation: at every evaluation each client scores the global model on its own held-out rows "
        "(personalization.holdout of its shard, never trained on); the example-weighted mean is logged."))
    initial: bool = field(default=False, metadata=_help("Also evaluate the starting model (recorded as round 0)."))
    threshold: float = field(default=0.5, metadata=_help("multilabel: a label is predicted at probability >= this."))
    tune_threshold: bool = field(
        default=False,
        metadata=_help("multilabel: choose the threshold with the best micro F1 on the first eval split, "
                       "then apply it to every split (reported as 'threshold')."),
    )
    n_best: int = field(default=20, metadata=_help("qa: start and end candidates searched per window."))
    max_answer_length: int = field(default=30, metadata=_help("qa: longest answer span in tokens."))
    samples: int = field(default=3, metadata=_help(
        "causal_lm (and generative_classification with eval.generative): prompts whose generations are written "
        "to samples.jsonl each eval."))
    max_new_tokens: int = field(default=48, metadata=_help(
        "causal_lm: tokens generated per sample; generative_classification: per answer (greedy)."))
    generative: bool = field(default=False, metadata=_help(
        "generative_classification: also answer every eval prompt greedily (up to max_new_tokens) and parse the "
        "answer to a label name: gen_<metric> and gen_unparsed (answers naming no label, counted wrong) beside "
        "the constrained metrics; the first eval.samples answers go to samples.jsonl."))
    metrics: list[str] = field(default_factory=list, metadata=_help(
        "classification and generative_classification: metrics computed at every evaluation beside the dataset's "
        "own (any of accuracy, macro_f1, micro_f1, f1, precision, recall, matthews, auroc; f1/precision/recall are "
        "of eval.positive_label, auroc needs a binary task); logged as eval_<name>."))
    positive_label: str = field(default="", metadata=_help(
        "The label (a name from the data, e.g. \"fraud\" or \"1\") that f1, precision, recall and auroc are of."))
    primary: str = field(default="", metadata=_help(
        "The headline metric: the summary's final and best_<primary> values and the report's curves (default the "
        "dataset's own, e.g. accuracy); one of eval.metrics or the dataset metric's keys."))

    def __post_init__(self) -> None:
        from fedtune.tasks.classification_metrics import POSITIVE_LABEL_METRICS, check_metric_names

        try:
            check_metric_names(self.metrics)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if len(set(self.metrics)) != len(self.metrics):
            raise ConfigError(f"eval.metrics names a metric twice: {self.metrics}")
        needs = sorted(POSITIVE_LABEL_METRICS.intersection(self.metrics))
        if needs and not self.positive_label:
            raise ConfigError(f"eval.metrics: {', '.join(needs)} (of one label) need eval.positive_label, the label's name")
        if self.every < 1:
            raise ConfigError(f"eval.every must be >= 1, got {self.every}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"eval.threshold must be in (0, 1), got {self.threshold}")
        if self.n_best < 1 or self.max_answer_length < 1:
            raise ConfigError(f"eval.n_best and eval.max_answer_length must be >= 1, got {self.n_best}, "
                              f"{self.max_answer_length}")
        if self.samples < 0 or self.max_new_tokens < 1:
            raise ConfigError(f"eval.samples must be >= 0 and eval.max_new_tokens >= 1, got {self.samples}, "
                              f"{self.max_new_tokens}")


@dataclass
class PersonalizationConfig:
    """Per-client models, scored on each client's own held-out rows."""

    method: Literal["none", "fedper", "finetune"] = field(
        default="none",
        metadata=_help("fedper: the task head stays on each client; finetune: k local steps before scoring."),
    )
    personal_layers: list[str] = field(default_factory=list, metadata=_help(
        "fedper: trainable tensors whose names contain any of these strings stay on each client (e.g. "
        "['layers.4.'] for a Llama's last block); empty = the task head (classifier, pooler, qa_outputs)."))
    holdout: float = field(default=0.2, metadata=_help("Fraction of each client's shard held out as its test set."))
    finetune_steps: int = field(default=5, metadata=_help("finetune: local steps from the global model."))

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"personalization.holdout must be in (0, 1), got {self.holdout}")
        if self.personal_layers and self.method != "fedper":
            raise ConfigError(f"personalization.personal_layers is for method = 'fedper', not {self.method!r}")
        if any(not isinstance(p, str) or not p.strip() for p in self.personal_layers):
            raise ConfigError(f"personalization.personal_layers must be non-empty strings, got {self.personal_layers}")
        if self.finetune_steps < 1:
            raise ConfigError(f"personalization.finetune_steps must be >= 1, got {self.finetune_steps}")
