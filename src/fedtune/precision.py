"""Device and mixed-precision choices, the same code on CPU and CUDA."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from fedtune.errors import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


NATIVE_BF16_ENV = "FEDTUNE_NATIVE_BF16"
"""Environment variable that overrides the detection of native bf16 (``1`` = has it, ``0`` = has not)."""


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and why (what was detected), for ``train.precision = "auto"``.

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and later). CPU: AVX-512 BF16 or AMX tiles, asked of
    torch's own CPU-capability probes, else read from /proc/cpuinfo. ``FEDTUNE_NATIVE_BF16=0|1`` overrides.
    """
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ConfigError(f"{NATIVE_BF16_ENV} = {forced!r}: use 1 (the device computes bf16 natively) or 0")
        return forced == "1", f"{NATIVE_BF16_ENV}={forced}"
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, f"CUDA {'with' if ok else 'without'} bf16"
    if device.type == "mps":
        return False, "Apple MPS (fp32 is the safe choice there)"
    if device.type != "cpu":
        return False, f"{device.type} device"
    avx_probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx_probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if avx_probe is not None and amx_probe is not None:  # (torch's private probes, when this torch has them)
        avx, amx = avx_probe(), amx_probe()
    else:
        flags = _cpu_flags()
        avx, amx = "avx512_bf16" in flags, "amx_bf16" in flags
    found = " and ".join(n for n, on in (("AVX-512 BF16", avx), ("AMX", amx)) if on)
    return bool(avx or amx), f"CPU with {found}" if found else "CPU without AVX-512 BF16 or AMX"


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: ``auto`` becomes ``bf16`` where ``device`` has it natively, else ``fp32``."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device)[0] else "fp32"


def check_precision(precision: str, device: torch.device) -> None:
    """A ConfigError naming ``train.precision`` when ``device`` cannot run it (checked before a run starts)."""
    precision = resolve_precision(precision, device)
    if precision != "fp32" and precision not in _DTYPES:
        raise ConfigError(f"train.precision = {precision!r} is unknown (auto, fp32, bf16, fp16)")
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
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 on CUDA; None otherwise."""
    precision = resolve_precision(precision, device)
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
