"""Streaming divergence equals the direct RMS distance from the mean."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.divergence import Divergence


def test_by_hand():
    d = Divergence()
    d.add({"w": torch.tensor([0.0, 0.0])})
    d.add({"w": torch.tensor([2.0, 0.0])})
    # mean (1, 0); both clients at distance 1.
    assert abs(d.result() - 1.0) < 1e-12


def test_single_client_is_none():
    d = Divergence()
    d.add({"w": torch.ones(3)})
    assert d.result() is None


def test_identical_clients_zero():
    d = Divergence()
    for _ in range(4):
        d.add({"w": torch.tensor([1.5, -2.0]), "b": torch.tensor([3.0])})
    assert d.result() < 1e-9


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 7), st.integers(0, 10_000))
def test_matches_direct_formula(n, seed):
    g = torch.Generator().manual_seed(seed)
    deltas = [{"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)} for _ in range(n)]
    d = Divergence()
    for x in deltas:
        d.add(x)
    flat = torch.stack([torch.cat([x["a"].flatten(), x["b"]]) for x in deltas]).double()
    direct = math.sqrt(float((flat - flat.mean(0)).pow(2).sum(1).mean()))
    assert abs(d.result() - direct) < 1e-9
