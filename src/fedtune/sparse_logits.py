"""Causal-LM logits only where a label is scored: no vocabulary projection of the prompt's tokens.

A causal LM's forward projects every position onto the vocabulary (SmolLM2: 49,152 words), though
instruction tuning and likelihood scoring use the answer's tokens only. For a batch of 8 x 256
tokens that is 100M logits (400 MB in fp32, as much again for the log-softmax and the gradient),
nearly all thrown away. Here the decoder body runs as usual and the output projection is applied
to the positions whose next token carries a label: the same loss (the mean over labelled tokens,
as transformers computes it) and the same log-likelihoods, with memory and time following the
answer's length instead of the whole sequence's.

Used for the architectures whose logits are exactly ``lm_head(last hidden state)``
(:data:`PLAIN_HEADS`) and only for an LM head; any other model (logit soft-capping or scaling,
mixture-of-experts auxiliary losses, an ONNX export) runs its own forward with the full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.batching import IGNORE_INDEX

PLAIN_HEADS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo", "olmo2", "gpt2",
                         "starcoder2", "stablelm", "smollm3"})
"""``config.model_type`` values whose causal-LM logits are ``lm_head(last_hidden_state)``, nothing more."""


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The decoder body and the output projection of a plain-head causal LM (through a peft wrapper)."""
    # (get_base_model / get_output_embeddings: peft and transformers methods, checked by hasattr;
    # nn.Module.__getattr__ is typed Tensor | Module)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    config = getattr(hf, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEADS or not hasattr(hf, "get_output_embeddings"):
        return None
    head = hf.get_output_embeddings()  # type: ignore[operator]
    body = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    if head is None or body is None or body is hf:
        return None
    return body, head


def labelled_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Logits of the positions that predict a labelled token, those tokens, and each one's row.

    ``labels`` are the inputs' targets (``IGNORE_INDEX`` where no loss is taken), unshifted, as
    transformers takes them. None when the model is not a plain-head causal LM.
    """
    parts = _parts(model)
    if parts is None or labels.shape != input_ids.shape:
        return None
    body, head = parts
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return head(hidden[:, :-1][keep]), targets[keep], keep.nonzero()[:, 0]


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Mean cross-entropy over the labelled tokens of ``batch`` (transformers' loss), or None if not applicable."""
    labels = batch.get("labels")
    if labels is None or labels.dtype != torch.long or set(batch) - {"input_ids", "attention_mask", "labels"}:
        return None
    out = labelled_logits(model, batch["input_ids"], batch["attention_mask"], labels)
    if out is None:
        return None
    logits, targets, _ = out
    return F.cross_entropy(logits.float(), targets)
