"""LoRA-aware aggregation rules: exactness on random mixed-rank adapters, fedit's gap, SVD energy."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.lora_aggregation import (
    RULES,
    LoraAccumulator,
    aggregate_lora,
    delta_weights,
    fedex,
    fedit,
    ffa,
    flora,
    lora_modules,
    other_names,
    svd,
)

MODS = ["base_model.model.enc.0.query", "base_model.model.enc.0.value"]
HEAD = "base_model.model.classifier.modules_to_save.default.weight"
OUT, IN = 7, 9


def _name(mod: str, factor: str) -> str:
    return f"{mod}.lora_{factor}.default.weight"


def make_client(rank: int, seed: int, shared_a: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    params = {}
    for mod in MODS:
        a = shared_a[mod][:rank].clone() if shared_a else 0.5 * torch.randn(rank, IN, generator=g)
        params[_name(mod, "A")] = a
        params[_name(mod, "B")] = 0.5 * torch.randn(OUT, rank, generator=g)
    params[HEAD] = torch.randn(3, OUT, generator=g)
    return params


def expected_mean(clients, weights, scalings) -> dict:
    """The weighted mean of the clients' s_i B_i A_i, computed independently of the module under test."""
    total = sum(weights)
    out = {}
    for mod in MODS:
        acc = torch.zeros(OUT, IN, dtype=torch.float64)
        for c, w, s in zip(clients, weights, scalings, strict=True):
            acc += w * s * (c[_name(mod, "B")].double() @ c[_name(mod, "A")].double())
        out[mod] = acc / total
    return out


def max_err(result, scaling, clients, weights, scalings) -> float:
    merged = result.delta(scaling)
    ref = expected_mean(clients, weights, scalings)
    return max(float((merged[m] - ref[m]).abs().max()) for m in MODS)


RANKS = [1, 2, 4, 3]
WEIGHTS = [10.0, 30.0, 5.0, 17.0]


@pytest.fixture
def mixed():
    return [make_client(r, seed=i) for i, r in enumerate(RANKS)]


def test_pairs_are_found_in_fedtune_and_peft_names_and_strays_named():
    names = [_name(MODS[0], "A"), _name(MODS[0], "B"), HEAD, "x.q.lora_A.weight", "x.q.lora_B.weight"]
    mods = lora_modules(names)
    assert [(m.name, m.a, m.b) for m in mods] == [
        (MODS[0], names[0], names[1]), ("x.q", "x.q.lora_A.weight", "x.q.lora_B.weight")]
    assert mods[0].base == MODS[0] + ".base_layer.weight"
    assert other_names(names, mods) == [HEAD]
    with pytest.raises(KeyError, match="x.k.lora_A.weight"):
        lora_modules(["x.k.lora_A.weight"])
    with pytest.raises(KeyError, match="x.v.lora_B.weight"):
        lora_modules(["x.v.lora_B.weight"])


@pytest.mark.parametrize("scalings", [None, [2.0, 0.5, 1.0, 4.0]])
@pytest.mark.parametrize("rule", ["fedex", "flora", "flora-merge", "svd"])
def test_exact_rules_reproduce_the_weighted_mean_update(mixed, rule, scalings):
    s_out = 2.0
    per_client = scalings or [s_out] * len(mixed)
    if rule == "svd":
        res = svd(mixed, WEIGHTS, rank=sum(RANKS), scaling=s_out, scalings=scalings)
        assert res.energy_kept() == pytest.approx(1.0, abs=1e-9)
    elif rule == "flora-merge":
        res = flora(mixed, WEIGHTS, merge=True, scaling=s_out, scalings=scalings)
        assert all(float(v.abs().max()) == 0 for k, v in res.params.items() if "lora_B" in k)
    else:
        res = aggregate_lora(rule, mixed, WEIGHTS, scaling=s_out, scalings=scalings)
    err = max_err(res, s_out, mixed, WEIGHTS, per_client)
    assert err < 1e-5, (rule, err)
    assert res.gap(s_out) < 1e-6
    if rule == "flora":
        assert res.params[_name(MODS[0], "A")].shape == (sum(RANKS), IN)


def test_svd_at_the_sum_of_ranks_is_exact_even_when_wider_than_needed(mixed):
    res = svd(mixed, WEIGHTS, rank=sum(RANKS) + 3, scaling=1.0)
    assert res.params[_name(MODS[1], "B")].shape == (OUT, sum(RANKS) + 3)
    assert max_err(res, 1.0, mixed, WEIGHTS, [1.0] * 4) < 1e-5


def test_ffa_is_exact_with_a_shared_frozen_a():
    g = torch.Generator().manual_seed(99)
    shared = {m: 0.5 * torch.randn(4, IN, generator=g) for m in MODS}
    clients = [make_client(r, seed=i, shared_a=shared) for i, r in enumerate(RANKS)]
    res = ffa(clients, WEIGHTS, shared_a=shared, scaling=1.5, scalings=[1.5, 3.0, 0.75, 1.5])
    assert max_err(res, 1.5, clients, WEIGHTS, [1.5, 3.0, 0.75, 1.5]) < 1e-5
    assert torch.equal(res.params[_name(MODS[0], "A")], shared[MODS[0]])
    clients[2][_name(MODS[1], "A")] += 0.1  # this client trained A: not FFA
    with pytest.raises(ValueError, match="not the shared frozen A"):
        ffa(clients, WEIGHTS, shared_a=shared)


