"""Checkpoint every round, resume a killed run: ``fedtune run --resume OUT_DIR``.

After every round the run's folder gets ``checkpoint/``:

- ``round_NNNN.safetensors``: every tensor of the run's state: the strategy's ``ServerState``
  (global params and ``buffers``: server-optimizer moments, SCAFFOLD's ``c``), each simulated
  client's ``ClientState`` (SCAFFOLD ``c_i``, codec error-feedback residuals, FedPer heads) and
  the torch and NumPy RNG states. Each tensor's key is the JSON list of its path, e.g.
  ``["client", "client_003", "codec_residual", "classifier.weight"]``.
- ``checkpoint.json``: the round, the resolved configuration, Python's RNG state, the elapsed wall
  time, the layout of params, buffers and client states (names in order, so empty entries survive
  and sums over tensors repeat exactly), and the tensor file's
  name and SHA-256. It is replaced atomically *after* its tensor file is complete, so a run
  killed while writing leaves the previous checkpoint intact.

No pickle anywhere. Resuming rebuilds the run from its configuration (same data, partition,
model), loads that state, keeps the ``metrics.jsonl`` lines up to the checkpoint's round and
continues: in the simulation the final model equals an uninterrupted run's bit for bit. The
configuration must equal the checkpointed one, except ``federation.rounds`` (raise it to run
longer) and ``output_dir``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedtune.atomic_write import write_atomic
from fedtune.client_store import ClientStateStore
from fedtune.config import ConfigError, Experiment, flatten_table, from_dict
from fedtune.errors import CheckpointError  # (re-exported here: raised by this module)
from fedtune.types import ClientState, ServerState

CHECKPOINT_DIR = "checkpoint"
"""Folder of the run's output directory holding the latest checkpoint."""
INDEX_FILE = "checkpoint.json"
"""The checkpoint's JSON index (written last, atomically)."""
FORMAT = 1
"""Version of the checkpoint layout."""
MAY_DIFFER = ("output_dir", "federation.rounds", "simulation.state_cache", "simulation.workers")
"""Configuration keys a resumed run may change."""


@dataclass
class Checkpoint:
    """The whole state of a federated run after one round."""

    state: ServerState
    config: dict[str, Any]
    client_states: dict[str, ClientState] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    """``python`` (JSON), ``torch`` (uint8 tensor), ``numpy`` (state tuple); restored by :meth:`restore_rng`."""
    wall_time: float = 0.0
    """Seconds the run had been going (the round loop's clock) at this round."""
    data_fingerprint: str = ""
    """What the clients trained on (:func:`fedtune.shards.data_fingerprint`); empty in older checkpoints."""
    client_store: dict[str, int] | None = None
    """The clients' states as files of the run's ``client_states/`` (:mod:`fedtune.client_store`): each
    client's generation. None when the states are inline (``client_states``) or there are none."""

    @property
    def round(self) -> int:
        """The last completed round."""
        return self.state.round

    def check_layout(self, fresh: ServerState) -> None:
        """Refuse a checkpoint whose tensors do not fit the strategy's freshly initialized state."""
        def describe(tensors) -> dict:
            return {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}

        if describe(self.state.params) != describe(fresh.params):
            theirs, ours = describe(self.state.params), describe(fresh.params)
            diff = sorted(set(theirs.items()) ^ set(ours.items()))[:3]
            raise CheckpointError(f"the checkpoint's global tensors do not fit this model (first differences: {diff})")
        if set(self.state.buffers) != set(fresh.buffers):
            raise CheckpointError(f"the checkpoint's strategy buffers {sorted(self.state.buffers)} differ from the "
                                  f"strategy's {sorted(fresh.buffers)}")

    def restore_rng(self) -> None:
        """Put Python's, NumPy's and torch's global RNGs back where they were at this round."""
        if "python" in self.rng:
            version, internal, gauss = self.rng["python"]
            random.setstate((version, tuple(internal), gauss))
        if "numpy" in self.rng:
            np.random.set_state(self.rng["numpy"])
        if "torch" in self.rng:
            torch.set_rng_state(self.rng["torch"])


def _key(*path: str) -> str:
    return json.dumps(list(path))


