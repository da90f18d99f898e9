"""A run's client shards: read from a manifest folder or made by the partitioner, written as manifests."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from fedtune.batching import EncodedDataset
from fedtune.config import Experiment
from fedtune.partition import PartitionError, partition_indices, read_manifests, write_manifests
from fedtune.tasks.task import PartitionUnits


def make_shards(exp: Experiment, units: PartitionUnits, dataset: str, out: Path) -> list[list[int]]:
    """Client shards (of the task's partitioning units) from a manifest folder, or by partitioning.

    The manifests are written to ``out/partition``.
    """
    shards = plan_shards(exp, units)
    write_shards(exp, units, dataset, out, shards)
    return shards


def plan_shards(exp: Experiment, units: PartitionUnits) -> list[list[int]]:
    """The client shards of :func:`make_shards`, without writing anything."""
    if exp.partition.manifest_dir:
        shards, _ = read_manifests(exp.partition.manifest_dir)
        n = units.count
        bad = [i for s in shards for i in s if i >= n]
        if bad:
            raise ValueError(
                f"manifest {exp.partition.manifest_dir}: index {bad[0]} is out of range for {n} training rows"
            )
    else:
        p = exp.partition
        shards = partition_indices(
            units.labels,
            p.num_clients,
            p.method,
            seed=exp.seed,
            num_rows=units.count,
            alpha=p.alpha,
            overlap=p.overlap,
            labels_per_client=p.labels_per_client,
            skew=p.skew,
            min_examples=p.min_examples,
            groups=units.groups,
        )
    empty = [f"client_{k:03d}" for k, shard in enumerate(shards) if not shard]
    if empty:  # (it would fail only when that client is first asked to train)
        raise PartitionError(f"{len(empty)} of {len(shards)} clients get no training rows ({', '.join(empty[:3])}"
                             f"{' ...' if len(empty) > 3 else ''}) from {units.count} rows: use fewer clients "
                             "(partition.num_clients) or raise partition.min_examples")
    return shards


def write_shards(exp: Experiment, units: PartitionUnits, dataset: str, out: Path, shards: list[list[int]]) -> None:
    """Write ``shards`` as the run's manifests in ``out/partition``."""
    meta = {"dataset": dataset, "method": exp.partition.method, "seed": exp.seed, "alpha": exp.partition.alpha}
    if exp.partition.manifest_dir:
        meta["source"] = str(exp.partition.manifest_dir)
    write_manifests(out / "partition", shards, units.labels, units.label_names, meta, exp.partition.manifest_format)


def data_fingerprint(rows: EncodedDataset, shards: Sequence[Sequence[int]]) -> str:
    """SHA-256 of what every client trains on: each shard's encoded rows (token ids and targets), in order.

    A checkpoint keeps it; resuming on changed files, labels or partition is then refused.
    """
    digest = hashlib.sha256()
    for k, shard in enumerate(shards):
        digest.update(f"client {k}: {len(shard)}\n".encode())
        part = rows.subset(list(shard))
        for ids in part.input_ids:
            digest.update(np.asarray(ids, dtype=np.int64).tobytes() + b";")
        digest.update(part.labels.numpy().tobytes())
        for labels in part.token_labels or []:
            digest.update(np.asarray(labels, dtype=np.int64).tobytes() + b";")
    return digest.hexdigest()


class ClientRows(Mapping[str, EncodedDataset]):
    """Each client's training rows, cut from the encoded training set when asked for.

    A population of 100,000 clients is sampled 100 at a time: cutting every client's rows up front
    took 12 s and held 100,000 small datasets; here a client's rows are cut each time it is asked for
    (its shard of indices is all that is kept). ``replace`` sets a client's rows outright (poisoned rows).
    """

    def __init__(self, train: EncodedDataset, ids: Sequence[str], shards: Sequence[Sequence[int]]) -> None:
        if len(ids) != len(shards):
            raise ValueError(f"ClientRows: {len(ids)} client ids for {len(shards)} shards")
        self._train, self._shards = train, dict(zip(ids, shards, strict=True))
        self._replaced: dict[str, EncodedDataset] = {}

    def __getitem__(self, client_id: str) -> EncodedDataset:
        if client_id in self._replaced:
            return self._replaced[client_id]
        return self._train.subset(self._shards[client_id])

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._shards  # (Mapping's own would cut the rows to find out)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shards)

    def __len__(self) -> int:
        return len(self._shards)

    def sources(self, client_ids: Sequence[str]) -> list[EncodedDataset]:
        """The datasets these clients' rows are cut from (the training set, and any replaced rows), without
        cutting them: what to ask about the kind of rows (single-label, next-token) the clients hold."""
        replaced = [self._replaced[c] for c in client_ids if c in self._replaced]
        return replaced + ([self._train] if len(replaced) < len(client_ids) else [])

    def replace(self, rows: Mapping[str, EncodedDataset]) -> None:
        """Set these clients' rows (each must be a client of the population)."""
        unknown = [c for c in rows if c not in self._shards]
        if unknown:
            raise KeyError(f"ClientRows.replace: no client {unknown[0]!r}")
        self._replaced.update(rows)


def row_sources(client_data: Mapping[str, EncodedDataset], client_ids: Sequence[str]) -> list[EncodedDataset]:
    """The datasets ``client_ids``' rows come from: :meth:`ClientRows.sources` for a :class:`ClientRows`,
    else each client's own rows."""
    if isinstance(client_data, ClientRows):
        return client_data.sources(client_ids)
    return [client_data[c] for c in client_ids]
