"""Split a training set's row indices across federated clients.

:func:`partition_indices` implements five schemes:

``iid``
    Stratified: each class's rows are shuffled and dealt round-robin, so every
    client's count of every class is within 1 of ``class_size / num_clients``.
``overlap``
    A random pool of ``round(overlap * N)`` rows is held by *every* client; the
    remaining rows are split as in ``iid``.
``label``
    Each client holds exactly ``labels_per_client`` classes; each class's rows
    are split evenly among the clients that hold it.
``dirichlet``
    Per class, the share of each client is drawn from ``Dir(alpha)`` (the scheme
    popularised by Hsu et al., 2019); small ``alpha`` gives very skewed clients.
``quantity``
    Client sizes follow a normalised ``lognormal(0, skew)``; rows are assigned
    stratified within those sizes (every class count within 1 of proportional).
``group``
    Whole groups (e.g. the articles of a QA set) per client: groups are shuffled,
    then dealt largest first to the client holding the fewest rows.
``contiguous``
    The rows in order, cut into ``num_clients`` blocks of near-equal size (client 0
    holds the first block): "the first and second half of the training set".

Every method is deterministic given ``seed``. The manifest helpers
(:mod:`fedtune.manifests`: :func:`write_manifests`, :func:`read_manifests`) store a partition as
one JSON file per client plus a ``summary.json``; they are re-exported here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedtune.manifests import (  # (re-exported: the manifest helpers are part of this API)
    PartitionError,
    _is_int,
    _require_int,
    client_ids,
    label_histogram,
    read_manifests,
    write_manifests,
)

__all__ = [
    "METHODS",
    "PartitionError",
    "client_ids",
    "label_histogram",
    "partition_indices",
    "read_manifests",
    "write_manifests",
]

#: Valid values of ``method`` for :func:`partition_indices`.
METHODS: tuple[str, ...] = ("iid", "overlap", "label", "dirichlet", "quantity", "group", "contiguous")

_DISJOINT = frozenset({"iid", "label", "dirichlet", "quantity", "group", "contiguous"})
_NEEDS_LABELS = frozenset({"label", "dirichlet"})
_DIRICHLET_MAX_TRIES = 1000


def _require_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PartitionError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise PartitionError(f"{name} must be finite, got {value}")
    return value


def _as_labels(labels: Sequence[int] | None, num_rows: int | None) -> tuple[np.ndarray | None, int]:
    """Validate ``labels``/``num_rows`` and return (int64 label array or None, N)."""
    if num_rows is not None:
        num_rows = _require_int("num_rows", num_rows, 0)
    if labels is None:
        if num_rows is None:
            raise PartitionError("num_rows is required when labels is None")
        return None, num_rows
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise PartitionError(f"labels must be a 1-D sequence of class ids, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
        raise PartitionError(
            f"labels must be integer class ids, got dtype {arr.dtype} "
            "(pass labels=None for regression or unlabeled data)"
        )
    arr = arr.astype(np.int64, copy=False)
    if num_rows is not None and num_rows != arr.size:
        raise PartitionError(f"num_rows={num_rows} does not match len(labels)={arr.size}")
    return arr, int(arr.size)


# --------------------------------------------------------------------------- #
# core helpers
# --------------------------------------------------------------------------- #


def _class_grouped(rows: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Shuffle ``rows`` and then stably group them by class (rows within a
    class stay shuffled). Without labels this is just a shuffle."""
    shuffled = rng.permutation(rows)
    if labels is None or shuffled.size == 0:
        return shuffled
    return shuffled[np.argsort(labels[shuffled], kind="stable")]


