"""A run's client shards: read from a manifest folder or made by the partitioner, written as manifests."""

from __future__ import annotations

from pathlib import Path

from fedtune.config import Experiment
from fedtune.partition import partition_indices, read_manifests, write_manifests
from fedtune.tasks.task import PartitionUnits


def make_shards(exp: Experiment, units: PartitionUnits, dataset: str, out: Path) -> list[list[int]]:
    """Client shards (of the task's partitioning units) from a manifest folder, or by partitioning.

    The manifests are written to ``out/partition``.
    """
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
    meta = {"dataset": dataset, "method": exp.partition.method, "seed": exp.seed, "alpha": exp.partition.alpha}
    if exp.partition.manifest_dir:
        meta["source"] = str(exp.partition.manifest_dir)
    write_manifests(out / "partition", shards, units.labels, units.label_names, meta)
    return shards
