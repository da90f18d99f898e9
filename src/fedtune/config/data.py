"""``[data]`` and ``[partition]``: where the rows come from and how they are split into clients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedtune.config.schema import _help
from fedtune.errors import ConfigError


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
    prompt_format: Literal["auto", "chat", "alpaca"] = field(
        default="auto",
        metadata=_help("causal_lm and generative_classification: how prompts are rendered: 'chat' (the tokenizer's "
                       "chat template, loss on the assistant's tokens), 'alpaca' (base models: the Alpaca template "
                       "for instructions, the plain prompt_template for classification), 'auto' (chat when the "
                       "tokenizer has a chat template)."),
    )
    prompt_template: str = field(
        default="",
        metadata=_help("generative_classification: the prompt (chat: the user's turn); {text}, {text_pair} and "
                       "{labels} (the label names, comma-separated) are filled in; the answer is the label's name. "
                       "Empty = '{text}\\nLabel:' (plain) or '{text}\\n\\nAnswer with one of: {labels}.' (chat)."),
    )

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be >= 8, got {self.max_length}")
        if self.doc_stride < 0:
            raise ConfigError(f"data.doc_stride must be >= 0, got {self.doc_stride}")
        if self.prompt_template and "{text}" not in self.prompt_template:
            raise ConfigError(f"data.prompt_template must contain '{{text}}', got {self.prompt_template!r}")
        if self.train_size < 0 or self.eval_size < 0:
            raise ConfigError("data.train_size and data.eval_size must be >= 0")


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
    manifest_format: Literal["auto", "json", "parquet"] = field(
        default="auto",
        metadata=_help("How the run's partition/ is written: json (one client_NNN.json per client), parquet (one "
                       "clients.parquet for all), auto (json up to 1,000 clients, parquet above)."),
    )

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ConfigError(f"partition.num_clients must be >= 1, got {self.num_clients}")
        if self.alpha <= 0:
            raise ConfigError(f"partition.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.overlap <= 1.0:
            raise ConfigError(f"partition.overlap must be in [0, 1], got {self.overlap}")
