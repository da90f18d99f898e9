"""Personalization helpers: hold-out splits, score distributions, personal tensors."""

import pytest
import torch

from fedtune.personalization import distribution, per_client_report, split_holdout, with_personal


def test_split_holdout_disjoint_seeded_and_sized():
    shards = [list(range(0, 10)), list(range(10, 13))]
    train, test = split_holdout(shards, 0.2, seed=0)
    for s, tr, te in zip(shards, train, test):
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


def test_with_personal_and_report():
    g = {"body": torch.zeros(1), "head": torch.zeros(1)}
    p = with_personal(g, {"head": torch.ones(1)})
    assert p["head"].item() == 1.0 and p["body"] is g["body"]
    with pytest.raises(KeyError):
        with_personal(g, {"nope": torch.ones(1)})
    rep = per_client_report(["a", "b"], lambda c, params: float(params["head"]), g,
                            lambda c: with_personal(g, {"head": torch.ones(1) * (2 if c == "a" else 3)}))
    assert rep["global"]["mean"] == 0.0 and rep["personalized"]["mean"] == 2.5
    assert rep["per_client"]["b"] == {"global": 0.0, "personalized": 3.0}


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
    from fedtune.experiment import run_experiment
    from safetensors.torch import load_file

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
