"""Tests for fedtune.partition."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.partition import (
    METHODS,
    PartitionError,
    client_ids,
    label_histogram,
    partition_indices,
    read_manifests,
    write_manifests,
)

PROPERTY = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def make_labels(n: int = 1000, num_classes: int = 10, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, num_classes, n).tolist()


LABELS = make_labels()
LABEL_METHODS = [m for m in METHODS if m not in ("group", "contiguous")]
"""Methods that need only labels and a seed (group needs group ids; contiguous ignores the seed)."""


def flat(shards):
    return [i for shard in shards for i in shard]


def class_counts(shard, labels, num_classes):
    return np.bincount(np.asarray(labels)[shard], minlength=num_classes)


@st.composite
def labelled_data(draw, min_rows=40, max_rows=400):
    num_classes = draw(st.integers(1, 6))
    n = draw(st.integers(min_rows, max_rows))
    seed = draw(st.integers(0, 2**32 - 1))
    labels = np.random.default_rng(seed).integers(0, num_classes, n).tolist()
    num_clients = draw(st.integers(1, 8))
    return labels, num_clients, draw(st.integers(0, 10_000))


# --------------------------------------------------------------------------- #
# determinism
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("method", LABEL_METHODS)
def test_same_seed_same_partition(method):
    a = partition_indices(LABELS, 10, method, seed=7)
    b = partition_indices(LABELS, 10, method, seed=7)
    assert a == b


@pytest.mark.parametrize("method", LABEL_METHODS)
def test_other_seed_other_partition(method):
    a = partition_indices(LABELS, 10, method, seed=7)
    b = partition_indices(LABELS, 10, method, seed=8)
    assert a != b


@pytest.mark.parametrize("method", LABEL_METHODS)
def test_output_is_sorted_python_ints(method):
    shards = partition_indices(LABELS, 5, method, seed=1)
    assert len(shards) == 5
    for shard in shards:
        assert shard == sorted(shard)
        assert all(type(i) is int for i in shard)


# --------------------------------------------------------------------------- #
# structural properties
# --------------------------------------------------------------------------- #


@PROPERTY
@given(labelled_data(), st.sampled_from(["iid", "dirichlet", "quantity"]))
def test_disjoint_methods_cover_all_rows_once(data, method):
    labels, k, seed = data
    shards = partition_indices(labels, k, method, seed=seed, alpha=1.0, min_examples=1)
    rows = flat(shards)
    assert len(rows) == len(set(rows))
    assert sorted(rows) == list(range(len(labels)))


@PROPERTY
@given(labelled_data())
def test_iid_histograms_match_global_within_one(data):
    labels, k, seed = data
    num_classes = max(labels) + 1
    shards = partition_indices(labels, k, "iid", seed=seed, min_examples=0)
    global_counts = np.bincount(labels, minlength=num_classes)
    for shard in shards:
        diff = class_counts(shard, labels, num_classes) - global_counts / k
        assert np.all(np.abs(diff) < 1.0)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(flat(shards)) == list(range(len(labels)))


@PROPERTY
@given(labelled_data(), st.floats(0.0, 1.0))
def test_overlap_pool_is_held_by_every_client(data, frac):
    labels, k, seed = data
    n = len(labels)
    shards = partition_indices(labels, k, "overlap", seed=seed, overlap=frac, min_examples=0)
    pool_size = round(frac * n)
    sets = [set(s) for s in shards]
    assert set().union(*sets) == set(range(n))
    if k == 1:
        assert shards == [list(range(n))]
        return
    common = set.intersection(*sets)
    assert len(common) == pool_size
    # outside the pool the parts are disjoint, iid-sized, and (with the pool) cover everything
    own = [s - common for s in sets]
    assert sum(len(o) for o in own) == len(set().union(*own)) == n - pool_size
    own_sizes = [len(o) for o in own]
    assert max(own_sizes) - min(own_sizes) <= 1


def test_overlap_pool_size_exact_and_rest_stratified():
    shards = partition_indices(LABELS, 4, "overlap", seed=3, overlap=0.25)
    common = set.intersection(*map(set, shards))
    assert len(common) == 250
    rest_labels = [LABELS[i] for i in range(1000) if i not in common]
    rest_global = np.bincount(rest_labels, minlength=10)
    for shard in shards:
        own = [i for i in shard if i not in common]
        assert np.all(np.abs(class_counts(own, LABELS, 10) - rest_global / 4) < 1.0)


@PROPERTY
@given(
    st.integers(2, 8),  # classes
    st.integers(1, 8),  # clients
    st.integers(1, 8),  # labels per client
    st.integers(0, 10_000),
)
def test_label_each_client_holds_exactly_lpc_classes(num_classes, k, lpc, seed):
    lpc = min(lpc, num_classes)
    labels = [i % num_classes for i in range(num_classes * 30)]
    shards = partition_indices(labels, k, "label", seed=seed, labels_per_client=lpc, min_examples=1)
    holders = Counter()
    for shard in shards:
        present = {labels[i] for i in shard}
        assert len(present) == lpc
        holders.update(present)
    rows = flat(shards)
    assert len(rows) == len(set(rows))
    if k * lpc >= num_classes:
        assert len(holders) == num_classes
        assert sorted(rows) == list(range(len(labels)))
    # classes spread as evenly as possible
    counts = [holders.get(c, 0) for c in range(num_classes)]
    assert max(counts) - min(counts) <= 1
    # each class split evenly among its holders
    for c in range(num_classes):
        per_holder = [sum(1 for i in s if labels[i] == c) for s in shards if any(labels[i] == c for i in s)]
        if per_holder:
            assert max(per_holder) - min(per_holder) <= 1


def test_label_assignments_vary_between_clients():
    shards = partition_indices(LABELS, 20, "label", seed=0, labels_per_client=2)
    class_sets = {frozenset(LABELS[i] for i in s) for s in shards}
    assert len(class_sets) > 5


@pytest.mark.parametrize("lpc", [0, -1, 11])
def test_label_rejects_bad_labels_per_client(lpc):
    with pytest.raises(PartitionError, match=rf"labels_per_client.*10.*got {lpc}"):
        partition_indices(LABELS, 5, "label", seed=0, labels_per_client=lpc)


def test_label_class_with_too_few_rows_for_its_holders():
    labels = [0] * 200 + [1] * 2
    with pytest.raises(PartitionError, match=r"class 1 has only 2 rows but is assigned to \d+ clients"):
        partition_indices(labels, 6, "label", seed=0, labels_per_client=1, min_examples=0)


def _mean_max_share(shards, labels):
    shares = []
    for shard in shards:
        if shard:
            counts = np.bincount(np.asarray(labels)[shard])
            shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


def test_dirichlet_small_alpha_more_skewed_than_large():
    small = partition_indices(LABELS, 10, "dirichlet", seed=0, alpha=0.05, min_examples=1)
    large = partition_indices(LABELS, 10, "dirichlet", seed=0, alpha=100.0, min_examples=1)
    s, l = _mean_max_share(small, LABELS), _mean_max_share(large, LABELS)
    assert s > 0.5
    assert l < 0.2
    assert s > l + 0.3


@PROPERTY
@given(st.integers(0, 10_000), st.sampled_from([0.1, 0.5, 2.0]))
def test_dirichlet_respects_min_examples(seed, alpha):
    shards = partition_indices(LABELS, 10, "dirichlet", seed=seed, alpha=alpha, min_examples=30)
    assert min(len(s) for s in shards) >= 30
    assert sorted(flat(shards)) == list(range(1000))


def test_dirichlet_impossible_after_retries_raises_with_numbers():
    with pytest.raises(PartitionError) as info:
        partition_indices(LABELS, 50, "dirichlet", seed=0, alpha=0.001, min_examples=15)
    msg = str(info.value)
    for part in ("dirichlet", "50 clients", "15 examples", "1000 rows", "alpha=0.001", "1000 draws"):
        assert part in msg


def test_dirichlet_rejects_nonpositive_alpha():
    with pytest.raises(PartitionError, match=r"alpha must be > 0, got 0"):
        partition_indices(LABELS, 5, "dirichlet", seed=0, alpha=0.0)


def test_quantity_sizes_unequal_with_skew():
    shards = partition_indices(LABELS, 10, "quantity", seed=0, skew=1.0)
    sizes = [len(s) for s in shards]
    assert max(sizes) > 2 * min(sizes)
    assert sum(sizes) == 1000
    assert min(sizes) >= 10


def test_quantity_more_skew_more_spread():
    def cv(skew):
        vals = []
        for seed in range(10):
            sizes = np.array([len(s) for s in partition_indices(LABELS, 10, "quantity", seed=seed, skew=skew)])
            vals.append(sizes.std() / sizes.mean())
        return np.mean(vals)

    assert cv(2.0) > cv(0.3)


@PROPERTY
@given(st.integers(1, 30), st.integers(0, 10_000))
def test_quantity_zero_skew_equal_sizes(k, seed):
    shards = partition_indices(LABELS, k, "quantity", seed=seed, skew=0.0)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(flat(shards)) == list(range(1000))


@PROPERTY
@given(labelled_data(), st.floats(0.0, 3.0))
def test_quantity_is_stratified_within_clients(data, skew):
    labels, k, seed = data
    n, num_classes = len(labels), max(labels) + 1
    shards = partition_indices(labels, k, "quantity", seed=seed, skew=skew, min_examples=2)
    global_share = np.bincount(labels, minlength=num_classes) / n
    for shard in shards:
        expected = len(shard) * global_share
        assert np.all(np.abs(class_counts(shard, labels, num_classes) - expected) <= 1.0)
    assert sorted(flat(shards)) == list(range(n))


# --------------------------------------------------------------------------- #
# min_examples
# --------------------------------------------------------------------------- #


@PROPERTY
@given(labelled_data(min_rows=100), st.sampled_from(LABEL_METHODS), st.integers(0, 10))
def test_min_examples_satisfied_or_error(data, method, min_examples):
    labels, k, seed = data
    num_classes = len(set(labels))
    lpc = min(2, num_classes)
    try:
        shards = partition_indices(
            labels, k, method, seed=seed, min_examples=min_examples, labels_per_client=lpc, alpha=1.0
        )
    except PartitionError as exc:
        assert method in ("label", "dirichlet")  # the others are always feasible here
        assert str(exc).startswith(method)
        return
    assert all(len(s) >= min_examples for s in shards)


@pytest.mark.parametrize("method", ["iid", "label", "dirichlet", "quantity"])
def test_impossible_min_examples_raises_immediately(method):
    labels = make_labels(300)
    with pytest.raises(PartitionError) as info:
        partition_indices(labels, 50, method, seed=0, min_examples=10)
    assert str(info.value) == f"{method}: cannot give each of 50 clients at least 10 examples from 300 rows"


def test_overlap_min_examples_counts_the_pool():
    labels = make_labels(300)
    # 50 clients * 10 > 300, but the shared pool of 150 rows makes it feasible
    shards = partition_indices(labels, 50, "overlap", seed=0, overlap=0.5, min_examples=10)
    assert min(len(s) for s in shards) >= 150
    with pytest.raises(PartitionError, match=r"overlap: .*50 clients.*10 examples.*300 rows.*would hold 6"):
        partition_indices(labels, 50, "overlap", seed=0, overlap=0.0, min_examples=10)


def test_label_min_examples_unreachable_raises():
    labels = [0] * 100 + [1] * 5 + [2] * 5
    with pytest.raises(PartitionError, match=r"label: .*at least 20 examples.*would hold \d+ rows"):
        partition_indices(labels, 3, "label", seed=0, labels_per_client=1, min_examples=20)


# --------------------------------------------------------------------------- #
# unlabeled data and argument validation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("method", ["iid", "quantity", "overlap"])
def test_unlabeled_methods_work(method):
    shards = partition_indices(None, 7, method, seed=1, num_rows=500, skew=1.0)
    assert len(shards) == 7
    assert set().union(*map(set, shards)) == set(range(500))
    if method != "overlap":
        assert sorted(flat(shards)) == list(range(500))
    assert shards == partition_indices(None, 7, method, seed=1, num_rows=500, skew=1.0)


@pytest.mark.parametrize("method", ["label", "dirichlet"])
def test_unlabeled_rejected_for_label_methods(method):
    with pytest.raises(PartitionError, match=rf"^{method}: needs class labels"):
        partition_indices(None, 5, method, seed=0, num_rows=500)


def test_labels_none_requires_num_rows():
    with pytest.raises(PartitionError, match="num_rows is required"):
        partition_indices(None, 5, "iid", seed=0)


def test_num_rows_must_match_labels():
    with pytest.raises(PartitionError, match=r"num_rows=999 does not match len\(labels\)=1000"):
        partition_indices(LABELS, 5, "iid", seed=0, num_rows=999)


def test_float_labels_rejected():
    with pytest.raises(PartitionError, match="integer class ids"):
        partition_indices([0.5] * 100, 2, "iid", seed=0)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(PartitionError) as info:
        partition_indices(LABELS, 5, "pathological", seed=0)
    msg = str(info.value)
    assert "'pathological'" in msg
    for m in METHODS:
        assert m in msg


@pytest.mark.parametrize("k", [0, -3])
def test_num_clients_must_be_positive(k):
    with pytest.raises(PartitionError, match=rf"num_clients must be >= 1, got {k}"):
        partition_indices(LABELS, k, "iid", seed=0)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"method": "overlap", "overlap": 1.5}, r"overlap must be in \[0, 1\], got 1.5"),
        ({"method": "quantity", "skew": -1.0}, r"skew must be >= 0, got -1.0"),
        ({"method": "iid", "min_examples": -1}, r"min_examples must be >= 0, got -1"),
    ],
)
def test_bad_parameters_rejected(kwargs, pattern):
    with pytest.raises(PartitionError, match=pattern):
        partition_indices(LABELS, 5, seed=0, **kwargs)


def test_single_client_gets_everything():
    for method in ("iid", "dirichlet", "quantity"):
        assert partition_indices(LABELS, 1, method, seed=0) == [list(range(1000))]


# --------------------------------------------------------------------------- #
# manifests
# --------------------------------------------------------------------------- #


NAMES = [f"c{i}" for i in range(10)]


def test_client_ids():
    assert client_ids(3) == ["client_000", "client_001", "client_002"]
    assert client_ids(0) == []
    assert client_ids(1001)[-1] == "client_1000"


def test_label_histogram_variants():
    labels = [0, 1, 1, 2, 2, 2]
    assert label_histogram([1, 2, 3], labels, ["a", "b", "c", "d"]) == {"a": 0, "b": 2, "c": 1, "d": 0}
    assert label_histogram([1, 2, 3], labels, None) == {"1": 2, "2": 1}
    assert label_histogram([1, 2, 3], None, ["a"]) == {}
    with pytest.raises(PartitionError, match="row index 9 out of range for 6 labels"):
        label_histogram([9], labels, None)
    with pytest.raises(PartitionError, match="class id 2 has no entry in label_names"):
        label_histogram([3], labels, ["a", "b"])


@pytest.mark.parametrize("method", ["dirichlet", "overlap"])
def test_manifest_round_trip(tmp_path, method):
    shards = partition_indices(LABELS, 6, method, seed=4)
    meta = {"method": method, "seed": 4, "alpha": 0.5, "dataset": "toy"}
    out = tmp_path / "parts" / "nested"
    write_manifests(out, shards, LABELS, NAMES, meta)

    got, summary = read_manifests(out)
    assert got == shards
    assert summary["num_clients"] == 6
    assert summary["sizes"] == [len(s) for s in shards]
    assert summary["total_rows"] == sum(len(s) for s in shards)
    assert summary["unique_rows"] == len(set(flat(shards)))
    for key, value in meta.items():
        assert summary[key] == value
    assert list(summary["label_histograms"]) == client_ids(6)
    for cid, shard in zip(client_ids(6), shards, strict=True):
        hist = summary["label_histograms"][cid]
        assert hist == label_histogram(shard, LABELS, NAMES)
        assert sum(hist.values()) == len(shard)
        record = json.loads((out / f"{cid}.json").read_text())
        assert record == {"client_id": cid, "size": len(shard), "indices": shard, "label_histogram": hist}
    assert (out / "summary.json").read_text().startswith("{\n  ")  # indent=2
    if method == "overlap":
        assert summary["unique_rows"] == 1000 < summary["total_rows"]


def test_manifest_round_trip_unlabeled(tmp_path):
    shards = partition_indices(None, 3, "iid", seed=0, num_rows=60)
    write_manifests(tmp_path, shards, None, None, {"method": "iid"})
    got, summary = read_manifests(tmp_path)
    assert got == shards
    assert summary["label_histograms"] == {cid: {} for cid in client_ids(3)}


def test_write_manifests_removes_stale_clients(tmp_path):
    write_manifests(tmp_path, partition_indices(LABELS, 5, "iid", seed=0), LABELS, None, {})
    write_manifests(tmp_path, partition_indices(LABELS, 2, "iid", seed=0), LABELS, None, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client_000.json", "client_001.json", "summary.json"]


def test_write_manifests_rejects_meta_clash_and_bad_shards(tmp_path):
    with pytest.raises(PartitionError, match="clash"):
        write_manifests(tmp_path, [[0]], None, None, {"sizes": [1]})
    with pytest.raises(PartitionError, match="shard 1.*-4"):
        write_manifests(tmp_path, [[0], [-4]], None, None, {})
    assert not (tmp_path / "summary.json").exists()


@pytest.fixture
def manifest_dir(tmp_path):
    shards = partition_indices(LABELS, 3, "iid", seed=0)
    write_manifests(tmp_path, shards, LABELS, NAMES, {"method": "iid"})
    return tmp_path


def test_read_manifests_missing_directory(tmp_path):
    with pytest.raises(PartitionError, match=r"directory .*nope does not exist"):
        read_manifests(tmp_path / "nope")


def test_read_manifests_missing_summary(manifest_dir):
    (manifest_dir / "summary.json").unlink()
    with pytest.raises(PartitionError, match=r"summary\.json is missing"):
        read_manifests(manifest_dir)


def test_read_manifests_missing_client_file_named(manifest_dir):
    (manifest_dir / "client_001.json").unlink()
    with pytest.raises(PartitionError, match=r"client_001\.json is missing"):
        read_manifests(manifest_dir)


@pytest.mark.parametrize("name", ["summary.json", "client_002.json"])
def test_read_manifests_malformed_json_named(manifest_dir, name):
    (manifest_dir / name).write_text("{not json")
    with pytest.raises(PartitionError, match=rf"{name.replace('.', '[.]')} is not valid JSON"):
        read_manifests(manifest_dir)


@pytest.mark.parametrize("bad", [[1, -2], [1, 2.5], [1, "3"], [True], "0,1", None])
def test_read_manifests_bad_indices_named(manifest_dir, bad):
    path = manifest_dir / "client_000.json"
    record = json.loads(path.read_text())
    record["indices"] = bad
    record.pop("size")
    path.write_text(json.dumps(record))
    with pytest.raises(PartitionError, match=r"client_000\.json.*indices"):
        read_manifests(manifest_dir)


def test_read_manifests_size_mismatch_and_bad_summary(manifest_dir):
    path = manifest_dir / "client_001.json"
    record = json.loads(path.read_text())
    record["size"] += 1
    path.write_text(json.dumps(record))
    with pytest.raises(PartitionError, match=r"client_001\.json says size"):
        read_manifests(manifest_dir)
    (manifest_dir / "summary.json").write_text(json.dumps({"num_clients": "three"}))
    with pytest.raises(PartitionError, match=r"summary\.json has invalid num_clients 'three'"):
        read_manifests(manifest_dir)
    (manifest_dir / "summary.json").write_text("[]")
    with pytest.raises(PartitionError, match=r"summary\.json must hold a JSON object"):
        read_manifests(manifest_dir)


def test_partition_is_stable_across_calls_with_numpy_labels():
    arr = np.asarray(LABELS, dtype=np.int32)
    assert partition_indices(arr, 4, "dirichlet", seed=2) == partition_indices(LABELS, 4, "dirichlet", seed=2)
    assert sum(len(s) for s in partition_indices(arr, 4, "iid", seed=2)) == 1000


# --------------------------------------------------------------------------- #
# group and contiguous
# --------------------------------------------------------------------------- #


def test_group_keeps_every_group_on_one_client_and_balances_rows():
    groups = [g for g in range(7) for _ in range(10 + 3 * g)]  # 7 groups of 10..28 rows
    shards = partition_indices(None, 3, "group", seed=0, num_rows=len(groups), groups=groups, min_examples=0)
    assert sorted(flat(shards)) == list(range(len(groups)))
    owner = {g: {i for i, s in enumerate(shards) for r in s if groups[r] == g} for g in set(groups)}
    assert all(len(o) == 1 for o in owner.values())
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= max(Counter(groups).values())
    again = partition_indices(None, 3, "group", seed=0, num_rows=len(groups), groups=groups, min_examples=0)
    assert again == shards


def test_group_needs_groups_and_enough_of_them():
    with pytest.raises(PartitionError, match="group: needs a group id per row"):
        partition_indices(LABELS, 2, "group", seed=0)
    with pytest.raises(PartitionError, match="group: 2 groups cannot be split across 3 clients"):
        partition_indices(None, 3, "group", seed=0, num_rows=4, groups=[0, 0, 1, 1], min_examples=0)


def test_contiguous_cuts_in_order():
    shards = partition_indices(None, 2, "contiguous", seed=5, num_rows=7, min_examples=0)
    assert shards == [[0, 1, 2, 3], [4, 5, 6]]


def test_a_client_without_rows_is_refused_before_training(tiny_experiment):
    from fedtune.experiment import run_experiment
    from fedtune.partition import PartitionError

    exp = tiny_experiment("data.train_size=6", "partition.num_clients=8", "partition.min_examples=0")
    with pytest.raises(PartitionError, match=r"clients get no training rows \(client_\d{3}.*from 6 rows: use fewer"):
        run_experiment(exp, quiet=True)
    assert not (exp.resolved_output_dir / "metrics.jsonl").exists()
