"""Evaluation: length-sorted batching returns predictions in the original order."""

import torch

from fedtune.batching import EncodedDataset
from fedtune.config import ModelConfig
from fedtune.evaluation import evaluate_classifier, predict
from fedtune.models import load_classifier


def test_predictions_in_original_order(tiny_model_dir):
    model = load_classifier(ModelConfig(name=str(tiny_model_dir), mode="full"), 3, False, 0)
    g = torch.Generator().manual_seed(1)
    ids = [[2] + torch.randint(5, 20, (n,), generator=g).tolist() + [3] for n in (9, 1, 5, 3, 7, 2, 8)]
    data = EncodedDataset(ids, None, torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    cpu = torch.device("cpu")
    batched, _ = predict(model, data, batch_size=3, pad_id=0, device=cpu)
    one_by_one = torch.cat([predict(model, data.subset([i]), batch_size=1, pad_id=0, device=cpu)[0]
                            for i in range(len(data))])
    assert torch.equal(batched, one_by_one)
    m = evaluate_classifier(model, data, "accuracy", batch_size=3, pad_id=0, device=cpu)
    assert abs(m["accuracy"] - float((one_by_one == data.labels).double().mean())) < 1e-12 and m["loss"] > 0