def capture_rng() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch)."""
    version, internal, gauss = random.getstate()
    state = np.random.get_state(legacy=True)  # (the default; numpy's stub types the no-argument call as a dict)
    if not isinstance(state, tuple):  # legacy=True is a dict only for a non-MT19937 bit generator
        raise RuntimeError(f"capture_rng: numpy's global generator is not MT19937 ({state.get('bit_generator')})")
    kind, keys, pos, has_gauss, cached = state
    return {"python": [version, list(internal), gauss],
            "numpy": (kind, keys.copy(), int(pos), int(has_gauss), float(cached)),
            "torch": torch.get_rng_state().clone()}


def write_checkpoint(out: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` into ``out/checkpoint/`` (tensor file first, index last, atomically); return the index path."""
    folder = Path(out) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in ckpt.state.params.items():
        tensors[_key("params", name)] = t
    for buf, td in ckpt.state.buffers.items():
        for name, t in td.items():
            tensors[_key("buffer", buf, name)] = t
    for cid, state in ckpt.client_states.items():
        for purpose, td in state.items():
            for name, t in td.items():
                tensors[_key("client", cid, purpose, name)] = t
    rng = dict(ckpt.rng)
    if "torch" in rng:
        tensors[_key("rng", "torch")] = rng.pop("torch")
    if "numpy" in rng:
        kind, keys, pos, has_gauss, cached = rng.pop("numpy")
        tensors[_key("rng", "numpy")] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        rng["numpy"] = [kind, pos, has_gauss, cached]
    data = st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    tensor_file = f"round_{ckpt.round:04d}.safetensors"
    write_atomic(folder / tensor_file, data, durable=True)
    index = {
        "format": FORMAT,
        "round": ckpt.round,
        "tensors": tensor_file,
        "sha256": hashlib.sha256(data).hexdigest(),
        "params": list(ckpt.state.params),  # every name list keeps its order: sums over tensors reproduce
        "buffers": {buf: list(td) for buf, td in ckpt.state.buffers.items()},
        "clients": {cid: {p: list(td) for p, td in st.items()} for cid, st in ckpt.client_states.items()},
        "rng": rng,
        "wall_time": ckpt.wall_time,
        "data_fingerprint": ckpt.data_fingerprint,
        "client_store": ckpt.client_store,
        "config": ckpt.config,
    }
    write_atomic(folder / INDEX_FILE, (json.dumps(index, indent=1) + "\n").encode(), durable=True)
    for old in folder.glob("round_*.safetensors"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    return folder / INDEX_FILE


def read_checkpoint(out: str | Path) -> Checkpoint:
    """Load the latest checkpoint of the run in ``out``; CheckpointError when there is none or it is damaged."""
    folder = Path(out) / CHECKPOINT_DIR
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        if (Path(out) / "config.toml").is_file():  # a run that was stopped inside its first round
            raise CheckpointError(f"{Path(out)} holds a run stopped before it finished round 1 (no checkpoint yet, "
                                  "nothing to continue): start it again with "
                                  f"`fedtune run {Path(out) / 'config.toml'} --overwrite`")
        raise CheckpointError(f"no checkpoint in {Path(out)} (expected {index_path}); a run writes one after every "
                              "round, so this run finished no round or is not a fedtune run folder")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index_path} is not valid JSON: {exc}") from None
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{index_path} has checkpoint format {index.get('format')!r}; "
                              f"this fedtune reads {FORMAT}")
    tensor_path = folder / index["tensors"]
    try:
        data = tensor_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{tensor_path} (named by {index_path}) is missing") from None
    if hashlib.sha256(data).hexdigest() != index["sha256"]:
        raise CheckpointError(f"{tensor_path} does not match the SHA-256 recorded in {index_path}")
    stored = {tuple(json.loads(k)): v for k, v in st_load(data).items()}
    params = {n: stored[("params", n)] for n in index["params"]}
    buffers = {buf: {n: stored[("buffer", buf, n)] for n in names} for buf, names in index["buffers"].items()}
    clients = {cid: {p: {n: stored[("client", cid, p, n)] for n in names} for p, names in purposes.items()}
               for cid, purposes in index["clients"].items()}
    rng: dict[str, Any] = {}
    if "python" in index["rng"]:
        rng["python"] = index["rng"]["python"]
    if ("rng", "torch") in stored:
        rng["torch"] = stored[("rng", "torch")].to(torch.uint8)
    if ("rng", "numpy") in stored and "numpy" in index["rng"]:
        kind, pos, has_gauss, cached = index["rng"]["numpy"]
        rng["numpy"] = (kind, stored[("rng", "numpy")].numpy().astype(np.uint32), pos, has_gauss, cached)
    return Checkpoint(
        state=ServerState(round=int(index["round"]), params=params, buffers=buffers),
        config=index["config"], client_states=clients, rng=rng, wall_time=float(index.get("wall_time", 0.0)),
        data_fingerprint=str(index.get("data_fingerprint", "")),
        client_store={str(c): int(g) for c, g in index["client_store"].items()} if index.get("client_store") else None,
    )


