"""Attack injector: who attacks, what they send, and that it reaches aggregation."""

import pytest
import torch

from fedtune.attacks import Attack, attack_update, flip_labels, malicious_clients
from fedtune.batching import EncodedDataset
from fedtune.config import ConfigError
from fedtune.experiment import run_experiment
from fedtune.types import ClientUpdate

IDS = [f"client_{i:03d}" for i in range(10)]


def test_fraction_is_seeded_and_sized():
    a = malicious_clients(IDS, 0.2, [], seed=0)
    assert len(a) == 2 and a == malicious_clients(IDS, 0.2, [], seed=0)
    assert any(malicious_clients(IDS, 0.2, [], seed=s) != a for s in range(1, 6))


def test_explicit_ids_and_unknown_id():
    assert malicious_clients(IDS, 0.9, ["client_003"], seed=0) == ["client_003"]
    with pytest.raises(ValueError, match="client_999"):
        malicious_clients(IDS, 0.0, ["client_999"], seed=0)


def test_update_attacks():
    u = ClientUpdate("c", {"w": torch.tensor([1.0, -2.0])}, 5, extras={"x": {"y": torch.ones(1)}})
    assert torch.equal(attack_update(u, Attack("sign_flip", scale=3.0), 0).delta["w"], torch.tensor([-3.0, 6.0]))
    assert torch.equal(attack_update(u, Attack("scale", scale=10.0), 0).delta["w"], torch.tensor([10.0, -20.0]))
    noisy = attack_update(u, Attack("noise", noise_std=2.0), 0)
    assert noisy.delta["w"].shape == (2,) and not torch.equal(noisy.delta["w"], u.delta["w"])
    assert torch.equal(noisy.delta["w"], attack_update(u, Attack("noise", noise_std=2.0), 0).delta["w"])
    assert attack_update(u, Attack("sign_flip"), 0).num_examples == 5
    with pytest.raises(ValueError, match="unknown attack"):
        Attack("bribe")


def test_flip_labels():
    d = EncodedDataset([[1], [2], [3]], None, torch.tensor([0, 1, 3]))
    assert flip_labels(d, 4).labels.tolist() == [3, 2, 0]


def test_attack_config_needs_attackers(tiny_experiment):
    with pytest.raises(ConfigError, match="attack.fraction"):
        tiny_experiment("attack.kind=sign_flip")


def test_sign_flip_attack_hurts_fedavg(tiny_experiment, tmp_path):
    clean = run_experiment(tiny_experiment("federation.rounds=3", f'output_dir="{tmp_path / "clean"}"'), quiet=True)
    attacked = run_experiment(
        tiny_experiment("federation.rounds=3", f'output_dir="{tmp_path / "attacked"}"', "attack.kind=sign_flip",
                        'attack.clients=["client_000"]', "attack.scale=4.0"),
        quiet=True,
    )
    assert attacked.summary["attackers"] == ["client_000"]
    assert attacked.final_metrics["accuracy"] < clean.final_metrics["accuracy"] - 0.2
    assert attacked.history[-1]["divergence"] > clean.history[-1]["divergence"]
