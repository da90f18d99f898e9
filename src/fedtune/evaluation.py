"""Score a model on an encoded eval set with the task's official metric."""

from __future__ import annotations

import torch
from torch import nn

from fedtune.batching import EncodedDataset, collate
from fedtune.precision import autocast
from fedtune.tasks.metrics import compute_metrics
from fedtune.token_rows import length_order


def predict(
    model: nn.Module, data: EncodedDataset, *, batch_size: int, pad_id: int, device: torch.device, precision: str = "fp32"
) -> tuple[torch.Tensor, float]:
    """Model outputs for every example (class ids, or floats for regression) and the mean loss."""
    outputs, loss = predict_outputs(model, data, batch_size=batch_size, pad_id=pad_id, device=device,
                                    precision=precision)
    return (outputs if outputs.ndim == 1 else outputs.argmax(-1)), loss


@torch.inference_mode()
def predict_outputs(
    model: nn.Module, data: EncodedDataset, *, batch_size: int, pad_id: int, device: torch.device, precision: str = "fp32"
) -> tuple[torch.Tensor, float]:
    """Class probabilities per example (rows x classes; floats for regression, one per row) and the mean loss."""
    model.eval()
    # Batches of similar length waste little padding; results go back to the original order.
    order = length_order(data.input_ids)
    outputs, loss_sum = [], 0.0
    for start in range(0, len(order), batch_size):
        batch = collate(data, order[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(precision, device):
            out = model(**batch)
        loss_sum += float(out.loss) * len(batch["labels"])
        logits = out.logits.float()
        outputs.append(logits.squeeze(-1) if logits.shape[-1] == 1 else logits.softmax(-1))
    result = torch.empty_like(torch.cat(outputs).cpu())
    result[torch.as_tensor(order)] = torch.cat(outputs).cpu()
    return result, loss_sum / len(data)


def evaluate_classifier(
    model: nn.Module,
    data: EncodedDataset,
    metric: str,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """The official metric(s) plus the mean loss on ``data``."""
    preds, loss = predict(model, data, batch_size=batch_size, pad_id=pad_id, device=device, precision=precision)
    result = compute_metrics(metric, preds.tolist(), data.labels.tolist())
    result["loss"] = loss
    return result