def config_differences(checkpointed: Mapping[str, Any], current: Mapping[str, Any],
                       allowed: Sequence[str] = MAY_DIFFER) -> list[str]:
    """Dotted keys whose values differ between two configuration dicts, ``allowed`` keys left out."""
    a, b = flatten_table(checkpointed), flatten_table(current)
    return sorted(k for k in a.keys() | b.keys() if k not in allowed and a.get(k, "<absent>") != b.get(k, "<absent>"))


def check_config(ckpt: Checkpoint, exp: Experiment, where: str = "") -> None:
    """ConfigError naming every key where ``exp`` differs from the checkpointed configuration.

    A key the checkpoint does not have (added to fedtune since) counts as its default value.
    """
    current = exp.to_dict()
    checkpointed = {**flatten_table(Experiment().to_dict()), **flatten_table(ckpt.config)}
    if exp.train.precision == "auto":  # "auto" resumes in the checkpoint's resolved precision (pin_precision)
        current = {**current, "train": {**current["train"], "precision": checkpointed.get("train.precision")}}
    diffs = config_differences(checkpointed, current)
    if diffs:
        a, b = checkpointed, flatten_table(current)
        shown = "; ".join(f"{k}: checkpoint {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}" for k in diffs)
        raise ConfigError(f"cannot resume {where or exp.resolved_output_dir}: the configuration differs from the "
                          f"checkpointed one in {', '.join(diffs)} ({shown}). Only {', '.join(MAY_DIFFER)} may change.")
    if exp.federation.rounds < ckpt.round:
        raise ConfigError(f"cannot resume: the checkpoint is at round {ckpt.round}, beyond federation.rounds = "
                          f"{exp.federation.rounds}")


def resume_experiment(out_dir: str | Path, config_file: str | Path | None = None,
                      overrides: Sequence[str] = ()) -> Experiment:
    """The Experiment to continue the run in ``out_dir``: the checkpointed configuration (or ``config_file``)
    with ``overrides``, writing to ``out_dir``; checked against the checkpoint (ConfigError naming the keys)."""
    ckpt = read_checkpoint(out_dir)
    pinned = [*overrides, f"output_dir={json.dumps(str(out_dir))}"]
    if config_file is not None:
        exp = Experiment.from_toml(config_file, pinned)
    else:
        exp = Experiment.from_overrides(pinned, base=from_dict(Experiment, ckpt.config, source=str(out_dir)))
    check_config(ckpt, exp, str(out_dir))
    return exp


def resume_metrics(path: Path, last_round: int) -> list[dict]:
    """Keep the lines of ``metrics.jsonl`` up to ``last_round`` (a killed run may have logged one more); return them."""
    if not path.exists():
        return []
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("round", 0) <= last_round]
    path.write_text("".join(line + "\n" for line in kept))
    return [json.loads(line) for line in kept]


