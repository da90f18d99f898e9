"""Run an Experiment in this process: the in-process simulation (and the centralized and local baselines).

:func:`run_experiment` is the library's ``fedtune run``: it picks where clients train from
``runtime.mode`` (this process, or Flower via :mod:`fedtune.runtime.flower.launch`). The simulation
builds its transport here and hands it to the one server run, :func:`fedtune.server.run.run_federation`,
which the Flower ServerApp calls too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from fedtune import checkpoint
from fedtune.attacks import experiment_attacker, malicious_clients, poison_rows
from fedtune.batching import EncodedDataset
from fedtune.channel import Channel
from fedtune.client_store import STORE_DIR, ClientStateStore
from fedtune.config import Experiment
from fedtune.models import set_trainable
from fedtune.outputs import JsonlWriter
from fedtune.partition import client_ids
from fedtune.personalization import split_holdout
from fedtune.precision import default_device
from fedtune.runtime.parallel import ParallelSimulationTransport
from fedtune.runtime.simulation import SimulationTransport
from fedtune.server.loop import clients_per_round, run_rounds
from fedtune.server.progress import Progress
from fedtune.server.run import (
    Federation,
    RunResult,
    ServerSide,
    base_summary,
    finish_run,
    needs_holdout,
    pin_precision,
    prepare_server,
    run_federation,
    server_strategy,
)
from fedtune.shards import ClientRows, data_fingerprint, make_shards, plan_shards, write_shards
from fedtune.strategies.from_config import build_strategy, local_train_config
from fedtune.tasks.registry import build_task

log = logging.getLogger(__name__)

__all__ = ["RunResult", "build_strategy", "local_train_config", "make_shards", "run_experiment", "run_simulation",
           "simulation_transport"]


def simulation_transport(exp: Experiment, model, client_data, *, pad_id: int, device,
                         attacks=None, client_states=None) -> SimulationTransport:
    """The in-process transport ``[simulation]`` asks for: clients in turn, or up to K at once, in this
    process or in ``simulation.workers`` forked worker processes (close it when done).

    ``client_states``: where the clients' own state lives (a dict when None; the run uses a
    :class:`fedtune.client_store.ClientStateStore` in its folder).
    """
    k = exp.simulation.parallel_clients
    channel = Channel.from_config(exp.federation)  # codec_up / codec_down
    transport: SimulationTransport
    if k > 1:
        transport = ParallelSimulationTransport(model, client_data, pad_id=pad_id, seed=exp.seed, device=device,
                                                parallel_clients=k, channel=channel, attacks=attacks,
                                                client_states=client_states)
    else:
        transport = SimulationTransport(model, client_data, pad_id=pad_id, seed=exp.seed, device=device,
                                        channel=channel, attacks=attacks, client_states=client_states)
    if exp.simulation.workers > 1:
        transport.use_workers(exp.simulation.workers)
    return transport


def run_experiment(exp: Experiment, *, quiet: bool = False, device: torch.device | None = None,
                   resume: bool = False, overwrite: bool = False) -> RunResult:
    """Run ``exp`` where ``exp.runtime.mode`` says and write its outputs (the library's ``fedtune run``).

    ``simulation``: :func:`run_simulation` in this process; ``flower`` and ``flower-simulation``: the
    same server run inside Flower's ServerApp, clients in Flower's ClientApp
    (:func:`fedtune.runtime.flower.launch.run_on_flower`). Every round is checkpointed into the
    output folder; ``resume`` continues from the latest checkpoint there (:mod:`fedtune.checkpoint`).
    A folder that holds another run is refused unless ``overwrite`` (its old files are then removed).
    """
    if exp.runtime.mode != "simulation":
        from fedtune.runtime.flower.launch import run_on_flower  # Flower is imported only when asked for

        if resume:
            checkpoint.checkpoint_to_resume(exp, remote=True)  # refuses early, before anything is submitted
        return run_on_flower(exp, quiet=quiet, resume=resume, overwrite=overwrite)
    return run_simulation(exp, quiet=quiet, device=device, resume=resume, overwrite=overwrite)


def run_simulation(exp: Experiment, *, quiet: bool = False, device: torch.device | None = None,
                   resume: bool = False, overwrite: bool = False) -> RunResult:
    """The in-process simulation of ``exp`` (federated, or the centralized / local baseline)."""
    from fedtune.config.checks import check_experiment

    check_experiment(exp)
    ckpt = checkpoint.checkpoint_to_resume(exp) if resume else None  # refuses early, before any loading
    device = device or default_device()
    exp = pin_precision(exp, device, ckpt)  # train.precision = "auto": what this device computes natively
    side = prepare_server(exp, build_task, device, resume=ckpt is not None, overwrite=overwrite)
    task, model, out = side.task, side.model, side.out
    train = task.train
    units = plan_shards(exp, task.units)
    fingerprint = data_fingerprint(train, [task.rows_of(u) for u in units])
    checkpoint.check_fingerprint(ckpt, fingerprint, "training data or its partition")  # before the manifests change
    write_shards(exp, task.units, task.name, out, units)
    ids = client_ids(len(units))
    held_out_rows: dict[str, EncodedDataset] = {}
    if needs_holdout(exp):  # (personalization, federated evaluation: every client keeps rows to score on)
        units, held_out = split_holdout(units, exp.personalization.holdout, exp.seed, ids)
        held_out_rows = {cid: train.subset(task.rows_of(rows)) for cid, rows in zip(ids, held_out, strict=True)}
    shards = [task.rows_of(u) for u in units]
    log.info("%s (%s): %d train rows over %d clients", task.name, task.kind, len(train), len(ids))
    strategy = server_strategy(side, len(ids))
    if exp.mode == "local":
        return _run_local(side, strategy, shards, ids, quiet)

    summary: dict[str, Any] = {}
    client_data: Mapping[str, EncodedDataset]
    if exp.mode == "centralized":
        pooled = sorted(set().union(*map(set, shards)))
        client_data = {"centralized": train.subset(pooled)}
        clients, per_round = ["centralized"], 1
    else:
        client_data = ClientRows(train, ids, shards)
        clients = ids
        per_round = clients_per_round(len(ids), exp.federation.clients_per_round, exp.federation.fraction)
    attacks = {}
    if exp.mode == "federated" and exp.attack.kind != "none":  # byzantine clients, as a SuperNode would decide
        malicious_clients(ids, exp.attack.fraction, exp.attack.clients, exp.seed)  # (unknown ids: an error)
        attacks = {c: a for c in ids if (a := experiment_attacker(exp.attack, c, len(ids), exp.seed))}
        num_labels = len(task.units.label_names or ())
        if not isinstance(client_data, ClientRows):  # (federated mode: always the clients' shards)
            raise RuntimeError("attacks need the clients' training rows (ClientRows)")
        client_data.replace({c: poison_rows(client_data[c], a, num_labels) for c, a in attacks.items()})
        summary["attackers"] = list(attacks)
        log.info("attack %s by %d clients: %s", exp.attack.kind, len(attacks), list(attacks))
    store = ClientStateStore(out / STORE_DIR, exp.simulation.state_cache)  # clients' own state, mostly on disk
    simulation = simulation_transport(exp, model, client_data, pad_id=side.pad_id, device=side.device,
                                      attacks=attacks, client_states=store)
    try:  # (from here on the transport may hold worker processes)
        simulation.enable_scoring(task, held_out_rows, side.eval_context)  # (eval.per_client, eval.federated, ...)
        fed = Federation(clients, len(train), simulation.client_states, per_round, data_fingerprint=fingerprint)
        return run_federation(side, strategy, simulation, fed, quiet=quiet, ckpt=ckpt, summary=summary)
    finally:
        simulation.close()


def _run_local(side: ServerSide, strategy, shards, ids, quiet: bool) -> RunResult:
    """Baseline: every client trains alone from the same start; each is scored on the common eval set."""
    from fedtune.models import get_trainable

    exp, model, task, out = side.exp, side.model, side.task, side.out
    train, headline_key, pad_id, device = task.train, task.headline, side.pad_id, side.device
    initial = get_trainable(model)
    summary = base_summary(side, exp.strategy.name, Federation(ids, len(train)), initial)

    def evaluate(state) -> dict[str, float]:
        set_trainable(model, state.params)
        return task.evaluate(model, side.eval_context)

    history: list[dict] = []
    per_client: dict[str, dict[str, float]] = {}
    progress = Progress(quiet, len(ids), 1, desc="clients (local baseline)")
    for cid, shard in zip(ids, shards, strict=True):
        transport = SimulationTransport(model, {cid: train.subset(shard)}, pad_id=pad_id, seed=exp.seed, device=device)
        _, hist = run_rounds(
            strategy, transport, [cid], strategy.init(initial),
            rounds=exp.federation.rounds, per_round=1, seed=exp.seed, evaluate=evaluate,
            eval_every=exp.eval.every, callbacks=[JsonlWriter(out / "metrics.jsonl", {"client": cid})],
            eval_initial=exp.eval.initial and cid == ids[0],
        )
        history.extend({"client": cid, **r} for r in hist)
        per_client[cid] = {k[len("eval_"):]: v for k, v in hist[-1].items() if k.startswith("eval_")}
        progress.round_done(None, hist[-1])
    progress.close()
    scores = [m[headline_key] for m in per_client.values()]
    final = {
        f"{headline_key}_mean": sum(scores) / len(scores),
        f"{headline_key}_min": min(scores),
        f"{headline_key}_max": max(scores),
    }
    summary["per_client"] = per_client
    summary["note"] = "local baseline: no global model is saved"
    return finish_run(side, history, final, summary, quiet)
