"""Device and mixed-precision choices, the same code on CPU and CUDA."""

from __future__ import annotations

import contextlib

import torch

from fedtune.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_precision(precision: str, device: torch.device) -> None:
    """A ConfigError naming ``train.precision`` when ``device`` cannot run it (checked before a run starts)."""
    if precision != "fp32" and precision not in _DTYPES:
        raise ConfigError(f"train.precision = {precision!r} is unknown (fp32, bf16, fp16)")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision = 'fp16' needs a CUDA device; this one is the CPU: use 'bf16' (or 'fp32')")


def check_quantization(quantization: str, device: torch.device) -> None:
    """A ConfigError naming ``model.quantization`` when this machine cannot load a quantized base (QLoRA)."""
    if quantization == "none":
        return
    if device.type != "cuda":
        raise ConfigError(f"model.quantization = {quantization!r} (QLoRA) needs a CUDA device and bitsandbytes; this "
                          "one is the CPU: use 'none' (the base in float32, or bf16 autocast with train.precision)")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization = {quantization!r} needs the bitsandbytes package "
                          "(pip install bitsandbytes)")


def quantization_kwargs(quantization: str) -> dict:
    """``from_pretrained`` arguments that load the base quantized by bitsandbytes (none for 'none')."""
    if quantization == "none":
        return {}
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def autocast(precision: str, device: torch.device):
    """Autocast context for ``precision`` (fp32 = no autocast); weights stay float32."""
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 on CUDA; None otherwise."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
