"""``fedtune node``: a site checks its data against the experiment, then joins the federation as a SuperNode.

What a hospital's IT person runs, given the experiment file the federation's operator sends them::

    fedtune node experiment.toml --superlink fl.example.org:9092 --client-id hospital_a \\
        --train-file /data/notes.csv --root-certificates ca.crt --auth-key keys/hospital_a

Before connecting, the site's data is read exactly as the ClientApp will read it (the experiment's
``[data]`` settings: columns, label values, lengths; :meth:`NodeData.load_task`) and summarized
(rows, label histogram); a bad file stops here with one line naming the file and the column or
value. The check also fills the node's tokenized-rows cache (:mod:`fedtune.encode_cache`), so the
first round does not pay for it. Then ``flower-supernode`` runs in the foreground with the TLS,
authentication and node-config flags built from the options (``--check`` stops after the check).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fedtune.config import Experiment
from fedtune.runtime.flower import node as node_config
from fedtune.runtime.flower.node import NodeConfigError, NodeData, kind_has_label_names

POLL_INTERVAL = "0.2"
"""``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` for the node's SuperExec unless set (Flower's default: 1 s per message)."""


@dataclass(frozen=True)
class DataReport:
    """What a node found in its data: the rows it will train on, and their labels."""

    client_id: str
    source: str
    kind: str
    rows: int
    held_out: int = 0
    labels: dict[str, int] | None = None
    """Rows per label name (multi-label: rows carrying each label), None for tasks without labels."""
    target_range: tuple[float, float] | None = None
    """Regression: the smallest and largest target."""

    def lines(self) -> list[str]:
        """The report, as printed by ``fedtune node``."""
        out = [f"client {self.client_id}: {self.rows} training rows ({self.kind}) from {self.source}"
               + (f", {self.held_out} held out for client-side scores" if self.held_out else "")]
        if self.labels is not None:
            width = max(len(n) for n in self.labels) if self.labels else 0
            out += [f"  {name:<{width}}  {count}" for name, count in self.labels.items()]
            empty = [n for n, c in self.labels.items() if c == 0]
            if empty:
                out.append(f"  (no rows for {', '.join(empty)}: allowed, this site just never teaches them)")
        if self.target_range is not None:
            out.append(f"  targets from {self.target_range[0]:g} to {self.target_range[1]:g}")
        return out


def site_node(client_id: str = "", train_file: str = "", manifest: str = "", data_dir: str = "",
              threads: int = 0, require_secagg: bool = False) -> tuple[NodeData, dict]:
    """The node's NodeData and its ``--node-config`` mapping (the same parser the ClientApp uses)."""
    raw: dict = {}
    for key, value in ((node_config.CLIENT_ID, client_id), (node_config.TRAIN_FILE, _absolute(train_file)),
                       (node_config.MANIFEST, _absolute(manifest)), (node_config.DATA_DIR, _absolute(data_dir))):
        if value:
            raw[key] = value
    if threads:
        raw[node_config.THREADS] = threads
    if require_secagg:
        raw[node_config.REQUIRE_SECAGG] = True
    return NodeData.from_node_config(raw), raw


def check_node_data(exp: Experiment, node: NodeData) -> DataReport:
    """Read this node's rows as its ClientApp will (DataError / NodeConfigError on a bad file) and summarize them."""
    import torch

    from fedtune import encode_cache
    from fedtune.models import load_tokenizer
    from fedtune.server.run import needs_holdout
    from fedtune.tasks.registry import task_kind

    names = tuple(exp.data.label_names) if exp.data.label_names and kind_has_label_names(exp) else None
    tokenizer = load_tokenizer(exp.model.name, exp.model.gguf_file)
    with encode_cache.enabled():  # the first round then reads these rows back
        task, rows, held_out = node.load_task(exp, names, tokenizer,
                                              holdout=exp.personalization.holdout if needs_holdout(exp) else 0.0)
    kind = task_kind(exp)
    source = node.train_file or f"{node.manifest} (rows of the experiment's training set)"
    report = DataReport(node.client_id, source, kind, len(rows), len(held_out) if held_out is not None else 0)
    label_names = task.units.label_names
    if label_names is None or not kind_has_label_names(exp):
        if kind == "classification" and rows.labels.is_floating_point() and len(rows):
            return DataReport(**{**report.__dict__, "target_range": (float(rows.labels.min()), float(rows.labels.max()))})
        return report
    if rows.labels.dim() == 2:  # multi-label: 0/1 vectors
        per = rows.labels.sum(0).to(torch.long).tolist()
        counts = {name: int(per[i]) for i, name in enumerate(label_names)}
    else:
        seen = Counter(int(i) for i in rows.labels.tolist())
        counts = {name: seen.get(i, 0) for i, name in enumerate(label_names)}
    return DataReport(**{**report.__dict__, "labels": counts})


def node_config_text(raw: dict) -> str:
    """``raw`` as Flower's ``--node-config`` string (space-separated ``key=value``, TOML values)."""
    parts = []
    for key, value in raw.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        else:
            value = str(value)
            if '"' in value or "'" in value or "\n" in value:
                raise NodeConfigError(f"node-config {key} = {value!r}: Flower's --node-config cannot carry quotes "
                                      "or newlines; rename or move the file")
            text = json.dumps(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the node's local Runtime API: several nodes may share a machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supernode_command(raw: dict, superlink: str, *, insecure: bool = False, root_certificates: str = "",
                      auth_key: str = "", port: int = 0) -> list[str]:
    """The ``flower-supernode`` command line for this node."""
    if insecure and (root_certificates or auth_key):
        raise NodeConfigError("--insecure cannot be combined with --root-certificates or --auth-key "
                              "(authentication needs TLS)")
    cmd = [flower_exe("flower-supernode"), "--superlink", superlink]
    if insecure:
        cmd.append("--insecure")
    elif root_certificates:
        ca = Path(root_certificates).expanduser()
        if not ca.is_file():
            raise NodeConfigError(f"--root-certificates {root_certificates}: no such file")
        cmd += ["--root-certificates", str(ca.resolve())]
    if auth_key:
        key = Path(auth_key).expanduser()
        if not key.is_file():
            raise NodeConfigError(f"--auth-key {auth_key}: no such file (the node's private key, from "
                                  "`python -m fedtune.runtime.flower.credentials node-keys`)")
        cmd += ["--auth-supernode-private-key", str(key.resolve())]
    cmd += ["--port", str(port or free_port()), "--node-config", node_config_text(raw)]
    return cmd


def node_env() -> dict[str, str]:
    """The SuperNode's environment: ours, with the SuperExec polling for messages every 0.2 s (unless set)."""
    return {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": POLL_INTERVAL, **os.environ}


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else ""


def flower_exe(name: str) -> str:
    """A Flower command (``flwr``, ``flower-superlink``, ...) next to this Python, else by name from ``PATH``."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name
