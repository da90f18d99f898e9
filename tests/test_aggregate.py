"""Aggregation maths: hand-checked values and properties."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.aggregate import WeightedMean, weighted_mean


def td(*vals):
    return {"w": torch.tensor(vals, dtype=torch.float32)}


def test_weighted_mean_by_hand():
    out = weighted_mean([td(1.0, 2.0), td(3.0, 6.0)], [1.0, 3.0])
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))


def test_streaming_equals_batch():
    items = [td(float(i), float(i * i)) for i in range(5)]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    acc = WeightedMean()
    for x, w in zip(items, weights, strict=True):
        acc.add(x, w)
    assert torch.allclose(acc.result()["w"], weighted_mean(items, weights)["w"])
    assert acc.total_weight == 15.0 and acc.count == 5


def test_empty_and_bad_weight_errors():
    import pytest

    with pytest.raises(ValueError, match="no items"):
        WeightedMean().result()
    with pytest.raises(ValueError, match="weight must be > 0"):
        WeightedMean().add(td(1.0), 0.0)
    acc = WeightedMean()
    acc.add({"a": torch.zeros(1)}, 1.0)
    with pytest.raises(KeyError):
        acc.add({"b": torch.zeros(1)}, 1.0)


vectors = st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=3, max_size=3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(vectors, st.integers(1, 1000)), min_size=1, max_size=6), st.randoms())
def test_permutation_invariant(rows, rnd):
    items = [td(*v) for v, _ in rows]
    weights = [float(w) for _, w in rows]
    perm = list(range(len(rows)))
    rnd.shuffle(perm)
    a = weighted_mean(items, weights)["w"]
    b = weighted_mean([items[i] for i in perm], [weights[i] for i in perm])["w"]
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-5)


@settings(max_examples=50, deadline=None)
@given(vectors, st.lists(st.integers(1, 1000), min_size=1, max_size=6))
def test_identical_items_give_back_the_item(v, weights):
    x = td(*v)
    out = weighted_mean([x] * len(weights), [float(w) for w in weights])
    assert torch.allclose(out["w"], x["w"], atol=1e-3, rtol=1e-5)
