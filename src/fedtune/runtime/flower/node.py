"""What a SuperNode's node config means: which fedtune client it is and where its own data is.

A SuperNode is started with ``--node-config`` (space-separated ``key=value``, TOML values)::

    flower-supernode ... --node-config 'client-id="hospital_a" train-file="/data/a.csv"'
    flower-supernode ... --node-config 'manifest="runs/x/partition/client_001.json"'

Keys (all optional, but the node must end up with a client id and exactly one data source):

``client-id``
    The fedtune client id of this node. It names the node in sampling, metrics and logs, and
    seeds its local training (``seed``, round, client id), so the same id on the same rows gives
    the same update as the in-process simulation. Defaults to the manifest's ``client_id``.
``train-file``
    This node's own training rows in the experiment's task format (classification: CSV/TSV/JSON/JSONL/
    Parquet with ``data.text_column`` / ``data.label_column``; qa: SQuAD JSON; causal_lm: Alpaca JSON;
    multilabel: a table with a label list column). Labels are mapped with the server's label names.
``manifest``
    A partition manifest (``client_NNN.json`` from ``fedtune partition``): the node reads the
    experiment's training set from its own copy (``data.train_file`` or ``$FEDTUNE_DATA_DIR``)
    and keeps the listed rows. This reproduces a simulation's shards on real nodes. A large
    partition's ``clients.parquet`` (every client in one table) works too, with ``client-id``.
``data-dir``
    Use this folder as ``FEDTUNE_DATA_DIR`` (GLUE / AG News layouts) on this node.
``require-secagg``
    ``true``: this node trains only in SecAgg+ rounds (``runtime.secagg``); a plain train request,
    which would send its update to the server in clear, is refused with an error. The data
    holder's own guard: the server's configuration is not theirs to check.
``threads``
    CPU threads this node's training uses (``torch.set_num_threads``); 0 or absent: torch's default
    (every core). Several SuperNodes sharing one machine should split its cores between them: two
    nodes each using every core of the same CPU train several times slower than one after the other.
``attack`` / ``attack-scale`` / ``attack-noise-std``
    Make this node byzantine, whatever the server's experiment says: ``"sign_flip"``, ``"scale"``,
    ``"noise"`` (what it sends instead of its honest update) or ``"label_flip"`` (it trains on
    flipped labels), with the attack's scale (default 1.0) and noise standard deviation (1.0); see
    :mod:`fedtune.attacks`. Without ``attack`` the node follows the experiment's ``[attack]``.
``partition-id`` / ``num-partitions``
    Set by Flower's simulation engine for virtual nodes; the node becomes client
    ``client_{partition-id:03d}`` and reads that manifest from the run's partition folder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.attacks import Attack, experiment_attacker
from fedtune.batching import EncodedDataset
from fedtune.config import Experiment
from fedtune.errors import DataError, NodeConfigError, PartitionError  # (NodeConfigError re-exported here)
from fedtune.manifests import PARQUET_FILE, client_manifest
from fedtune.partition import client_ids
from fedtune.tasks.task import Task

CLIENT_ID, TRAIN_FILE, MANIFEST, DATA_DIR = "client-id", "train-file", "manifest", "data-dir"
PARTITION_ID, NUM_PARTITIONS, REQUIRE_SECAGG = "partition-id", "num-partitions", "require-secagg"
THREADS = "threads"
ATTACK, ATTACK_SCALE, ATTACK_NOISE_STD = "attack", "attack-scale", "attack-noise-std"
KNOWN_KEYS = (CLIENT_ID, TRAIN_FILE, MANIFEST, DATA_DIR, REQUIRE_SECAGG, THREADS, ATTACK, ATTACK_SCALE,
              ATTACK_NOISE_STD, PARTITION_ID, NUM_PARTITIONS)


@dataclass(frozen=True)
class NodeData:
    """This node's identity and its data source, resolved from the node config."""

    client_id: str
    train_file: str = ""
    manifest: str = ""
    data_dir: str = ""
    require_secagg: bool = False
    """Refuse train requests outside SecAgg+ rounds (node config ``require-secagg = true``)."""
    attack: Attack | None = None
    """This node's own byzantine behaviour (node config ``attack``), or None to follow the experiment."""
    threads: int = 0
    """CPU threads for this node's torch work (node config ``threads``); 0: torch's default."""

    @classmethod
    def from_node_config(cls, raw: Mapping[str, Any], manifest_dir: str | Path | None = None) -> "NodeData":
        """Parse a Flower ``context.node_config`` (see the module docstring for the keys).

        ``manifest_dir`` is the partition folder used for Flower-simulation virtual nodes
        (``partition-id``); deployed nodes name their data themselves.
        """
        unknown = sorted(set(raw) - set(KNOWN_KEYS))
        if unknown:
            raise NodeConfigError(f"unknown node-config key(s) {unknown}; known: {list(KNOWN_KEYS)}")

        def text(key: str) -> str:
            value = raw.get(key, "")
            if not isinstance(value, str):
                raise NodeConfigError(f"node-config {key}: expected a string, got {value!r}")
            return value.strip()

        client_id, train_file, manifest, data_dir = text(CLIENT_ID), text(TRAIN_FILE), text(MANIFEST), text(DATA_DIR)
        if PARTITION_ID in raw and not (client_id or train_file or manifest):
            pid, num = raw[PARTITION_ID], raw.get(NUM_PARTITIONS)
            if not isinstance(pid, int) or not isinstance(num, int) or not 0 <= pid < num:
                raise NodeConfigError(f"node-config partition-id={pid!r} num-partitions={num!r} are not valid")
            if manifest_dir is None:
                raise NodeConfigError("node-config partition-id needs the run's partition folder (Flower simulation)")
            client_id = client_ids(num)[pid]
            columnar = Path(manifest_dir) / PARQUET_FILE  # (a large population's one manifest table)
            manifest = str(columnar if columnar.is_file() else Path(manifest_dir) / f"{client_id}.json")
        if bool(train_file) == bool(manifest):
            raise NodeConfigError(
                f"node-config must name exactly one data source: {TRAIN_FILE}=<file> or {MANIFEST}=<client_NNN.json> "
                f"(got {dict(raw)})"
            )
        if manifest and not client_id:
            client_id = _manifest(manifest).get("client_id", "")  # (a clients.parquet needs client-id: refused there)
        if not client_id:
            raise NodeConfigError(f"node-config needs {CLIENT_ID}=<name> with {TRAIN_FILE} (got {dict(raw)})")
        require_secagg = raw.get(REQUIRE_SECAGG, False)
        if not isinstance(require_secagg, bool):
            raise NodeConfigError(f"node-config {REQUIRE_SECAGG}: expected true or false, got {require_secagg!r}")
        threads = raw.get(THREADS, 0)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise NodeConfigError(f"node-config {THREADS}: expected a whole number >= 0, got {threads!r}")
        return cls(client_id=client_id, train_file=train_file, manifest=manifest, data_dir=data_dir,
                   require_secagg=require_secagg, attack=_attack(raw, text(ATTACK)), threads=threads)

    def attack_in(self, exp: Experiment) -> Attack | None:
        """What this node does as a byzantine client: its own node config's attack, else the experiment's."""
        if self.attack is not None:
            return self.attack
        return experiment_attacker(exp.attack, self.client_id, exp.partition.num_clients, exp.seed)

    def node_experiment(self, exp: Experiment, label_names: tuple[str, ...] | None) -> Experiment:
        """``exp`` as this node reads it: its own ``train-file`` (every row trains) with the server's label names;
        unchanged for a manifest (the node's copy of the experiment's own data)."""
        d = exp.data
        if self.train_file:
            from fedtune.tasks.registry import task_kind

            kind = task_kind(exp)
            d = dataclasses.replace(
                d, train_file=self.train_file, eval_file=self.train_file, eval_split="", train_size=0, eval_size=0,
                dataset="files" if kind in ("classification", "generative_classification") else d.dataset,
                task=kind,
            )
            if label_names is not None and kind_has_label_names(exp):
                d = dataclasses.replace(d, label_names=list(label_names))
        return dataclasses.replace(exp, data=d)

    def load_task(self, exp: Experiment, label_names: tuple[str, ...] | None, tokenizer,
                  holdout: float = 0.0) -> tuple[Task, EncodedDataset, EncodedDataset | None]:
        """This node's task (the experiment's kind, on its data), its training rows and its held-out rows.

        A manifest selects the node's partitioning units (rows, questions, instructions) of its own
        copy of the experiment's training set; a ``train-file`` is all this node's rows. The label
        names must be the server's (they fix the model head). With ``holdout`` > 0 the node keeps
        that share of its units out of training to score on, drawn exactly as the simulation draws
        this client's (:func:`fedtune.personalization.split_holdout`, seeded by the client id).
        """
        from fedtune.tasks.registry import build_task

        if self.data_dir:
            os.environ["FEDTUNE_DATA_DIR"] = self.data_dir
        task = build_task(self.node_experiment(exp, label_names), tokenizer)
        own = tuple(task.units.label_names) if task.units.label_names is not None else None
        if label_names is not None and own != tuple(label_names):
            raise DataError(f"client {self.client_id}: this node's data has labels {list(own or [])}, "
                            f"the server's are {list(label_names)}")
        if self.train_file:
            indices = list(range(task.units.count))
        else:
            listed = _manifest(self.manifest, self.client_id).get("indices")
            if not isinstance(listed, list):
                raise NodeConfigError(f"manifest {self.manifest}: no 'indices' list")
            indices = listed
            bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < task.units.count]
            if bad:
                raise NodeConfigError(f"manifest {self.manifest} does not fit this node's training set: unit "
                                      f"{bad[0]} is out of range for {task.units.count} units")
        held_out = None
        if holdout > 0:
            from fedtune.personalization import split_holdout

            (indices,), (test,) = split_holdout([indices], holdout, exp.seed, [self.client_id])
            held_out = task.train.subset(task.rows_of(test))
        return task, task.train.subset(task.rows_of(indices)), held_out


