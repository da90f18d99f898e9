"""Trained-model artifacts: what a saved model is (``fedtune.json``) and how to load it for inference.

Every model fedtune writes (a run's ``model/`` folder, and each export) carries ``fedtune.json``:
the task kind, the model head, label names, the sequence settings and the base model. Loading
gives an object that is called like a Hugging Face model (``model(**batch)`` returns ``logits`` or
``start_logits``/``end_logits``, and ``loss`` when labels are passed), whether it is a PyTorch model,
a peft adapter on its base, a dynamically quantized INT8 model, or an ONNX file run by onnxruntime.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.models import HEADS, ModelLoadError, resolve_model_path

META_FILE = "fedtune.json"
"""The description written next to every saved model."""
INT8_WEIGHTS = "model_int8.pt"
"""State dict of a dynamically quantized model (``torch.load(weights_only=True)`` reads it)."""
ONNX_FILE = "model.onnx"
BASE_OFFSET_FILE = "lora_base_offset.safetensors"
"""Dense corrections to the frozen base weights saved beside a fedex / flora run's adapter."""

HEAD_OF_TASK = {
    "classification": "sequence_classification",
    "multilabel": "sequence_classification",
    "qa": "question_answering",
    "causal_lm": "causal_lm",
    "generative_classification": "causal_lm",
}
"""The model head each task kind trains."""


