"""Partition manifests as one Parquet table: written, read back, one client's row, and what a node reads."""

from __future__ import annotations

import json

import pytest

from fedtune import manifests
from fedtune.errors import NodeConfigError
from fedtune.experiment import run_experiment
from fedtune.manifests import PARQUET_FILE, client_manifest, manifest_format, read_manifests, write_manifests
from fedtune.partition import PartitionError
from fedtune.runtime.flower.node import NodeData, _manifest

SHARDS = [[0, 3, 5], [1, 2], [4, 6, 7, 8]]
LABELS = [0, 1, 1, 0, 2, 2, 0, 1, 2]
NAMES = ["a", "b", "c"]


def test_parquet_holds_what_json_holds(tmp_path):
    write_manifests(tmp_path / "j", SHARDS, LABELS, NAMES, {"seed": 3}, "json")
    write_manifests(tmp_path / "p", SHARDS, LABELS, NAMES, {"seed": 3}, "parquet")
    (js, jsum), (ps, psum) = read_manifests(tmp_path / "j"), read_manifests(tmp_path / "p")
    assert js == ps == SHARDS
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [PARQUET_FILE, "summary.json"]
    assert psum["format"] == "parquet" and "sizes" not in psum and psum["seed"] == 3 and psum["num_clients"] == 3
    for cid in ("client_000", "client_002"):  # one client's row: the JSON manifest's record
        assert client_manifest(tmp_path / "p" / PARQUET_FILE, cid) == client_manifest(tmp_path / "j" / f"{cid}.json")
    assert client_manifest(tmp_path / "p", "client_001")["label_histogram"] == jsum["label_histograms"]["client_001"]


def test_auto_switches_above_the_limit_and_cleans_the_other_format(tmp_path, monkeypatch):
    assert manifest_format("auto", 1000) == "json" and manifest_format("auto", 1001) == "parquet"
    with pytest.raises(PartitionError, match="manifest_format = 'xml'"):
        manifest_format("xml", 3)
    write_manifests(tmp_path, SHARDS, LABELS, NAMES, {}, "auto")
    assert (tmp_path / "client_000.json").is_file()
    monkeypatch.setattr(manifests, "JSON_CLIENT_LIMIT", 2)
    write_manifests(tmp_path, SHARDS, LABELS, NAMES, {}, "auto")
    assert sorted(p.name for p in tmp_path.iterdir()) == [PARQUET_FILE, "summary.json"]
    write_manifests(tmp_path, SHARDS, LABELS, NAMES, {}, "json")
    assert not (tmp_path / PARQUET_FILE).exists() and read_manifests(tmp_path)[0] == SHARDS


def test_bad_tables_are_named(tmp_path):
    write_manifests(tmp_path, SHARDS, LABELS, NAMES, {}, "parquet")
    with pytest.raises(PartitionError, match="has no client 'client_009'"):
        client_manifest(tmp_path / PARQUET_FILE, "client_009")
    with pytest.raises(PartitionError, match="name this node's client-id"):
        client_manifest(tmp_path / PARQUET_FILE)
    summary = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "num_clients": 4}))
    with pytest.raises(PartitionError, match="does not list the 4 clients"):
        read_manifests(tmp_path)
    (tmp_path / PARQUET_FILE).write_bytes(b"PAR1 not really")
    with pytest.raises(PartitionError, match=f"{PARQUET_FILE} is not a readable manifest table"):
        read_manifests(tmp_path)


def test_node_reads_its_row_of_the_table(tmp_path):
    write_manifests(tmp_path, SHARDS, LABELS, NAMES, {}, "parquet")
    sim = NodeData.from_node_config({"partition-id": 2, "num-partitions": 3}, manifest_dir=tmp_path)
    assert sim.client_id == "client_002" and sim.manifest.endswith(PARQUET_FILE)
    assert _manifest(sim.manifest, sim.client_id)["indices"] == SHARDS[2]
    site = NodeData.from_node_config({"manifest": str(tmp_path / PARQUET_FILE), "client-id": "client_001"})
    assert _manifest(site.manifest, site.client_id)["indices"] == SHARDS[1]
    with pytest.raises(NodeConfigError, match="has no client 'client_007'"):
        _manifest(str(tmp_path / PARQUET_FILE), "client_007")


def test_run_writes_parquet_and_a_run_from_it_trains_the_same_shards(tiny_experiment, tmp_path):
    first = run_experiment(tiny_experiment('partition.manifest_format="parquet"', "federation.rounds=1",
                                           f'output_dir="{tmp_path / "a"}"'), quiet=True)
    part = first.output_dir / "partition"
    assert (part / PARQUET_FILE).is_file() and not (part / "client_000.json").exists()
    again = run_experiment(tiny_experiment(f'partition.manifest_dir="{part}"', "federation.rounds=1",
                                           f'output_dir="{tmp_path / "b"}"'), quiet=True)
    assert read_manifests(part)[0] == read_manifests(again.output_dir / "partition")[0]
    assert again.final_metrics == first.final_metrics
