"""FedAvg and FedProx server maths and declared client objectives."""

import torch

from fedtune.strategies import FedAvg, FedProx
from fedtune.strategies.fedprox import ProxTerm
from fedtune.types import ClientUpdate


def test_fedavg_weighted_by_examples():
    s = FedAvg()
    state = s.init({"w": torch.tensor([1.0, 1.0])})
    ups = [
        ClientUpdate("a", {"w": torch.tensor([1.0, 0.0])}, 1),
        ClientUpdate("b", {"w": torch.tensor([0.0, 4.0])}, 3),
    ]
    new, metrics = s.aggregate(1, state, iter(ups))
    assert torch.allclose(new.params["w"], torch.tensor([1.25, 4.0]))
    assert new.round == 1 and metrics["clients_aggregated"] == 2.0


def test_fedavg_identical_updates_move_by_that_update():
    s = FedAvg()
    state = s.init({"w": torch.tensor([0.5])})
    ups = [ClientUpdate(c, {"w": torch.tensor([0.25])}, n) for c, n in (("a", 2), ("b", 9))]
    new, _ = s.aggregate(1, state, ups)
    assert torch.allclose(new.params["w"], torch.tensor([0.75]))


def test_init_copies_params():
    p = {"w": torch.zeros(2)}
    state = FedAvg().init(p)
    p["w"].add_(1.0)
    assert torch.equal(state.params["w"], torch.zeros(2))


def test_plans_declare_objective_as_typed_data():
    state = FedProx(mu=0.3).init({"w": torch.zeros(1)})
    plan = FedProx(mu=0.3).configure(1, state, ["a"])
    assert plan.objective == ProxTerm(mu=0.3) and plan.round == 1
    assert FedAvg().configure(1, state, ["a"]).objective is None


def test_fedprox_rejects_negative_mu():
    import pytest

    with pytest.raises(ValueError, match="mu"):
        FedProx(mu=-1.0)