class Checkpointer:
    """Round callback writing a checkpoint after every round (none for round 0, the initial evaluation).

    ``client_states`` is the transport's per-client state dict when the clients live in this
    process (the simulation), else None (Flower: their state stays on their nodes).
    """

    def __init__(self, out: str | Path, exp: Experiment, client_states: Mapping[str, ClientState] | None,
                 data_fingerprint: str = "") -> None:
        self.out = Path(out)
        self.config = exp.to_dict()
        self.client_states = client_states
        self.data_fingerprint = data_fingerprint

    def __call__(self, state: ServerState, record: dict) -> None:
        """Write the checkpoint of the round just finished."""
        if state.round == 0:
            return
        store = self.client_states if isinstance(self.client_states, ClientStateStore) else None
        index = store.commit() if store is not None else None  # (state files first, the index names them)
        write_checkpoint(self.out, Checkpoint(
            state=state, config=self.config, client_states={} if store else dict(self.client_states or {}),
            rng=capture_rng(), wall_time=float(record.get("wall_time", 0.0)),
            data_fingerprint=self.data_fingerprint, client_store=index,
        ))
        if store is not None and index is not None:  # (index is the store's: both or neither)
            store.collect(index)  # the previous round's files are superseded only now


def check_fingerprint(ckpt: Checkpoint | None, fingerprint: str, what: str) -> None:
    """Refuse to resume when the clients' data differs from what the checkpoint's rounds trained on."""
    if ckpt is None or not ckpt.data_fingerprint or not fingerprint or ckpt.data_fingerprint == fingerprint:
        return
    raise CheckpointError(f"the {what} changed since the checkpoint of round {ckpt.round} (fingerprint "
                          f"{ckpt.data_fingerprint[:12]} then, {fingerprint[:12]} now): resuming would continue on "
                          "other data; restore the data or start a new run")


def checkpoint_to_resume(exp: Experiment, remote: object | None = None) -> Checkpoint:
    """The checkpoint ``run_experiment(exp, resume=True)`` continues from, after checking it may.

    Federated and centralized runs of the in-process simulation resume with every state. On Flower
    (``remote`` given, or ``runtime.mode`` a Flower one) the server's state resumes (global tensors,
    server optimizer moments, RNGs); clients' own state lives on their nodes, and Flower starts
    every run with an empty node state, so runs that keep client state there (a strategy whose
    capabilities say ``client_state``, e.g. SCAFFOLD's ``c_i`` or FedDyn's gradient state;
    error-feedback residuals of a lossy ``codec_up``) are refused.
    """
    if exp.mode == "local":
        raise ConfigError("mode = 'local' (the local baseline) is not resumable: run it again")
    if remote is not None or exp.runtime.mode != "simulation":
        from fedtune.channel import Channel
        from fedtune.strategies.base import strategy_spec

        kept = []
        if strategy_spec(exp.strategy.name).capabilities.client_state:
            kept.append(f"strategy.name = {exp.strategy.name!r} (its clients' own state across rounds)")
        if Channel.from_config(exp.federation).keeps_residuals:
            kept.append(f"federation.codec_up = {exp.federation.codec_up!r} with error feedback (client residuals)")
        if kept:
            raise ConfigError(f"cannot resume on Flower (runtime.mode = {exp.runtime.mode!r}): "
                              f"{'; '.join(kept)} keep state on the clients' nodes, and Flower gives every new run "
                              "empty node state. Run it again, or resume it in runtime.mode = 'simulation'")
    ckpt = read_checkpoint(exp.resolved_output_dir)
    check_config(ckpt, exp)
    return ckpt


def restore(ckpt: Checkpoint, fresh: ServerState, states: MutableMapping[str, ClientState] | None,
            metrics_path: Path) -> tuple[ServerState, list[dict]]:
    """Put a run back at the checkpoint's round; return its ServerState and the metrics records kept.

    ``fresh`` is the strategy's ``init`` state (checks the checkpoint fits the model and strategy);
    ``states`` (the in-process clients' states, None on Flower) are replaced by the checkpointed
    ones; the global RNGs are restored; ``metrics.jsonl`` is cut back to the checkpoint's round.
    """
    ckpt.check_layout(fresh)
    if isinstance(states, ClientStateStore):
        states.restore(ckpt.client_store or {}, ckpt.client_states)
    elif states is not None:
        if ckpt.client_store:
            raise CheckpointError(f"the checkpoint of round {ckpt.round} keeps its clients' states in "
                                  "client_states/; restore it into a ClientStateStore")
        states.clear()
        states.update(ckpt.client_states)
    ckpt.restore_rng()
    return ckpt.state, resume_metrics(metrics_path, ckpt.round)