def _attack(raw: Mapping[str, Any], kind: str) -> Attack | None:
    numbers = {}
    for key in (ATTACK_SCALE, ATTACK_NOISE_STD):
        value = raw.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NodeConfigError(f"node-config {key}: expected a number, got {value!r}")
        numbers[key] = float(value)
    if not kind:
        extra = sorted(k for k in (ATTACK_SCALE, ATTACK_NOISE_STD) if k in raw)
        if extra:
            raise NodeConfigError(f"node-config {extra[0]} needs {ATTACK}=<kind>")
        return None
    if numbers[ATTACK_NOISE_STD] < 0:
        raise NodeConfigError(f"node-config {ATTACK_NOISE_STD} must be >= 0, got {numbers[ATTACK_NOISE_STD]}")
    try:
        return Attack(kind, numbers[ATTACK_SCALE], numbers[ATTACK_NOISE_STD])
    except ValueError as exc:
        raise NodeConfigError(f"node-config {ATTACK}: {exc}") from None


def kind_has_label_names(exp: Experiment) -> bool:
    """Whether the experiment's task has a label vocabulary the server and the nodes must share."""
    from fedtune.tasks.registry import task_kind

    return task_kind(exp) in ("classification", "generative_classification", "multilabel")


def _manifest(path: str, client_id: str | None = None) -> dict:
    """This node's manifest record: a ``client_NNN.json``, or ``client_id``'s row of a ``clients.parquet``."""
    if not Path(path).expanduser().exists():
        raise NodeConfigError(f"manifest {path} does not exist on this node")
    try:
        return client_manifest(path, client_id)
    except PartitionError as exc:
        raise NodeConfigError(f"manifest {path}: {str(exc).removeprefix('read_manifests: ')}") from None