def _round_robin_owners(n: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """Owner of each position 0..n-1 when dealing round-robin over a random
    client order."""
    order = rng.permutation(num_clients)
    return order[np.arange(n) % num_clients]


def _stratified_counts(class_sizes: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer matrix ``counts[c, k]`` with row sums ``class_sizes`` and column
    sums ``sizes`` whose entries are within 1 of ``class_sizes[c] * sizes[k] / N``
    (controlled rounding: floors, then the leftover units are placed greedily in
    the columns with the largest remaining demand, which always succeeds by the
    Gale-Ryser theorem)."""
    class_sizes = np.asarray(class_sizes, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return np.zeros((class_sizes.size, sizes.size), dtype=np.int64)
    product = class_sizes[:, None] * sizes[None, :]
    counts = product // total
    remainder = product % total
    row_need = class_sizes - counts.sum(axis=1)
    col_need = sizes - counts.sum(axis=0)
    for c in range(class_sizes.size):
        need = int(row_need[c])
        if need:
            order = np.lexsort((rng.random(sizes.size), -remainder[c], -col_need))
            chosen = order[:need]
            counts[c, chosen] += 1
            col_need[chosen] -= 1
    if np.any(col_need != 0):  # pragma: no cover - impossible by construction
        raise AssertionError("stratified rounding failed")
    return counts


def _shards_from_owners(rows: np.ndarray, owners: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Group ``rows`` by ``owners`` into ``num_clients`` arrays."""
    if rows.size == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(num_clients)]
    order = np.argsort(owners, kind="stable")
    counts = np.bincount(owners, minlength=num_clients)
    return np.split(rows[order], np.cumsum(counts)[:-1])


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Split integer ``total`` proportionally to ``weights`` (largest remainder)."""
    quotas = weights / weights.sum() * total
    base = np.floor(quotas).astype(np.int64)
    rest = total - int(base.sum())
    if rest > 0:
        # stable on ties: lower index wins
        base[np.argsort(-(quotas - base), kind="stable")[:rest]] += 1
    return base


def _finish(shards: Sequence[np.ndarray] | Sequence[Sequence[int]]) -> list[list[int]]:
    return [sorted(int(i) for i in shard) for shard in shards]


# --------------------------------------------------------------------------- #
# methods
# --------------------------------------------------------------------------- #


def _iid(rows: np.ndarray, labels: np.ndarray | None, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    grouped = _class_grouped(rows, labels, rng)
    owners = _round_robin_owners(grouped.size, num_clients, rng)
    return _shards_from_owners(grouped, owners, num_clients)


def _overlap(
    n: int, labels: np.ndarray | None, num_clients: int, overlap: float, min_examples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if not 0.0 <= overlap <= 1.0:
        raise PartitionError(f"overlap: overlap must be in [0, 1], got {overlap}")
    pool_size = int(round(overlap * n))
    smallest = pool_size + (n - pool_size) // num_clients
    if smallest < min_examples:
        raise PartitionError(
            f"overlap: cannot give each of {num_clients} clients at least {min_examples} examples from "
            f"{n} rows: the smallest client would hold {smallest} (shared pool {pool_size} "
            f"+ {(n - pool_size) // num_clients} own rows)"
        )
    pool = np.sort(rng.choice(n, size=pool_size, replace=False)) if pool_size else np.empty(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[pool] = False
    parts = _iid(np.flatnonzero(mask), labels, num_clients, rng)
    return [np.concatenate([pool, part]) for part in parts]


def _label(
    labels: np.ndarray, num_clients: int, labels_per_client: int, min_examples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    classes = np.unique(labels)
    num_classes = classes.size
    if labels_per_client < 1 or labels_per_client > num_classes:
        raise PartitionError(
            f"label: labels_per_client must be between 1 and the number of classes ({num_classes}), "
            f"got {labels_per_client}"
        )
    # Greedy: each client takes the least-used classes (random tie-break). This keeps
    # class usage counts within 1 of each other, so every class is used whenever
    # num_clients * labels_per_client >= num_classes, and yields varied class sets.
    usage = np.zeros(num_classes, dtype=np.int64)
    held: list[np.ndarray] = []
    for _ in range(num_clients):
        chosen = np.lexsort((rng.random(num_classes), usage))[:labels_per_client]
        usage[chosen] += 1
        held.append(chosen)
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for client, chosen in enumerate(held):
        for c in chosen:
            holders[int(c)].append(client)

    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for ci, cls in enumerate(classes):
        owners = holders[ci]
        if not owners:
            continue
        rows = rng.permutation(np.flatnonzero(labels == cls))
        if rows.size < len(owners):
            raise PartitionError(
                f"label: class {int(cls)} has only {rows.size} rows but is assigned to {len(owners)} "
                f"clients; use fewer clients or a larger labels_per_client"
            )
        for client, part in zip(rng.permutation(owners), np.array_split(rows, len(owners)), strict=True):
            shards[int(client)].append(part)
    result = [np.concatenate(parts) if parts else np.empty(0, np.int64) for parts in shards]
    sizes = np.array([r.size for r in result])
    if sizes.min(initial=min_examples) < min_examples:
        worst = int(np.argmin(sizes))
        raise PartitionError(
            f"label: cannot give each of {num_clients} clients at least {min_examples} examples from "
            f"{labels.size} rows with labels_per_client={labels_per_client}: client {worst} would hold "
            f"{int(sizes[worst])} rows (classes {sorted(int(classes[c]) for c in held[worst])})"
        )
    return result


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_examples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if alpha <= 0:
        raise PartitionError(f"dirichlet: alpha must be > 0, got {alpha}")
    classes = np.unique(labels)
    class_sizes = np.array([int(np.sum(labels == c)) for c in classes], dtype=np.int64)
    concentration = np.full(num_clients, alpha)
    best_min = -1
    for _ in range(_DIRICHLET_MAX_TRIES):
        # counts[c, k]: rows of class c given to client k
        counts = np.empty((classes.size, num_clients), dtype=np.int64)
        for ci, n_c in enumerate(class_sizes):
            p = rng.dirichlet(concentration)
            if not np.all(np.isfinite(p)) or p.sum() <= 0:  # numerical underflow guard
                p = np.zeros(num_clients)
                p[rng.integers(num_clients)] = 1.0
            cuts = np.clip((np.cumsum(p) * n_c).astype(np.int64), 0, n_c)
            cuts[-1] = n_c
            counts[ci] = np.diff(cuts, prepend=0)
        smallest = int(counts.sum(axis=0).min()) if num_clients else 0
        best_min = max(best_min, smallest)
        if smallest >= min_examples:
            break
    else:
        raise PartitionError(
            f"dirichlet: could not give each of {num_clients} clients at least {min_examples} examples "
            f"from {labels.size} rows with alpha={alpha} in {_DIRICHLET_MAX_TRIES} draws (best draw's "
            f"smallest client had {best_min}); increase alpha, lower min_examples or use fewer clients"
        )
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for ci, cls in enumerate(classes):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        for client, part in enumerate(np.split(rows, np.cumsum(counts[ci])[:-1])):
            shards[client].append(part)
    return [np.concatenate(parts) for parts in shards]


def _quantity(
    n: int, labels: np.ndarray | None, num_clients: int, skew: float, min_examples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if skew < 0:
        raise PartitionError(f"quantity: skew must be >= 0, got {skew}")
    spare = n - num_clients * min_examples  # >= 0, checked by the caller
    if skew == 0:
        weights = np.ones(num_clients)
    else:
        weights = rng.lognormal(mean=0.0, sigma=skew, size=num_clients)
    sizes = min_examples + _apportion(spare, weights)
    if labels is None:
        labels = np.zeros(n, dtype=np.int64)
    classes = np.unique(labels)
    rows_by_class = [rng.permutation(np.flatnonzero(labels == cls)) for cls in classes]
    counts = _stratified_counts(np.array([r.size for r in rows_by_class]), sizes, rng)
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for ci, rows in enumerate(rows_by_class):
        for client, part in enumerate(np.split(rows, np.cumsum(counts[ci])[:-1])):
            shards[client].append(part)
    return [np.concatenate(parts) if parts else np.empty(0, np.int64) for parts in shards]


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #


def partition_indices(
    labels: Sequence[int] | None,
    num_clients: int,
    method: str,
    *,
    seed: int,
    num_rows: int | None = None,
    alpha: float = 0.5,
    overlap: float = 0.1,
    labels_per_client: int = 2,
    skew: float = 1.0,
    min_examples: int = 10,
    groups: Sequence[int] | None = None,
) -> list[list[int]]:
    """Split the rows ``0..N-1`` of a training set across ``num_clients`` clients.

    Args:
        labels: Integer class id of every training row, or ``None`` for
            unlabeled/regression data (then only ``iid``, ``overlap`` and
            ``quantity`` are allowed and no stratification is done).
        num_clients: Number of clients (>= 1).
        method: One of ``"iid"``, ``"overlap"``, ``"label"``, ``"dirichlet"``,
            ``"quantity"`` (see the module docstring).
        seed: Seed for ``numpy.random.default_rng``; the result is a pure
            function of the arguments.
        num_rows: Number of rows; required when ``labels`` is ``None``, must equal
            ``len(labels)`` otherwise.
        alpha: ``dirichlet`` concentration (> 0); smaller is more skewed.
        overlap: ``overlap`` fraction in ``[0, 1]`` of rows held by every client.
        labels_per_client: ``label``: number of distinct classes per client.
        skew: ``quantity``: sigma of the lognormal size weights (>= 0; 0 gives
            equal sizes). Sizes are ``min_examples`` plus a share of the
            remaining rows proportional to the lognormal weights.
        min_examples: Minimum number of rows per client.
        groups: ``group``: the group id of every row (e.g. its article).

    Returns:
        One sorted list of row indices per client. ``iid``, ``dirichlet`` and
        ``quantity`` shards are disjoint and cover every row; ``label`` shards are
        disjoint and cover every row of the classes in use (all classes whenever
        ``num_clients * labels_per_client >= num_classes``); ``overlap`` shards
        share the pool and are otherwise disjoint, together covering every row.

    Raises:
        PartitionError: On invalid arguments, or if ``min_examples`` (or, for
            ``label``, one row per class holder) cannot be satisfied.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise PartitionError(f"unknown partition method {method!r}; valid methods: {', '.join(METHODS)}")
    num_clients = _require_int("num_clients", num_clients, 1)
    min_examples = _require_int("min_examples", min_examples, 0)
    if not _is_int(seed):
        raise PartitionError(f"seed must be an integer, got {seed!r}")
    label_arr, n = _as_labels(labels, num_rows)
    if label_arr is None and method in _NEEDS_LABELS:
        raise PartitionError(
            f"{method}: needs class labels, got labels=None; use one of iid, overlap, quantity "
            "for unlabeled or regression data"
        )
    if method in _DISJOINT and num_clients * min_examples > n:
        raise PartitionError(
            f"{method}: cannot give each of {num_clients} clients at least {min_examples} examples "
            f"from {n} rows"
        )
    rng = np.random.default_rng(int(seed))

    shards: Sequence[np.ndarray] | Sequence[Sequence[int]]  # index arrays, or lists of ints
    if method == "iid":
        shards = _iid(np.arange(n), label_arr, num_clients, rng)
    elif method == "overlap":
        shards = _overlap(n, label_arr, num_clients, _require_real("overlap", overlap), min_examples, rng)
    elif method == "label":
        if not _is_int(labels_per_client):
            raise PartitionError(f"labels_per_client must be an integer, got {labels_per_client!r}")
        assert label_arr is not None
        shards = _label(label_arr, num_clients, int(labels_per_client), min_examples, rng)
    elif method == "dirichlet":
        assert label_arr is not None
        shards = _dirichlet(label_arr, num_clients, _require_real("alpha", alpha), min_examples, rng)
    elif method == "quantity":
        shards = _quantity(n, label_arr, num_clients, _require_real("skew", skew), min_examples, rng)
    elif method == "contiguous":
        shards = [list(map(int, block)) for block in np.array_split(np.arange(n), num_clients)]
    else:  # group
        shards = _group(groups, n, num_clients, rng)
    return _finish(shards)


def _group(groups: Sequence[int] | None, n: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """Whole groups per client: shuffled, then largest first to the client with the fewest rows."""
    if groups is None:
        raise PartitionError("group: needs a group id per row (this task defines no groups; qa groups by article)")
    if len(groups) != n:
        raise PartitionError(f"group: {len(groups)} group ids for {n} rows")
    members: dict[int, list[int]] = {}
    for row, g in enumerate(groups):
        members.setdefault(int(g), []).append(row)
    if len(members) < num_clients:
        raise PartitionError(f"group: {len(members)} groups cannot be split across {num_clients} clients")
    keys = list(members)
    order = [keys[i] for i in rng.permutation(len(keys))]
    order.sort(key=lambda g: -len(members[g]))  # stable: equal sizes keep the shuffled order
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for g in order:
        smallest = min(range(num_clients), key=lambda c: (len(shards[c]), c))
        shards[smallest].extend(members[g])
    return shards