@dataclass
class ModelMeta:
    """What a saved model is and how its inputs were made."""

    task: str
    base_model: str
    format: str = "pytorch"
    base_gguf_file: str = ""
    """The base model's ``model.gguf_file`` (a GGUF file in the folder or hub repo ``base_model``), if any."""
    """pytorch (a full model or a peft adapter), merged, int8, onnx or onnx-int8."""
    num_labels: int = 0
    problem_type: str = ""
    label_names: list[str] | None = None
    max_length: int = 128
    doc_stride: int = 128
    prompt_template: str = "{text}\nLabel:"
    """generative_classification: the prompt template the model was trained with."""
    prompt_format: str = "auto"
    """causal_lm: ``data.prompt_format`` of the run (how ``instruction`` inputs are rendered);
    generative_classification: ``chat`` or ``alpaca`` (plain), as resolved in training (older models: plain)."""
    threshold: float = 0.5
    input_names: list[str] = field(default_factory=list)
    """ONNX formats: the graph's input names, in order."""
    int8_scope: str = "all"
    """int8 format: which Linear layers are quantized (see :data:`INT8_SCOPES`)."""

    @property
    def head(self) -> str:
        """The model head (a key of :data:`fedtune.models.HEADS`)."""
        return HEAD_OF_TASK[self.task]

    def write(self, directory: Path) -> None:
        """Write ``fedtune.json`` into ``directory``."""
        (directory / META_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "ModelMeta":
        """Read ``fedtune.json`` (an error names the folder when it is missing or unreadable)."""
        path = Path(directory) / META_FILE
        if not path.is_file():
            raise ModelLoadError(f"{directory}: no {META_FILE}; not a model saved by fedtune (a run's model/ "
                                 "folder or a `fedtune export` output)")
        try:
            raw = json.loads(path.read_text())
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelLoadError(f"{path}: unreadable model description ({exc})") from None


def model_folder(path: str | Path) -> Path:
    """A model folder from a run folder (``RUN/model``), an export folder, or a model folder itself."""
    p = Path(path)
    if (p / META_FILE).is_file():
        return p
    if (p / "model" / META_FILE).is_file():
        return p / "model"
    raise ModelLoadError(f"{p}: neither a fedtune model folder nor a run folder with model/{META_FILE}")


def _auto(meta: ModelMeta):
    import transformers

    return getattr(transformers, HEADS[meta.head][0])


def _head_kwargs(meta: ModelMeta) -> dict[str, Any]:
    if meta.head != "sequence_classification":
        return {}
    return {"num_labels": meta.num_labels, "problem_type": meta.problem_type}


def load_torch_model(folder: Path, meta: ModelMeta) -> nn.Module:
    """The PyTorch model in ``folder``: a full model, a peft adapter on its base, or an INT8 state dict."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    auto = _auto(meta)
    if meta.format == "int8":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        model = quantize_int8(auto.from_config(config), meta.int8_scope)
        model.load_state_dict(torch.load(folder / INT8_WEIGHTS, weights_only=True))
        return model.eval()
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base = auto.from_pretrained(resolve_model_path(meta.base_model, meta.base_gguf_file), **_head_kwargs(meta))
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(base, folder)
        if (folder / BASE_OFFSET_FILE).is_file():
            apply_base_offset(model, folder / BASE_OFFSET_FILE)
        return model.eval()
    return auto.from_pretrained(folder).eval()


def apply_base_offset(model: nn.Module, path: Path) -> None:
    """Add a fedex / flora run's saved base-weight corrections to the adapter model's frozen weights.

    Without them the adapter alone is not the trained model (those rules fold part of the update
    into the base). A name or shape that does not match the model is a ModelLoadError naming it.
    """
    from safetensors.torch import load_file

    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(path)).items():
            if name not in named:
                raise ModelLoadError(f"{path}: base correction {name!r} matches no weight of the model")
            if tuple(named[name].shape) != tuple(value.shape):
                raise ModelLoadError(f"{path}: base correction {name!r} has shape {tuple(value.shape)}, "
                                     f"the weight has {tuple(named[name].shape)}")
            named[name].add_(value.to(named[name].dtype))


INT8_SCOPES = ("all", "attention")
"""Which Linear layers ``int8`` quantizes: every one, or only the attention projections (FFN and head fp32)."""


def int8_layers(model: nn.Module, scope: str = "all") -> list[str]:
    """Names of the Linear layers ``scope`` quantizes (see :data:`INT8_SCOPES`)."""
    if scope not in INT8_SCOPES:
        raise ValueError(f"unknown int8 scope {scope!r}; known: {', '.join(INT8_SCOPES)}")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if scope == "attention":
        names = [n for n in names if "attention" in n or n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return names


def quantize_int8(model: nn.Module, scope: str = "all") -> nn.Module:
    """Dynamic INT8 quantization (per-output-channel weight scales; activations quantized on the fly).

    ``scope`` picks the Linear layers (:func:`int8_layers`); the rest stay float32.
    """
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig

    spec = {name: per_channel_dynamic_qconfig for name in int8_layers(model, scope)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's migration notice
        return torch.ao.quantization.quantize_dynamic(model.eval(), spec, dtype=torch.qint8)


class OnnxModel:
    """An ONNX export run by onnxruntime, called like a Hugging Face model (CPU, float32 outputs)."""

    def __init__(self, path: Path, meta: ModelMeta) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.meta = meta
        self.config = SimpleNamespace(problem_type=meta.problem_type, num_labels=meta.num_labels)

    def eval(self) -> "OnnxModel":
        """No-op (an ONNX graph is always in inference mode); here so evaluation code can call it."""
        return self

    def to(self, *_args, **_kwargs) -> "OnnxModel":
        """No-op: onnxruntime runs on the CPU here."""
        return self

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        """Run the ONNX session on ``batch``; the outputs by name, like a transformers model's."""
        feed = {name: batch[name].cpu().numpy().astype("int64") for name in self.inputs}
        raw = dict(zip(self.outputs, self.session.run(None, feed), strict=True))
        out = SimpleNamespace(**{k: torch.from_numpy(v).float() for k, v in raw.items()})
        labels = batch.get("labels")
        if labels is not None and hasattr(out, "logits") and self.meta.head == "sequence_classification":
            out.loss = _classification_loss(out.logits, labels, self.meta.problem_type)
        return out


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    return F.cross_entropy(logits, labels)


def load_for_inference(path: str | Path):
    """(model, tokenizer, meta) for any fedtune model folder, run folder or export folder."""
    from transformers import AutoTokenizer

    folder = model_folder(path)
    meta = ModelMeta.read(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if meta.format in ("onnx", "onnx-int8"):
        files = sorted(folder.glob("*.onnx"))
        if not files:
            raise ModelLoadError(f"{folder}: format {meta.format} but no .onnx file")
        return OnnxModel(files[0], meta), tokenizer, meta
    return load_torch_model(folder, meta), tokenizer, meta