def test_fedit_is_not_exact(mixed):
    res = fedit(mixed, WEIGHTS, scaling=1.0)
    err = max_err(res, 1.0, mixed, WEIGHTS, [1.0] * 4)
    assert err > 1e-2 and res.gap(1.0) > 0.05
    # ...but its factors are the plain (zero-padded) weighted means
    a0 = torch.zeros(4, IN)
    for c, w in zip(mixed, WEIGHTS, strict=True):
        a = c[_name(MODS[0], "A")]
        a0[: a.shape[0]] += w * a
    torch.testing.assert_close(res.params[_name(MODS[0], "A")], a0 / sum(WEIGHTS), rtol=0, atol=1e-6)


def test_fedex_adapter_is_fedit_plus_a_nonzero_residual(mixed):
    ex, it = fedex(mixed, WEIGHTS), fedit(mixed, WEIGHTS)
    for k in ex.params:
        torch.testing.assert_close(ex.params[k], it.params[k])
    assert set(ex.base_delta) == set(MODS) and not it.base_delta
    assert all(float(v.abs().max()) > 1e-3 for v in ex.base_delta.values())


def test_svd_truncation_keeps_the_top_energy_and_is_the_best_low_rank_fit(mixed):
    res = svd(mixed, WEIGHTS, rank=2)
    ref = expected_mean(mixed, WEIGHTS, [1.0] * 4)
    for m in MODS:
        s = torch.linalg.svdvals(ref[m])
        kept, total = res.energy[m]
        assert kept == pytest.approx(float(s[:2].pow(2).sum()), rel=1e-9)
        assert total == pytest.approx(float(s.pow(2).sum()), rel=1e-9)
        err = float((res.delta(1.0)[m] - ref[m]).pow(2).sum())  # Eckart-Young: error = discarded energy
        assert err == pytest.approx(total - kept, rel=1e-4)
    assert 0 < res.energy_kept() < 1 and res.energy_kept_min() <= res.energy_kept()


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_averages_the_head_by_weight(mixed, rule):
    kw = {"rank": 10} if rule == "svd" else {}
    if rule == "ffa":
        shared = {m: mixed[3][_name(m, "A")].clone() for m in MODS}
        clients = [make_client(r, seed=i, shared_a={m: shared[m] for m in MODS}) for i, r in enumerate([3, 1, 2, 3])]
        kw["shared_a"] = shared
    else:
        clients = mixed
    res = aggregate_lora(rule, clients, WEIGHTS, **kw)
    head = sum(w * c[HEAD] for c, w in zip(clients, WEIGHTS, strict=True)) / sum(WEIGHTS)
    torch.testing.assert_close(res.params[HEAD], head, rtol=0, atol=1e-6)


def test_bad_inputs_are_named(mixed):
    with pytest.raises(ValueError, match="unknown LoRA aggregation rule 'avg'"):
        LoraAccumulator("avg", scaling=1.0)
    with pytest.raises(ValueError, match="global rank"):
        LoraAccumulator("svd", scaling=1.0)
    with pytest.raises(ValueError, match="output rank 2 is below a client's rank 4"):
        fedit(mixed, WEIGHTS, rank=2)
    bad = dict(mixed[0])
    bad.pop(HEAD)
    with pytest.raises(KeyError, match="differ"):
        fedit([mixed[1], bad], [1.0, 1.0])


@settings(max_examples=25, deadline=None)
@given(ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4), seed=st.integers(0, 10_000),
       perm_seed=st.integers(0, 1000), rule=st.sampled_from(["svd", "fedex", "flora", "fedit"]))
def test_properties_permutation_invariance_and_exactness(ranks, seed, perm_seed, rule):
    clients = [make_client(r, seed=seed + i) for i, r in enumerate(ranks)]
    weights = [float(1 + (seed + 7 * i) % 13) for i in range(len(ranks))]
    kw = {"rank": sum(ranks)} if rule == "svd" else {}
    res = aggregate_lora(rule, clients, weights, **kw)
    order = torch.randperm(len(ranks), generator=torch.Generator().manual_seed(perm_seed)).tolist()
    res2 = aggregate_lora(rule, [clients[i] for i in order], [weights[i] for i in order], **kw)
    d1, d2 = res.delta(1.0), res2.delta(1.0)
    for m in MODS:
        torch.testing.assert_close(d1[m], d2[m], rtol=0, atol=1e-5)
    if rule != "fedit":
        assert max_err(res, 1.0, clients, weights, [1.0] * len(ranks)) < 1e-5


@settings(max_examples=15, deadline=None)
@given(rank=st.integers(1, 4), n=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_identical_clients_give_back_their_update_under_every_rule(rank, n, seed):
    c = make_client(rank, seed)
    target = delta_weights(c, 1.0)
    for rule in ("fedit", "fedsa", "fedex", "flora", "svd"):
        res = aggregate_lora(rule, [c] * n, [3.0] * n, rank=rank if rule == "svd" else None)
        d = res.delta(1.0)
        for m in MODS:
            torch.testing.assert_close(d[m], target[m], rtol=0, atol=1e-5)
