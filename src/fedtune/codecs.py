"""Communication codecs: a TensorDict to the exact bytes sent, and back (pure: torch and the standard library).

A codec is a pipeline written as a spec string of ``+``-separated stages, in this order:

==================  =====================================================================================
``topk:F[:tensor|:global]``
                    keep the ``ceil(F * numel)`` largest-magnitude entries of every tensor (``:tensor``, the
                    default), or of the whole payload (``:global``: ``ceil(F * total)`` entries ranked across
                    all floating tensors, so large-change tensors get more of the budget and a tensor may
                    keep none); 0 < F <= 1. Sent as sorted indices (the narrowest integer type that fits)
                    plus the kept values
``fp16`` / ``bf16`` values as 16-bit floats (fp16 saturates at +-65504)
``int8[:tensor|:channel]`` / ``int16[:...]``
                    affine quantization: per tensor (default) or per channel (per row of dim 0; 1-D
                    tensors stay per tensor). Each group stores its min and scale = (max - min) / (2^b - 1)
                    in float32; ``q = round((x - min) / scale)``, so ``|x - x_hat| <= scale / 2``
``gzip[:L]`` / ``zstd[:L]``
                    lossless compression of the whole payload (level L: gzip 1-9, default 6; zstd 1-22,
                    default 3; zstd needs the ``zstandard`` package)
==================  =====================================================================================

``none`` (alone) sends float32 safetensors, byte for byte what :func:`fedtune.payload.encode_tensors`
writes. At most one value stage (``fp16``, ``bf16``, ``int8``, ``int16``) and one lossless stage;
``topk`` values are quantized per tensor (``topk`` with ``:channel`` is refused). Tensors that are
not floating point always travel unchanged. Example: ``topk:0.01+int8+gzip``.

The payload is a safetensors file (never pickle) whose ``__metadata__`` names the codec and,
where needed, each tensor's original shape and dtype, optionally compressed as a whole. Its length
is the exact number of bytes a transport sends. :func:`encode_with_feedback` adds error
feedback: the compression error of one round is kept (by the caller, per client) and added to the
next round's tensors, so nothing is lost for good, only delayed.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from fedtune.lazy_import import lazy_module
from fedtune.types import TensorDict

if TYPE_CHECKING:
    import torch
else:  # (parsing a codec spec, as every configuration check does, imports no torch)
    torch = lazy_module("torch")
payload = lazy_module("fedtune.payload")
safetensors_torch = lazy_module("safetensors.torch")

NONE = "none"
"""Spec of the identity codec: float32 safetensors."""

_QUANT = ("fp16", "bf16", "int8", "int16")
_LOSSLESS = ("gzip", "zstd")
_LEVELS = {"gzip": (1, 9, 6), "zstd": (1, 22, 3)}
_GZIP_MAGIC, _ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
_META_CODEC, _META_DTYPES, _META_SHAPES = "fedtune.codec", "fedtune.dtypes", "fedtune.shapes"
_SCALE, _MIN, _INDEX = "@scale", "@min", "@index"


class CodecError(ValueError):
    """A codec spec is malformed (names the bad part), or a payload does not match its codec."""


def exact_ceil(fraction: float, n: int) -> int:
    """``ceil(fraction * n)`` with ``fraction`` taken as the decimal it was written as.

    In binary floating point 0.07 * 100 is 7.000000000000001, whose ceiling keeps one entry too
    many; the shortest decimal of the float (``repr``: 0.07) times ``n`` is exact.
    """
    q = Fraction(repr(float(fraction))) * n
    return -(-q.numerator // q.denominator)


@dataclass(frozen=True)
class Codec:
    """A parsed codec pipeline (build with :func:`parse_codec`); ``str(codec)`` is its canonical spec."""

    topk: float = 0.0
    """Fraction of entries kept per tensor, or of the whole payload with ``topk_global`` (0 = no sparsification)."""
    topk_global: bool = False
    """Rank entries across all floating tensors of the payload instead of within each tensor."""
    quant: str = ""
    """Value stage: "", "fp16", "bf16", "int8" or "int16"."""
    per_channel: bool = False
    """int8/int16: one (min, scale) per row of dim 0 instead of per tensor."""
    lossless: str = ""
    """Lossless stage: "", "gzip" or "zstd"."""
    level: int = 0
    """Compression level of the lossless stage."""

    def __str__(self) -> str:
        parts = []
        if self.topk:
            parts.append(f"topk:{self.topk:g}" + (":global" if self.topk_global else ""))
        if self.quant:
            parts.append(self.quant + (":channel" if self.per_channel else ""))
        if self.lossless:
            parts.append(f"{self.lossless}:{self.level}")
        return "+".join(parts) or NONE

    @property
    def is_lossless(self) -> bool:
        """True when decode(encode(x)) == x bit for bit (no top-k, no value stage)."""
        return not self.topk and not self.quant

    @property
    def is_identity(self) -> bool:
        """True for ``none``: plain float32 safetensors."""
        return self.is_lossless and not self.lossless

    def encode(self, tensors: TensorDict) -> bytes:
        """The bytes sent for ``tensors`` (see the module docstring for the layout)."""
        if self.is_identity:
            return payload.save_tensors({k: v.detach().cpu() for k, v in tensors.items()})
        out: dict[str, torch.Tensor] = {}
        dtypes: dict[str, str] = {}  # original dtype of the floating tensors that are not float32
        shapes: dict[str, list[int]] = {}  # original shape of the sparsified tensors
        kept = self._global_topk(tensors) if self.topk and self.topk_global else {}
        for name, value in tensors.items():
            for suffix in (_SCALE, _MIN, _INDEX):
                if suffix in name:
                    raise CodecError(f"tensor name {name!r} contains {suffix!r}, which the codec reserves")
            value = value.detach().cpu()
            if not value.is_floating_point() or self.is_lossless or value.numel() == 0:
                out[name] = value.contiguous()
                continue
            x = value.to(torch.float32)
            if value.dtype != torch.float32:
                dtypes[name] = str(value.dtype).removeprefix("torch.")
            if self.topk:
                shapes[name] = list(value.shape)
                flat = x.flatten()
                if self.topk_global:
                    index = kept[name]
                else:
                    k = min(flat.numel(), max(1, exact_ceil(self.topk, flat.numel())))
                    index = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
                out[name + _INDEX] = index.to(_index_dtype(flat.numel()))
                x = flat[index]
                if x.numel() == 0:  # (global top-k kept nothing of this tensor: no values, no scale)
                    out[name] = x
                    continue
            out.update(self._quantize(name, x))
        metadata = {_META_CODEC: str(self)}
        for key, table in ((_META_DTYPES, dtypes), (_META_SHAPES, shapes)):
            if table:
                metadata[key] = json.dumps(table, separators=(",", ":"))
        return self._compress(payload.save_tensors(out, metadata))

    def decode(self, data: bytes) -> TensorDict:
        """Inverse of :meth:`encode` (lossy stages give back their approximation, in the original dtype).

        Names come back sorted, so sums over the tensors are reproducible.
        """
        raw = self._decompress(data)
        meta = _metadata(raw)
        got = meta.get(_META_CODEC, NONE)
        if got != str(self):
            raise CodecError(f"payload was encoded with codec {got!r}, expected {str(self)!r}")
        stored = safetensors_torch.load(raw)  # (safetensors gives the names in no fixed order: return them sorted)
        if self.is_lossless:
            return {k: stored[k] for k in sorted(stored)}
        dtypes = json.loads(meta.get(_META_DTYPES, "{}"))
        shapes = json.loads(meta.get(_META_SHAPES, "{}"))
        result: TensorDict = {}
        for name, value in sorted(stored.items()):
            if name.endswith((_SCALE, _MIN, _INDEX)):
                continue
            if not value.is_floating_point() and name + _SCALE not in stored and name + _INDEX not in stored:
                result[name] = value  # a non-floating tensor, sent as it is
                continue
            x = self._dequantize(name, value, stored)
            if name + _INDEX in stored:
                dense = torch.zeros(math.prod(shapes[name]), dtype=torch.float32)
                dense[stored[name + _INDEX].long()] = x
                x = dense.reshape(shapes[name])
            result[name] = x.to(getattr(torch, dtypes.get(name, "float32")))
        return result

    # ------------------------------------------------------------------ stages

    def _global_topk(self, tensors: TensorDict) -> dict[str, torch.Tensor]:
        """Sorted flat indices kept in each floating tensor: the ``ceil(F * total)`` largest magnitudes overall."""
        names = [n for n, v in tensors.items() if v.is_floating_point() and v.numel() > 0]
        if not names:
            return {}
        flats = [tensors[n].detach().cpu().to(torch.float32).flatten() for n in names]
        sizes = [f.numel() for f in flats]
        total = sum(sizes)
        k = min(total, max(1, exact_ceil(self.topk, total)))
        chosen = torch.topk(torch.cat(flats).abs(), k, sorted=False).indices.sort().values
        bounds = torch.tensor([0] + sizes).cumsum(0)
        return {n: chosen[(chosen >= bounds[i]) & (chosen < bounds[i + 1])] - bounds[i] for i, n in enumerate(names)}

    def _quantize(self, name: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.quant:
            return {name: x.contiguous()}
        if self.quant == "fp16":
            return {name: x.clamp(-65504.0, 65504.0).to(torch.float16)}
        if self.quant == "bf16":
            return {name: x.to(torch.bfloat16)}
        bits = 8 if self.quant == "int8" else 16
        levels = 2**bits - 1
        groups = x.reshape(x.shape[0], -1) if self.per_channel and x.dim() >= 2 else x.reshape(1, -1)
        lo = groups.min(dim=1, keepdim=True).values
        hi = groups.max(dim=1, keepdim=True).values
        scale = (hi - lo) / levels
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((groups - lo) / safe).clamp_(0, levels) - 2 ** (bits - 1)
        q = q.to(torch.int8 if bits == 8 else torch.int16).reshape(x.shape)
        return {name: q, name + _SCALE: scale.flatten(), name + _MIN: lo.flatten()}

    def _dequantize(self, name: str, value: torch.Tensor, stored: TensorDict) -> torch.Tensor:
        if self.quant in ("int8", "int16") and name + _SCALE in stored:  # (empty tensors travel as they are)
            offset = 2 ** ((8 if self.quant == "int8" else 16) - 1)
            scale, lo = stored[name + _SCALE], stored[name + _MIN]
            groups = value.reshape(scale.numel(), -1).to(torch.float32) + offset
            return (groups * scale.unsqueeze(1) + lo.unsqueeze(1)).reshape(value.shape)
        return value.to(torch.float32)

    def _compress(self, raw: bytes) -> bytes:
        if self.lossless == "gzip":
            return gzip.compress(raw, compresslevel=self.level, mtime=0)
        if self.lossless == "zstd":
            return _zstd().ZstdCompressor(level=self.level).compress(raw)
        return raw

    def _decompress(self, data: bytes) -> bytes:
        magic = {"gzip": _GZIP_MAGIC, "zstd": _ZSTD_MAGIC}.get(self.lossless)
        if magic is not None and not data.startswith(magic):
            raise CodecError(f"payload is not {self.lossless}-compressed, but codec {str(self)!r} expects it")
        try:
            if self.lossless == "gzip":
                return gzip.decompress(data)
            if self.lossless == "zstd":
                return _zstd().ZstdDecompressor().decompress(data)
        except (OSError, EOFError, ValueError) as exc:
            raise CodecError(f"payload does not decompress with {self.lossless}: {exc}") from None
        if data.startswith((_GZIP_MAGIC, _ZSTD_MAGIC)):
            raise CodecError(f"payload is compressed, but codec {str(self)!r} has no lossless stage")
        return data


def _index_dtype(numel: int) -> torch.dtype:
    if numel <= 2**8:
        return torch.uint8
    if numel <= 2**15:
        return torch.int16
    return torch.int32


def _metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors payload ({} when it has none)."""
    if len(raw) < 8:
        raise CodecError(f"payload of {len(raw)} bytes is not a safetensors file")
    (size,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8 : 8 + size])
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"payload is not a safetensors file: {exc}") from None
    return header.get("__metadata__") or {}


