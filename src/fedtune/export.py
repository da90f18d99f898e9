"""`fedtune export`: deployable forms of a trained run, each scored on the task's eval split.

Formats (each in ``OUT/<format>/`` with the tokenizer and ``fedtune.json``):

``merged``     LoRA folded into the base weights (``merge_and_unload``), a plain HF model (fp32).
``int8``       ``merged`` with its Linear layers dynamically quantized to INT8 (PyTorch, per-channel
               weight scales; ``--int8-scope attention`` keeps the feed-forward layers and head fp32).
``onnx``       ``merged`` exported to ONNX (``torch.onnx.export``, dynamo exporter), fp32.
``onnx-int8``  ``onnx`` with dynamic INT8 weight quantization by onnxruntime (per-channel, 7-bit).

The table (``export_table.md`` and ``export.json``) gives, per format: size on disk, the task's
metrics on its eval split, and latency per example (batch of one, median of ``latency_examples``
examples after one warm-up), so size, speed and accuracy are read side by side.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from fedtune.artifacts import INT8_WEIGHTS, ModelMeta, load_for_inference, load_torch_model, model_folder, quantize_int8
from fedtune.batching import collate
from fedtune.config import Experiment
from fedtune.tasks.task import EvalContext

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

FORMATS = ("merged", "int8", "onnx", "onnx-int8")
"""What `fedtune export --format` accepts."""


@dataclass
class ExportRow:
    """One line of the export table."""

    format: str
    path: str
    size_mb: float
    metrics: dict[str, float]
    latency_ms: float


def folder_size(path: Path) -> int:
    """Bytes of the model files in ``path`` (weights and graph; tokenizer and JSON files excluded)."""
    weights = (".safetensors", ".bin", ".pt", ".onnx", ".data")
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name.endswith(weights))


def merged_model(run_dir: Path) -> tuple[PreTrainedModel, ModelMeta]:
    """The run's model with any LoRA adapter folded into the base weights."""
    folder = model_folder(run_dir)
    meta = ModelMeta.read(folder)
    model = load_torch_model(folder, meta)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # type: ignore[operator]  # peft's method; nn.Module.__getattr__ is typed Tensor | Module
    # (a trained run's model, full or merged from its adapter: a plain transformers model)
    return cast("PreTrainedModel", model.eval()), meta


def _save(model: PreTrainedModel, tokenizer, meta: ModelMeta, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta.write(out)


def _example_inputs(model: nn.Module, tokenizer, meta: ModelMeta) -> dict[str, torch.Tensor]:
    text = ["an example sentence to trace the model with"] * 2  # equal rows: no padding token needed
    if meta.head == "question_answering":
        enc = tokenizer(["what is it?"] * 2, text, return_tensors="pt")
    else:
        enc = tokenizer(text, return_tensors="pt")
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in enc else [])
    return {k: enc[k] for k in names}


def export_onnx(model: PreTrainedModel, tokenizer, meta: ModelMeta, out: Path) -> Path:
    """Write ``out/model.onnx`` (batch and sequence dimensions dynamic) and its tokenizer/meta."""
    out.mkdir(parents=True, exist_ok=True)
    inputs = _example_inputs(model, tokenizer, meta)
    if meta.head == "causal_lm":
        model.config.use_cache = False
    outputs = {"question_answering": ["start_logits", "end_logits"]}.get(meta.head, ["logits"])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    path = out / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (), str(path), kwargs=inputs, input_names=list(inputs), output_names=outputs,
            dynamic_shapes={k: {0: batch, 1: seq} for k in inputs}, dynamo=True, external_data=False, verbose=False,
        )
    tokenizer.save_pretrained(out)
    replace(meta, format="onnx", input_names=list(inputs)).write(out)
    return path


