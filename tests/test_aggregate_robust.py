"""Robust aggregation rules: hand-checked values and properties (permutation invariance, identical updates)."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedtune.aggregate import (
    coordinate_median,
    krum,
    krum_scores,
    multi_krum,
    multi_krum_select,
    pairwise_sq_distances,
    trimmed_mean,
)


def td(*values):
    return {"w": torch.tensor(values, dtype=torch.float32)}


def test_median_of_three_vectors():
    out = coordinate_median([td(1, 10, -1), td(3, 0, -2), td(2, 5, 7)])
    assert torch.equal(out["w"], torch.tensor([2.0, 5.0, -1.0]))


def test_median_even_count_averages_the_middle_pair():
    out = coordinate_median([td(1.0), td(4.0), td(2.0), td(100.0)])
    assert torch.equal(out["w"], torch.tensor([3.0]))


def test_median_ignores_one_outlier():
    out = coordinate_median([td(1, 1), td(1.1, 0.9), td(0.9, 1.2), td(1e6, -1e6), td(1.05, 1.0)])
    assert torch.allclose(out["w"], torch.tensor([1.05, 1.0]))


def test_trimmed_mean_drops_the_outlier():
    items = [td(1.0), td(2.0), td(3.0), td(1000.0), td(-1000.0)]
    # beta 0.2 of 5 items: one from each end; mean of 1, 2, 3.
    assert torch.allclose(trimmed_mean(items, 0.2)["w"], torch.tensor([2.0]))
    # beta 0 is the plain mean.
    assert torch.allclose(trimmed_mean(items, 0.0)["w"], torch.tensor([6.0 / 5]))


def test_trimmed_mean_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean([td(1.0)], 0.5)


def test_pairwise_distances_hand_checked():
    d = pairwise_sq_distances([td(0, 0), td(3, 4), td(0, 1)])
    assert d.tolist() == [[0, 25, 1], [25, 0, 18], [1, 18, 0]]


def test_krum_picks_a_cluster_member_not_the_outlier():
    cluster = [td(1.0, 1.0), td(1.1, 0.9), td(0.9, 1.1), td(1.0, 1.05)]
    outlier = td(50.0, -50.0)
    items = cluster + [outlier]
    chosen = krum(items, f=1)
    assert any(torch.equal(chosen["w"], c["w"]) for c in cluster)
    # n=5, f=1: sum of the 2 nearest squared distances. By hand: (1,1) 0.0025 + 0.02, (1.1,0.9)
    # 0.02 + 0.0325, (0.9,1.1) 0.0125 + 0.02, (1,1.05) 0.0025 + 0.0125 (the best), the outlier ~9984.
    scores = krum_scores(items, f=1)
    assert scores.tolist() == pytest.approx([0.0225, 0.0525, 0.0325, 0.015, 9984.0], rel=1e-4)
    assert torch.equal(chosen["w"], cluster[3]["w"])


def test_krum_needs_enough_updates():
    with pytest.raises(ValueError, match="at least 5"):
        krum([td(1.0)] * 4, f=1)


def test_multi_krum_averages_the_best_m():
    items = [td(0.0), td(1.0), td(2.0), td(100.0), td(1.5)]
    chosen = multi_krum_select(items, f=1, m=3)
    assert sorted(chosen) == [1, 2, 4]
    assert torch.allclose(multi_krum(items, f=1, m=3)["w"], torch.tensor([1.5]))
    assert torch.equal(multi_krum(items, f=1, m=1)["w"], krum(items, f=1)["w"])


# --- properties ---------------------------------------------------------------------------

finite = st.floats(min_value=-100, max_value=100, allow_nan=False, width=32)


@st.composite
def update_sets(draw, min_n=1, max_n=7):
    n = draw(st.integers(min_n, max_n))
    size = draw(st.integers(1, 4))
    rows = draw(st.lists(st.lists(finite, min_size=size, max_size=size), min_size=n, max_size=n))
    perm = draw(st.permutations(range(n)))
    return [{"w": torch.tensor(r, dtype=torch.float32), "b": torch.tensor([r[0] * 2], dtype=torch.float32)}
            for r in rows], perm


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@settings(max_examples=60, deadline=None)
@given(update_sets(), st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.45]))
def test_median_and_trimmed_mean_are_permutation_invariant(data, beta):
    items, perm = data
    shuffled = [items[i] for i in perm]
    assert same(coordinate_median(items), coordinate_median(shuffled))
    assert same(trimmed_mean(items, beta), trimmed_mean(shuffled, beta))


@settings(max_examples=60, deadline=None)
@given(update_sets(min_n=5), st.integers(1, 3))
def test_multi_krum_is_permutation_invariant(data, m):
    items, perm = data
    f = 1
    scores = sorted(krum_scores(items, f).tolist())
    assume(scores[m] - scores[m - 1] > 1e-6 * (1 + abs(scores[m])))  # no tie at the selection boundary
    shuffled = [items[i] for i in perm]
    a, b = multi_krum(items, f, m), multi_krum(shuffled, f, m)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=1, max_size=5), st.integers(1, 7))
def test_identical_updates_give_back_that_update(row, n):
    x = {"w": torch.tensor(row, dtype=torch.float32)}
    items = [dict(x) for _ in range(n)]
    assert same(coordinate_median(items), x)
    assert torch.allclose(trimmed_mean(items, 0.3)["w"], x["w"], rtol=1e-6, atol=0)  # a mean: rounding only
    if n >= 3:
        assert same(krum(items, 0), x)
        assert torch.allclose(multi_krum(items, 0, n)["w"], x["w"])


@settings(max_examples=40, deadline=None)
@given(update_sets(min_n=3))
def test_median_lies_within_coordinate_range(data):
    items, _ = data
    med = coordinate_median(items)
    for k in med:
        stack = torch.stack([x[k] for x in items])
        assert bool((med[k] >= stack.min(0).values).all() and (med[k] <= stack.max(0).values).all())


# --- the strategies use these rules -------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3])
def test_multikrum_strategy_steps_by_aggregate_multi_krum(m):
    """MultiKrum.aggregate moves the global tensors by exactly aggregate.multi_krum of the deltas."""
    from fedtune.strategies import Krum, MultiKrum
    from fedtune.types import ClientUpdate

    g = torch.Generator().manual_seed(3)
    deltas = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(2, generator=g)} for _ in range(5)]
    deltas.append({"w": torch.full((4, 3), 40.0), "b": torch.full((2,), -40.0)})  # an outlier Krum must skip
    start = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(2, generator=g)}
    ups = [ClientUpdate(f"c{i}", d, num_examples=1 + 7 * i) for i, d in enumerate(deltas)]  # counts are ignored
    strategies = [MultiKrum(f=1, m=m)] + ([Krum(f=1)] if m == 1 else [])
    expected = multi_krum(deltas, f=1, m=m)
    assert not same(expected, multi_krum(deltas, f=1, m=len(deltas)))  # the selection matters here
    for s in strategies:
        new, metrics = s.aggregate(1, s.init(start), iter(ups))
        assert new.params.keys() == start.keys()
        assert all(torch.equal(new.params[k], start[k] + expected[k]) for k in start), type(s).__name__
        assert metrics["krum_selected"] == float(m) and metrics["clients_aggregated"] == 6.0


def test_multikrum_strategy_caps_m_at_the_number_of_updates():
    from fedtune.strategies import MultiKrum
    from fedtune.types import ClientUpdate

    deltas = [td(0.0, 1.0), td(1.0, 2.0), td(2.0, 4.0)]
    s = MultiKrum(f=0, m=10)
    new, metrics = s.aggregate(1, s.init(td(0.0, 0.0)), [ClientUpdate(str(i), d, 1) for i, d in enumerate(deltas)])
    assert torch.equal(new.params["w"], multi_krum(deltas, f=0, m=3)["w"])
    assert metrics["krum_selected"] == 3.0