def _zstd():
    try:
        import zstandard
    except ImportError:  # pragma: no cover - a dependency of fedtune
        raise CodecError("codec stage 'zstd' needs the zstandard package (pip install zstandard)") from None
    return zstandard


def parse_codec(spec: str, *, downlink: bool = False) -> Codec:
    """Parse a spec such as ``"topk:0.01+int8+gzip"``; a bad spec is a CodecError naming the bad part.

    ``downlink`` refuses ``topk``: the server sends the model itself, not an update, and zeroing
    most of a model's weights is not compression.
    """
    if not isinstance(spec, str):
        raise CodecError(f"expected a string like 'int8+gzip', got {spec!r}")
    text = spec.strip().lower()
    if text in ("", NONE):
        return Codec()
    fields: dict = {}
    order = {"topk": 0, **{q: 1 for q in _QUANT}, **{c: 2 for c in _LOSSLESS}}
    last = -1
    for part in text.split("+"):
        name, _, arg = part.strip().partition(":")
        if not name:
            raise CodecError(f"empty stage in {spec!r} (stages are joined by '+')")
        if name == NONE:
            raise CodecError(f"stage 'none' cannot be combined with others in {spec!r}")
        if name not in order:
            raise CodecError(f"unknown stage {part.strip()!r} in {spec!r} (known: topk:F, {', '.join(_QUANT)}, "
                             f"{', '.join(_LOSSLESS)}; int8/int16 take :tensor or :channel)")
        if order[name] == last:
            raise CodecError(f"stage {part.strip()!r} in {spec!r}: at most one "
                             f"{['top-k', 'value (fp16/bf16/int8/int16)', 'lossless (gzip/zstd)'][last]} stage")
        if order[name] < last:
            raise CodecError(f"stage {part.strip()!r} in {spec!r} is out of order (topk, then fp16/bf16/int8/int16, "
                             "then gzip/zstd)")
        last = order[name]
        if name == "topk":
            if downlink:
                raise CodecError(f"stage {part.strip()!r} in {spec!r}: top-k is for updates (uplink), not for the "
                                 "model the server broadcasts")
            arg, _, scope = arg.partition(":")
            if scope not in ("", "tensor", "global"):
                raise CodecError(f"stage {part.strip()!r} in {spec!r}: the top-k scope is :tensor or :global")
            fields["topk_global"] = scope == "global"
            try:
                fraction = float(arg)
            except ValueError:
                raise CodecError(f"stage {part.strip()!r} in {spec!r}: topk needs a fraction, e.g. topk:0.01") from None
            if not 0.0 < fraction <= 1.0:
                raise CodecError(f"stage {part.strip()!r} in {spec!r}: the fraction must be in (0, 1]")
            fields["topk"] = fraction
        elif name in _QUANT:
            if arg and (name in ("fp16", "bf16") or arg not in ("tensor", "channel")):
                raise CodecError(f"stage {part.strip()!r} in {spec!r}: "
                                 + ("takes no argument" if name in ("fp16", "bf16") else "use :tensor or :channel"))
            if arg == "channel" and "topk" in fields:
                raise CodecError(f"stage {part.strip()!r} in {spec!r}: top-k values are one vector per tensor; "
                                 "per-channel quantization does not apply (drop ':channel')")
            fields["quant"], fields["per_channel"] = name, arg == "channel"
        else:
            low, high, default = _LEVELS[name]
            try:
                level = int(arg) if arg else default
            except ValueError:
                raise CodecError(f"stage {part.strip()!r} in {spec!r}: the level must be an integer") from None
            if not low <= level <= high:
                raise CodecError(f"stage {part.strip()!r} in {spec!r}: {name} level must be in {low}..{high}")
            if name == "zstd":
                _zstd()
            fields["lossless"], fields["level"] = name, level
    return Codec(**fields)


def encode_with_feedback(
    codec: Codec, tensors: TensorDict, residual: TensorDict | None
) -> tuple[bytes, TensorDict, TensorDict]:
    """Error feedback: encode ``tensors + residual``; return (bytes, what the receiver decodes, new residual).

    The new residual is ``(tensors + residual) - decoded``: what this round's compression dropped,
    to be added to the next round's tensors. Summed over rounds, what was sent plus the last
    residual equals what should have been sent. Non-floating tensors carry no residual.
    """
    compensated = dict(tensors)
    for k, v in tensors.items():
        if v.is_floating_point() and residual is not None and k in residual:
            compensated[k] = (v.detach().cpu().float() + residual[k].float()).to(v.dtype)
    data = codec.encode(compensated)
    decoded = codec.decode(data)
    new_residual = {k: compensated[k].detach().cpu().float() - decoded[k].float()
                    for k, v in tensors.items() if v.is_floating_point()}
    return data, decoded, new_residual