def export_onnx_int8(onnx_dir: Path, out: Path) -> Path:
    """Dynamic INT8 weight quantization of an ONNX export (onnxruntime).

    Weights use 7 bits (``reduce_range``): x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake)
    multiply u8 x s8 pairs into a saturating 16-bit sum, and full-range weights overflow it (measured on
    an AVX2 machine: the tiny test model's largest logit off by 1.9 of 6.8). An export runs on whatever
    machine serves it, so it is built for all of them.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    quantize_dynamic(str(onnx_dir / "model.onnx"), str(path), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=True)
    meta = ModelMeta.read(onnx_dir)
    for f in onnx_dir.iterdir():
        if f.is_file() and not f.name.endswith((".onnx", ".data")) and f.name != "fedtune.json":
            shutil.copy(f, out / f.name)
    replace(meta, format="onnx-int8").write(out)
    return path


def export_run(run_dir: str | Path, formats: list[str], out: str | Path | None = None,
               int8_scope: str = "all") -> dict[str, Path]:
    """Write the requested formats of ``run_dir``'s model under ``out`` (``RUN/export`` by default).

    ``int8_scope`` chooses the Linear layers the PyTorch ``int8`` format quantizes.
    """
    from transformers import AutoTokenizer

    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown export format(s) {bad}; known: {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "export"
    model, meta = merged_model(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_folder(run_dir))
    written: dict[str, Path] = {}
    need_merged = {"merged", "onnx", "onnx-int8"} & set(formats)
    if need_merged:
        _save(model, tokenizer, replace(meta, format="merged"), out / "merged")
        written["merged"] = out / "merged"
    if "int8" in formats:
        q = quantize_int8(merged_model(run_dir)[0], int8_scope)
        d = out / "int8"
        d.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(d)
        torch.save(q.state_dict(), d / INT8_WEIGHTS)
        tokenizer.save_pretrained(d)
        replace(meta, format="int8", int8_scope=int8_scope).write(d)
        written["int8"] = d
    if {"onnx", "onnx-int8"} & set(formats):
        export_onnx(model, tokenizer, meta, out / "onnx")
        written["onnx"] = out / "onnx"
    if "onnx-int8" in formats:
        export_onnx_int8(out / "onnx", out / "onnx-int8")
        written["onnx-int8"] = out / "onnx-int8"
    if "merged" not in formats and "merged" in written:
        written.pop("merged")
    return written


def latency_ms(model, data, pad_id: int, examples: int = 50) -> float:
    """Median milliseconds to run one example (batch of one) over the first ``examples`` rows."""
    times = []
    n = min(examples, len(data))
    with torch.no_grad():
        for i in range(-1, n):  # one warm-up call first
            batch = collate(data, [max(i, 0)], pad_id)
            batch = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
            t0 = time.perf_counter()
            model(**batch)
            if i >= 0:
                times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def evaluate_exports(run_dir: str | Path, exported: dict[str, Path], *, baseline: bool = True,
                     latency_examples: int = 50) -> list[ExportRow]:
    """Score the run's own model (``pytorch``) and every export on the task's eval split."""
    from fedtune.tasks.registry import build_task

    run_dir = Path(run_dir)
    exp = Experiment.from_toml(run_dir / "config.toml")
    torch.set_grad_enabled(False)
    rows: list[ExportRow] = []
    candidates = ([("pytorch", model_folder(run_dir))] if baseline else []) + list(exported.items())
    task = None
    for fmt, folder in candidates:
        model, tokenizer, meta = load_for_inference(folder)
        if task is None:
            task = build_task(exp, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ctx = EvalContext(exp.eval.batch_size, pad_id, torch.device("cpu"), "fp32")
        t0 = time.perf_counter()
        metrics = task.evaluate(model, ctx)
        log.info("export %s: %s in %.1fs", fmt, metrics, time.perf_counter() - t0)
        size = folder_size(folder)
        if fmt == "pytorch" and (folder / "adapter_config.json").is_file():
            size += base_weight_bytes(model)
        rows.append(ExportRow(fmt, str(folder), size / 1e6, metrics,
                              latency_ms(model, task.eval_inputs(), pad_id, latency_examples)))
    torch.set_grad_enabled(True)
    return rows


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes of a peft model's frozen base tensors (shared storage counted once): what ships beside the adapter."""
    seen, total = set(), 0
    for name, t in model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def format_export_table(rows: list[ExportRow], headline: str | None = None) -> str:
    """A Markdown table: format, size, metrics (headline first), latency."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r.metrics if k not in keys and k != "eval_time"]
    if headline in keys:
        keys.remove(headline)
        keys.insert(0, headline)
    head = "| format | size (MB) | " + " | ".join(keys) + " | latency (ms/example) |"
    lines = [head, "|" + "---|" * (len(keys) + 3)]
    for r in rows:
        vals = " | ".join(f"{r.metrics[k]:.4f}" if k in r.metrics else "" for k in keys)
        lines.append(f"| {r.format} | {r.size_mb:.1f} | {vals} | {r.latency_ms:.1f} |")
    return "\n".join(lines) + "\n"


def write_export_report(rows: list[ExportRow], out: Path, headline: str | None = None) -> str:
    """Write ``export_table.md`` and ``export.json`` in ``out``; return the table."""
    out.mkdir(parents=True, exist_ok=True)
    table = format_export_table(rows, headline)
    (out / "export_table.md").write_text(table)
    (out / "export.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    return table
