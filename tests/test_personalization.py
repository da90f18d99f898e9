"""Personalization helpers: hold-out splits, score distributions, personal tensors."""

import pytest
import torch

from fedtune.personalization import distribution, per_client_report, split_holdout
from fedtune.types import ClientScore


def test_split_holdout_disjoint_seeded_and_sized():
    shards = [list(range(0, 10)), list(range(10, 13))]
    train, test = split_holdout(shards, 0.2, seed=0)
    for s, tr, te in zip(shards, train, test, strict=True):
        assert sorted(tr + te) == s and not set(tr) & set(te) and tr and te
    assert len(test[0]) == 2 and len(test[1]) == 1
    assert split_holdout(shards, 0.2, seed=0) == (train, test)
    assert split_holdout(shards, 0.2, seed=1) != (train, test)
    with pytest.raises(ValueError, match="too few"):
        split_holdout([[1]], 0.5, seed=0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        split_holdout(shards, 1.0, seed=0)


def test_distribution_by_hand():
    d = distribution([0.9, 0.5, 0.7, 0.8, 0.6, 0.95, 0.85, 0.75, 0.65, 0.55, 0.1])
    assert d["worst"] == 0.1 and d["p10"] == 0.5  # ceil(0.1*11)=2nd smallest
    assert d["mean"] == pytest.approx(sum([0.9, 0.5, 0.7, 0.8, 0.6, 0.95, 0.85, 0.75, 0.65, 0.55, 0.1]) / 11)


def test_split_by_client_id_matches_a_single_shard():
    """A node holding one shard draws the same split as the simulation does for that client id."""
    shards = [list(range(0, 10)), list(range(10, 20))]
    train, test = split_holdout(shards, 0.3, seed=4, ids=["client_000", "client_001"])
    (alone_train,), (alone_test,) = split_holdout([shards[1]], 0.3, seed=4, ids=["client_001"])
    assert (alone_train, alone_test) == (train[1], test[1])


def test_distribution_lower_is_better():
    d = distribution([3.0, 10.0, 5.0], higher_is_better=False)  # perplexity: the worst is the largest
    assert d["worst"] == 10.0 and d["p10"] == 10.0 and d["mean"] == 6.0


def test_report_from_client_scores():
    scores = [ClientScore("b", 4, {"global": 0.0, "personalized": 3.0}),
              ClientScore("a", 2, {"global": 0.0, "personalized": 2.0})]
    rep = per_client_report(scores)
    assert rep["global"]["mean"] == 0.0 and rep["personalized"]["mean"] == 2.5
    assert rep["per_client"]["b"] == {"global": 0.0, "personalized": 3.0} and list(rep["per_client"]) == ["a", "b"]


def test_fedper_keeps_heads_local_and_reports(tiny_experiment):
    from fedtune.experiment import run_experiment

    res = run_experiment(tiny_experiment("personalization.method=fedper", "partition.method=label",
                                         "partition.labels_per_client=1", "federation.rounds=2"), quiet=True)
    rep = res.summary["personalization"]
    assert rep["method"] == "fedper" and set(rep["per_client"]) == {"client_000", "client_001", "client_002"}
    # One class per client: a client's own head learns "always my class" and beats the global head.
    assert rep["personalized"]["mean"] > rep["global"]["mean"]
    assert res.final_metrics["clients_personalized_accuracy_worst"] == rep["personalized"]["worst"]


def test_fedper_global_head_is_never_updated(tiny_experiment):
    from safetensors.torch import load_file

    from fedtune.experiment import run_experiment

    res = run_experiment(tiny_experiment("personalization.method=fedper", "federation.rounds=1"), quiet=True)
    adapter = load_file(str(res.output_dir / "model" / "adapter_model.safetensors"))
    head = [v for k, v in adapter.items() if "classifier" in k and k.endswith("weight")]
    assert head
    # The saved global head equals the seeded initial head (clients sent zero change for it).
    from fedtune.models import get_trainable, load_classifier
    init = get_trainable(load_classifier(tiny_experiment().model, 3, False, 0))
    init_head = [v for k, v in init.items() if "classifier" in k and k.endswith("weight")]
    assert torch.equal(head[0], init_head[0])


def test_finetune_personalization_reports(tiny_experiment):
    from fedtune.experiment import run_experiment

    res = run_experiment(tiny_experiment("personalization.method=finetune", "personalization.finetune_steps=3",
                                         "federation.rounds=1"), quiet=True)
    rep = res.summary["personalization"]
    assert rep["method"] == "finetune"
    assert 0.0 <= rep["personalized"]["worst"] <= rep["personalized"]["p10"] <= rep["personalized"]["mean"] <= 1.0


def test_personal_tensor_names_patterns_head_and_errors():
    from fedtune.config import ConfigError
    from fedtune.personalization import personal_tensor_names

    trainable = ["layers.0.q.lora_A", "layers.0.q.lora_B", "layers.1.q.lora_A", "layers.1.q.lora_B"]
    assert personal_tensor_names(trainable, frozenset({"classifier.w"}), []) == {"classifier.w"}
    assert personal_tensor_names(trainable, frozenset(), ["layers.1."]) == {"layers.1.q.lora_A", "layers.1.q.lora_B"}
    with pytest.raises(ConfigError, match="trains no head tensors.*personalization.personal_layers"):
        personal_tensor_names(trainable, frozenset(), [])
    with pytest.raises(ConfigError, match=r"\['layers.9.'\] match no trainable tensor"):
        personal_tensor_names(trainable, frozenset(), ["layers.9."])
    with pytest.raises(ConfigError, match="match every trainable tensor"):
        personal_tensor_names(trainable, frozenset(), ["layers."])


def test_fedper_personal_layers_stay_on_the_clients(tiny_experiment):
    """personal_layers names body tensors: the global copy never moves, the rest of the adapter does."""
    from safetensors.torch import load_file

    from fedtune.experiment import run_experiment

    exp = tiny_experiment('personalization.method="fedper"', 'personalization.personal_layers=["layer.1."]')
    result = run_experiment(exp, quiet=True)
    saved = load_file(result.output_dir / "model" / "adapter_model.safetensors")
    last = {k: v for k, v in saved.items() if "layer.1." in k and "lora_B" in k}
    first = {k: v for k, v in saved.items() if "layer.0." in k and "lora_B" in k}
    assert last and first
    assert all(float(v.abs().max()) == 0.0 for v in last.values())  # LoRA B starts at 0 and is never averaged in
    assert any(float(v.abs().max()) > 0.0 for v in first.values())  # the shared layer learned
    assert "personalization" in result.summary
