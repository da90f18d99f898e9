"""A partition stored as manifests: ``summary.json`` plus the clients' rows, in one of two formats.

- ``json``: one file per client (``client_NNN.json``: ``client_id``, ``size``, ``indices``,
  ``label_histogram``), and every client's size and label histogram in the summary too.
- ``parquet``: one columnar file for every client (``clients.parquet``: the same four columns,
  the histogram as a JSON string), for populations of thousands to 100,000 clients where one
  file per client and a summary listing them all would be slow to write, list and read.
  ``partition.manifest_format = "auto"`` (the default) picks it above :data:`JSON_CLIENT_LIMIT`.

A SuperNode reads its own manifest (``--node-config manifest=...``, plus ``client-id`` for a
Parquet one) to train exactly the shard a simulation would give that client (:func:`client_manifest`).
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from fedtune.errors import PartitionError  # (re-exported here: raised by this module)

_SUMMARY = "summary.json"
PARQUET_FILE = "clients.parquet"
"""The columnar manifest of every client (``manifest_format = "parquet"``)."""
JSON_CLIENT_LIMIT = 1000
"""``manifest_format = "auto"`` writes one JSON file per client up to this many clients, Parquet above."""
_CLIENT_FILE_RE = re.compile(r"^client_(\d{3,})\.json$")


def _is_int(value: Any) -> TypeGuard[numbers.Integral]:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require_int(name: str, value: Any, minimum: int) -> int:
    if not _is_int(value):
        raise PartitionError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise PartitionError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def client_ids(num_clients: int) -> list[str]:
    """Return the canonical client ids ``["client_000", "client_001", ...]``."""
    num_clients = _require_int("num_clients", num_clients, 0)
    return [f"client_{i:03d}" for i in range(num_clients)]


def label_histogram(
    indices: Sequence[int], labels: Sequence[int] | np.ndarray | None, label_names: Sequence[str] | None
) -> dict[str, int]:
    """Count the classes of the rows ``indices``.

    Returns ``{}`` when ``labels`` is ``None``. With ``label_names`` the keys are
    the names (every name appears, with 0 for absent classes, in class-id order)
    and class ids must index into ``label_names``; without it the keys are the
    class ids as strings, for present classes only, in increasing id order.
    """
    if labels is None:
        return {}
    label_arr = np.asarray(labels)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= label_arr.size):
        bad = int(idx[(idx < 0) | (idx >= label_arr.size)][0])
        raise PartitionError(f"label_histogram: row index {bad} out of range for {label_arr.size} labels")
    picked = label_arr[idx].astype(np.int64)
    if label_names is not None:
        names = [str(name) for name in label_names]
        if picked.size and (picked.min() < 0 or picked.max() >= len(names)):
            bad = int(picked[(picked < 0) | (picked >= len(names))][0])
            raise PartitionError(f"label_histogram: class id {bad} has no entry in label_names ({len(names)} names)")
        counts = np.bincount(picked, minlength=len(names))
        return {name: int(count) for name, count in zip(names, counts, strict=True)}
    values, counts = np.unique(picked, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}


def _check_indices(where: str, indices: Any) -> list[int]:
    if not isinstance(indices, (list, tuple, np.ndarray)):
        raise PartitionError(f"{where}: indices must be a list of non-negative integers, got {type(indices).__name__}")
    out = []
    for value in indices:
        if not _is_int(value) or value < 0:
            raise PartitionError(f"{where}: indices must be non-negative integers, found {value!r}")
        out.append(int(value))
    return out


_RESERVED_SUMMARY_KEYS = ("num_clients", "total_rows", "unique_rows", "sizes", "label_histograms")


def manifest_format(fmt: str, num_clients: int) -> str:
    """The format a partition of ``num_clients`` is written in: ``fmt``, with ``auto`` resolved by size."""
    if fmt not in ("auto", "json", "parquet"):
        raise PartitionError(f"partition.manifest_format = {fmt!r} is unknown (auto, json, parquet)")
    if fmt == "auto":
        return "parquet" if num_clients > JSON_CLIENT_LIMIT else "json"
    return fmt


def write_manifests(
    directory: str | Path,
    shards: list[list[int]],
    labels: Sequence[int] | None,
    label_names: Sequence[str] | None,
    meta: Mapping[str, Any],
    fmt: str = "json",
) -> None:
    """Write a partition to ``directory`` (created if needed), as ``fmt`` (:func:`manifest_format`).

    ``json`` writes ``client_000.json``, ... (``{"client_id", "size", "indices",
    "label_histogram"}``) and ``summary.json`` with ``num_clients``,
    ``total_rows`` (sum of sizes), ``unique_rows``, ``sizes``,
    ``label_histograms`` (by client id) and every key of ``meta`` (which must be
    JSON-serialisable and must not reuse those names). ``parquet`` writes the same
    records as the rows of ``clients.parquet`` and a summary without ``sizes`` and
    ``label_histograms`` (``"format": "parquet"``). The other format's files, and
    ``client_NNN.json`` files numbered beyond the new client count, are removed.
    """
    directory = Path(directory)
    fmt = manifest_format(fmt, len(shards))
    clash = [key for key in meta if key in _RESERVED_SUMMARY_KEYS]
    if clash:
        raise PartitionError(f"write_manifests: meta keys {clash} clash with computed summary fields")
    checked = [_check_indices(f"write_manifests: shard {i}", shard) for i, shard in enumerate(shards)]
    ids = client_ids(len(checked))
    label_arr = None if labels is None else np.asarray(labels)  # (once: converting it per client was quadratic)
    histograms = {cid: label_histogram(shard, label_arr, label_names) for cid, shard in zip(ids, checked, strict=True)}
    summary: dict[str, Any] = {
        "num_clients": len(checked),
        "total_rows": sum(len(s) for s in checked),
        "unique_rows": len(set().union(*checked)) if checked else 0,
    }
    if fmt == "json":
        summary.update(sizes=[len(s) for s in checked], label_histograms=histograms)
    else:
        summary.update(format="parquet", clients_file=PARQUET_FILE)
    for key, value in meta.items():
        summary[str(key)] = value
    try:
        summary_text = json.dumps(summary, indent=2)
    except (TypeError, ValueError) as exc:
        raise PartitionError(f"write_manifests: meta is not JSON-serialisable: {exc}") from exc

    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        _write_parquet(directory / PARQUET_FILE, ids, checked, histograms)
    else:
        for cid, shard in zip(ids, checked, strict=True):
            record = {"client_id": cid, "size": len(shard), "indices": shard, "label_histogram": histograms[cid]}
            (directory / f"{cid}.json").write_text(json.dumps(record, separators=(",", ":")))
        (directory / PARQUET_FILE).unlink(missing_ok=True)
    for path in directory.iterdir():
        match = _CLIENT_FILE_RE.match(path.name)
        if match and (fmt == "parquet" or int(match.group(1)) >= len(checked)):
            path.unlink()
    (directory / _SUMMARY).write_text(summary_text + "\n")


def _write_parquet(path: Path, ids: Sequence[str], shards: Sequence[Sequence[int]],
                   histograms: Mapping[str, Mapping[str, int]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "client_id": pa.array(ids, pa.string()),
        "size": pa.array([len(s) for s in shards], pa.int64()),
        "indices": pa.array([list(s) for s in shards], pa.list_(pa.int64())),
        "label_histogram": pa.array([json.dumps(histograms[c], separators=(",", ":")) for c in ids], pa.string()),
    })
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def _read_parquet(path: Path, client_id: str | None = None) -> list[dict[str, Any]]:
    """The records of ``clients.parquet`` (only ``client_id``'s when given), as the JSON manifests hold them."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise PartitionError(f"read_manifests: client file {path} is missing")
    try:
        table = pq.read_table(path, filters=[("client_id", "=", client_id)] if client_id is not None else None)
        columns = table.to_pydict()
        records = [{"client_id": c, "size": n, "indices": idx, "label_histogram": json.loads(h)} for c, n, idx, h in
                   zip(columns["client_id"], columns["size"], columns["indices"], columns["label_histogram"], strict=True)]
    except (OSError, ValueError, KeyError) as exc:  # (pyarrow's errors derive from these)
        raise PartitionError(f"read_manifests: client file {path} is not a readable manifest table: "
                             f"{' '.join(str(exc).split())}") from None
    return records


def client_manifest(path: str | Path, client_id: str | None = None) -> dict[str, Any]:
    """One client's manifest record: a ``client_NNN.json`` file, or ``client_id``'s row of ``clients.parquet``.

    ``path`` may also be a partition folder holding ``clients.parquet``. PartitionError names the
    file and what is wrong (missing, unreadable, no such client).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / PARQUET_FILE
    if path.suffix != ".parquet":
        record = _load_json(path, "client file")
        if not isinstance(record, dict):
            raise PartitionError(f"read_manifests: client file {path} must hold a JSON object")
        return record
    if not client_id:
        raise PartitionError(f"{path} holds every client's rows: name this node's client-id")
    records = _read_parquet(path, client_id)
    if not records:
        raise PartitionError(f"{path} has no client {client_id!r}")
    return records[0]


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise PartitionError(f"read_manifests: {what} {path} is missing")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PartitionError(f"read_manifests: {what} {path} is not valid JSON: {exc}") from exc


def read_manifests(directory: str | Path) -> tuple[list[list[int]], dict[str, Any]]:
    """Read a partition written by :func:`write_manifests`.

    Returns ``(shards, summary)`` with shards in client order. Raises
    :class:`PartitionError` naming the offending file if the directory,
    ``summary.json`` or a client file is missing or malformed, or if a client's
    indices are not non-negative integers or disagree with its ``size``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PartitionError(f"read_manifests: manifest directory {directory} does not exist")
    summary_path = directory / _SUMMARY
    summary = _load_json(summary_path, "summary file")
    if not isinstance(summary, dict):
        raise PartitionError(f"read_manifests: summary file {summary_path} must hold a JSON object")
    num_clients = summary.get("num_clients")
    if not _is_int(num_clients) or int(num_clients) < 0:
        raise PartitionError(
            f"read_manifests: summary file {summary_path} has invalid num_clients {num_clients!r}"
        )
    num_clients = int(num_clients)  # an integral count (checked above)
    shards: list[list[int]] = []
    if summary.get("format") == "parquet":
        path = directory / str(summary.get("clients_file", PARQUET_FILE))
        records = _read_parquet(path)
        ids = client_ids(num_clients)
        if [r["client_id"] for r in records] != ids:
            raise PartitionError(f"read_manifests: client file {path} does not list the {num_clients} clients of "
                                 f"{summary_path} in order (client_000, client_001, ...; it has {len(records)} rows)")
        for record in records:
            indices = _check_indices(f"read_manifests: client file {path} ({record['client_id']})", record["indices"])
            if record["size"] != len(indices):
                raise PartitionError(f"read_manifests: client file {path}: {record['client_id']} says size "
                                     f"{record['size']} but lists {len(indices)} indices")
            shards.append(indices)
        return shards, summary
    for cid in client_ids(num_clients):
        path = directory / f"{cid}.json"
        record = _load_json(path, "client file")
        if not isinstance(record, dict) or "indices" not in record:
            raise PartitionError(f"read_manifests: client file {path} must be a JSON object with 'indices'")
        if record.get("client_id", cid) != cid:
            raise PartitionError(
                f"read_manifests: client file {path} has client_id {record.get('client_id')!r}, expected {cid!r}"
            )
        indices = _check_indices(f"read_manifests: client file {path}", record["indices"])
        if "size" in record and record["size"] != len(indices):
            raise PartitionError(
                f"read_manifests: client file {path} says size {record['size']!r} but lists {len(indices)} indices"
            )
        shards.append(indices)
    return shards, summary
