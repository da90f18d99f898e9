"""train.compile: the compiled training forward gives the eager updates (refusals: test_config_checks)."""

import torch

from fedtune.batching import EncodedDataset
from fedtune.client import local_train
from fedtune.compiled import training_forward
from fedtune.config import ModelConfig
from fedtune.models import get_trainable, load_classifier
from fedtune.strategies.fedprox import ProxTerm
from fedtune.types import LocalTrainConfig, RoundPlan


def test_disabled_is_the_model_itself_and_enabled_is_cached(tiny_model_dir):
    model = load_classifier(ModelConfig(name=str(tiny_model_dir), mode="lora"), 3, False, seed=0)
    assert training_forward(model, False) is model
    compiled = training_forward(model, True)
    assert compiled is not model and training_forward(model, True) is compiled
    # not registered as a submodule: parameters and state_dict are unchanged
    assert not any("_orig_mod" in n for n in model.state_dict())
    assert not any("_orig_mod" in n for n, _ in model.named_parameters())


def test_compiled_training_gives_the_eager_updates(tiny_model_dir):
    """Two rounds of two clients with mixed lengths (dynamic shapes, short last batch), FedProx on."""
    model = load_classifier(ModelConfig(name=str(tiny_model_dir), mode="lora"), 3, False, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = [[2] + torch.randint(5, 20, (int(n),), generator=g).tolist() + [3]
           for n in torch.randint(3, 14, (37,), generator=g)]
    data = EncodedDataset(ids, None, torch.randint(0, 3, (37,), generator=g))
    params = get_trainable(model)
    updates = {}
    for flag in (False, True):
        local = LocalTrainConfig(epochs=1.0, max_steps=0, lr=0.01, batch_size=8, grad_clip=1.0, compile=flag)
        plan = RoundPlan(1, params, local, ProxTerm(mu=0.1))
        updates[flag] = [local_train(model, data.subset(list(range(a, b))), plan, cid, pad_id=0, seed=s,
                                     device=torch.device("cpu"))
                         for cid, a, b, s in (("c0", 0, 20, 3), ("c1", 20, 37, 4))]
    for eager, compiled in zip(updates[False], updates[True], strict=True):
        assert eager.metrics["steps"] == compiled.metrics["steps"]
        for k in params:
            torch.testing.assert_close(compiled.delta[k], eager.delta[k], atol=2e-6, rtol=1e-4)
        assert tensors_differ_from_zero(compiled.delta)


def tensors_differ_from_zero(delta) -> bool:
    return any(float(v.abs().max()) > 0 for v in delta.values())
