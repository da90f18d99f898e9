"""Run an Experiment end to end: data, partition, model, rounds, evaluation, outputs."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune import checkpoint, tensors
from fedtune.artifacts import ModelMeta
from fedtune.attacks import DATA_ATTACKS, UPDATE_ATTACKS, Attack, AttackedTransport, flip_labels, malicious_clients
from fedtune.batching import EncodedDataset
from fedtune.channel import Channel
from fedtune.config import ConfigError, Experiment
from fedtune.lora_experiment import build_lora_strategy, lora_transport, save_base_offset, sync_model, uses_lora_aggregation
from fedtune.client import local_train
from fedtune.models import get_trainable, head_param_names, load_tokenizer, save_model, set_trainable
from fedtune.outputs import JsonlWriter, prepare_output_dir, print_table, write_summary
from fedtune.personalization import PERSONAL_STATE_KEY, per_client_report, split_holdout, with_personal
from fedtune.partition import client_ids, partition_indices, read_manifests, write_manifests
from fedtune.precision import default_device
from fedtune.runtime.parallel import ParallelSimulationTransport
from fedtune.runtime.simulation import SimulationTransport, client_seed
from fedtune.runtime.remote import RemoteClients
from fedtune.server import clients_per_round, run_rounds
from fedtune.strategies import (
    DifferentiallyPrivate, PersonalLayers, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Krum, Median, MultiKrum,
    Scaffold, Strategy, TrimmedMean,
)
from fedtune.tasks.classification_task import ClassificationTask
from fedtune.tasks.registry import build_task, task_kind
from fedtune.tasks.task import EvalContext, PartitionUnits, Task
from fedtune.types import LocalTrainConfig, RoundPlan, ServerState

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced: its folder, one record per round, and the final evaluation."""

    output_dir: Path
    history: list[dict]
    final_metrics: dict[str, float]
    summary: dict[str, Any] = field(default_factory=dict)


def local_train_config(exp: Experiment) -> LocalTrainConfig:
    """The clients' local training settings from ``[train]``."""
    t = exp.train
    return LocalTrainConfig(
        epochs=t.epochs,
        max_steps=t.max_steps,
        lr=t.lr,
        batch_size=t.batch_size,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        precision=t.precision,
        optimizer=t.optimizer,
        pad_to=exp.data.max_length if exp.data.pad_to_max_length else 0,
        length_bucketing=t.length_bucketing,
        compile=t.compile,
    )


def simulation_transport(exp: Experiment, model, client_data, *, pad_id: int, device) -> SimulationTransport:
    """The in-process transport ``[simulation]`` asks for: clients in turn, or up to K at once."""
    k = exp.simulation.parallel_clients
    channel = Channel.from_config(exp.federation)  # codec_up / codec_down
    if k > 1:
        return ParallelSimulationTransport(model, client_data, pad_id=pad_id, seed=exp.seed, device=device,
                                           parallel_clients=k, channel=channel)
    return SimulationTransport(model, client_data, pad_id=pad_id, seed=exp.seed, device=device, channel=channel)


def build_strategy(exp: Experiment, num_clients: int | None = None) -> Strategy:
    """Resolve ``[strategy]`` (and ``[privacy]``) to a Strategy object (the only place names become classes).

    ``num_clients`` is the federation's size (the partition's when None); the centralized and
    local baselines train one client at a time, so for them it is 1.
    """
    n = 1 if exp.mode != "federated" else (num_clients if num_clients is not None else exp.partition.num_clients)
    strategy = _base_strategy(exp, n)
    p = exp.privacy
    if not p.enabled:
        return strategy
    per_round = 1 if exp.mode != "federated" else clients_per_round(
        n, exp.federation.clients_per_round, exp.federation.fraction)
    try:
        return DifferentiallyPrivate(strategy, clip=p.clip, noise_multiplier=p.noise_multiplier, delta=p.delta,
                                     num_clients=n, clients_per_round=per_round, seed=exp.seed)
    except ValueError as exc:
        raise ConfigError(f"[privacy] with strategy.name = {exp.strategy.name!r}: {exc}") from None


def _base_strategy(exp: Experiment, num_clients: int) -> Strategy:
    local = local_train_config(exp)
    if uses_lora_aggregation(exp):  # model.lora.aggregation: a LoRA-aware rule replaces fedavg / fedprox's mean
        return build_lora_strategy(exp, local, num_clients)
    s = exp.strategy
    name = s.name
    lr = {"server_lr": s.server_lr} if s.server_lr > 0 else {}
    adaptive = dict(beta1=s.beta1, beta2=s.beta2, tau=s.tau, **lr)
    if name == "fedavg":
        return FedAvg(local=local)
    if name == "fedprox":
        return FedProx(local=local, mu=s.mu)
    if name == "scaffold":
        return Scaffold(local=local, num_clients=num_clients, **lr)
    if name == "fedavgm":
        return FedAvgM(local=local, momentum=s.momentum, **lr)
    if name == "fedadam":
        return FedAdam(local=local, **adaptive)
    if name == "fedyogi":
        return FedYogi(local=local, **adaptive)
    if name == "fedadagrad":
        return FedAdagrad(local=local, **adaptive)
    if name == "median":
        return Median(local=local)
    if name == "trimmed_mean":
        return TrimmedMean(local=local, beta=s.trim_beta)
    if name == "krum":
        return Krum(local=local, f=s.krum_f)
    if name == "multikrum":
        return MultiKrum(local=local, f=s.krum_f, m=s.krum_m)
    raise ValueError(f"unknown strategy {name!r}")


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


class _Progress:
    """tqdm bars for rounds and clients; silent when quiet or not on a terminal."""

    def __init__(self, quiet: bool, total_rounds: int, per_round: int, desc: str = "rounds") -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self.rounds = self.clients = None
        self.per_round = per_round
        if self.enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self.rounds = tqdm(total=total_rounds, desc=desc, position=0)

    def client_done(self, client_id: str) -> None:
        if not self.enabled:
            return
        if self.clients is None:
            self.clients = self._tqdm(total=self.per_round, desc="clients", position=1, leave=False)
        self.clients.update(1)
        self.clients.set_postfix_str(client_id)

    def round_done(self, state, record: dict) -> None:
        if not self.enabled:
            return
        if self.clients is not None:
            self.clients.close()
            self.clients = None
        self.rounds.update(1)
        shown = {k: v for k, v in record.items() if k in ("train_loss",) or k.startswith("eval_")}
        self.rounds.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if isinstance(v, float)})

    def close(self) -> None:
        if self.enabled:
            self.rounds.close()


def run_experiment(
    exp: Experiment, *, quiet: bool = False, device: torch.device | None = None, remote: RemoteClients | None = None,
    resume: bool = False,
) -> RunResult:
    """Run ``exp`` (federated, or the centralized/local baseline) and write its outputs.

    ``exp.runtime.mode`` chooses where clients train: ``simulation`` in this process; ``flower`` and
    ``flower-simulation`` hand the run to Flower (:mod:`fedtune.runtime.flower.launch`), whose ServerApp
    calls back here with ``remote``: clients that hold their own data and train behind a Transport.

    Every round is checkpointed into the output folder; ``resume`` continues from the latest
    checkpoint there (:mod:`fedtune.checkpoint`; the configuration must match it).
    """
    t_start = time.perf_counter()
    personal_tests: dict[str, EncodedDataset] = {}
    if exp.personalization.method != "none" and (exp.mode != "federated" or exp.runtime.mode != "simulation"):
        raise ConfigError("personalization runs in federated mode on the in-process simulation (runtime.mode = "
                          f"'simulation'), not mode={exp.mode!r} / runtime.mode={exp.runtime.mode!r}")
    kind = task_kind(exp)
    if kind != "classification" and exp.runtime.mode != "simulation":
        raise ConfigError(f"runtime.mode = {exp.runtime.mode!r} runs classification tasks; data.task = {kind!r} "
                          "runs on the in-process simulation (runtime.mode = 'simulation')")
    if kind != "classification" and (exp.eval.per_client or exp.personalization.method != "none"):
        raise ConfigError(f"eval.per_client and [personalization] score clients' own rows: classification only, "
                          f"not data.task = {kind!r}")
    ckpt = checkpoint.checkpoint_to_resume(exp, remote) if resume else None  # refuses early, before any loading
    if remote is None and exp.runtime.mode != "simulation":
        from fedtune.runtime.flower.launch import run_on_flower  # Flower is imported only when asked for

        return run_on_flower(exp, quiet=quiet, resume=resume)
    device = device or default_device()
    torch.manual_seed(exp.seed)
    out = prepare_output_dir(exp, resume=ckpt is not None)

    tokenizer = load_tokenizer(exp.model.name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if remote is not None:  # the server holds the eval data only; the clients hold the training data
        task: Task = ClassificationTask(remote.load_task(exp), tokenizer, exp.data.max_length)
    else:
        task = build_task(exp, tokenizer)
    train: EncodedDataset | None = None
    if remote is None:
        train = task.train
        units = make_shards(exp, task.units, task.name, out)
        ids = client_ids(len(units))
        if exp.personalization.method != "none":
            units, held_out = split_holdout(units, exp.personalization.holdout, exp.seed)
            personal_tests = {cid: train.subset(task.rows_of(rows)) for cid, rows in zip(ids, held_out)}
        shards = [task.rows_of(u) for u in units]
        train_rows = len(train)
    else:  # the training data stays on the clients' nodes; they only say who they are and how much they hold
        shards = []
        sizes = remote.connect(task.data)
        ids, train_rows = sorted(sizes), sum(sizes.values())
    log.info("%s (%s): %d train rows over %d clients", task.name, task.kind, train_rows, len(ids))

    model = task.build_model(exp.model, exp.seed).to(device)
    if exp.model.init_adapter:  # warm start from a trained peft adapter
        from fedtune.lora_merge import warm_start

        warm_start(model, exp.model.init_adapter)
    initial = get_trainable(model)
    base_sync = None  # the LoRA transport, when a rule changes the frozen base (evaluation must see it too)
    headline_key = task.headline
    ctx = EvalContext(exp.eval.batch_size, pad_id, device, exp.train.precision)
    samples_path = out / "samples.jsonl"

    def evaluate(state: ServerState) -> dict[str, float]:
        set_trainable(model, state.params)
        sync_model(base_sync, state)
        result = task.evaluate(model, ctx)
        task.write_samples(model, ctx, samples_path, state.round)
        if exp.eval.per_client:
            scores = [task.score_rows(model, train.subset(s), ctx) for s in shards]
            result[f"client_{headline_key}_mean"] = sum(scores) / len(scores)
            result[f"client_{headline_key}_min"] = min(scores)
        return result

    strategy = build_strategy(exp, num_clients=len(ids))
    if exp.personalization.method == "fedper":
        strategy = PersonalLayers(strategy, head_param_names(model))
    rounds = exp.federation.rounds
    summary: dict[str, Any] = {
        "name": exp.name, "mode": exp.mode, "dataset": task.name, "task": task.kind, "model": exp.model.name,
        "finetuning": exp.model.mode, "strategy": exp.strategy.name, "rounds": rounds,
        "num_clients": len(ids), "train_rows": train_rows, "trainable_params": tensors.numel(initial),
        "device": str(device), "headline_metric": headline_key,
    }

    if exp.mode == "local":
        history, final = _run_local(exp, strategy, model, train, shards, ids, initial, evaluate, pad_id, device,
                                    out, quiet, headline_key, summary)
    else:
        if exp.mode == "centralized":
            pooled = sorted(set().union(*map(set, shards)))
            client_data = {"centralized": train.subset(pooled)}
            clients, per_round = ["centralized"], 1
        else:
            client_data = {cid: train.subset(s) for cid, s in zip(ids, shards)}
            attackers = malicious_clients(ids, exp.attack.fraction, exp.attack.clients, exp.seed) \
                if exp.attack.kind != "none" else []
            if exp.attack.kind in DATA_ATTACKS:
                if task.kind != "classification" or not train.is_single_label:
                    raise ConfigError(f"attack.kind = {exp.attack.kind!r} flips class labels: single-label "
                                      f"classification only, not data.task = {task.kind!r}")
                num_labels = len(task.units.label_names or ())
                client_data.update({c: flip_labels(client_data[c], num_labels) for c in attackers})
            clients = ids
            per_round = clients_per_round(len(ids), exp.federation.clients_per_round, exp.federation.fraction)
        transport = remote.transport if remote is not None else \
            simulation_transport(exp, model, client_data, pad_id=pad_id, device=device)
        simulation = transport
        transport = base_sync = lora_transport(strategy, transport, model)
        if exp.mode == "federated" and exp.attack.kind in UPDATE_ATTACKS:
            a = exp.attack
            transport = AttackedTransport(transport, attackers, Attack(a.kind, a.scale, a.noise_std), exp.seed)
        if exp.mode == "federated" and exp.attack.kind != "none":
            summary["attackers"] = attackers
            log.info("attack %s by %d clients: %s", exp.attack.kind, len(attackers), attackers)
        progress = _Progress(quiet, rounds, per_round)
        start, previous = strategy.init(initial), []
        if ckpt is not None:  # server state, client states, RNGs and metrics.jsonl back to the checkpoint's round
            start, previous = checkpoint.restore(ckpt, start, simulation, out / "metrics.jsonl")
        state, history = run_rounds(
            strategy, transport, clients, start,
            rounds=rounds, per_round=per_round, seed=exp.seed, evaluate=evaluate, eval_every=exp.eval.every,
            callbacks=[JsonlWriter(out / "metrics.jsonl"), progress.round_done,
                       checkpoint.Checkpointer(out, exp, getattr(simulation, "client_states", None))],
            on_client_done=progress.client_done, eval_initial=exp.eval.initial and start.round == 0,
            wall_time_offset=ckpt.wall_time if ckpt is not None else 0.0,
        )
        history = previous + history
        progress.close()
        final = {k[len("eval_"):]: v for k, v in history[-1].items() if k.startswith("eval_") and k != "eval_time"}
        if personal_tests:
            report = _personalization_report(exp, model, state.params, simulation, client_data, personal_tests,
                                             task, ctx, pad_id, device)
            summary["personalization"] = report
            for which in ("global", "personalized"):
                final.update({f"clients_{which}_{headline_key}_{k}": v for k, v in report[which].items()})
        set_trainable(model, state.params)
        sync_model(base_sync, state)
        save_model(model, tokenizer, out / "model")
        save_base_offset(state, out / "model")
        _model_meta(exp, task, model).write(out / "model")
        summary["bytes_up_total"] = sum(r.get("bytes_up", 0) for r in history)
        summary["bytes_down_total"] = sum(r.get("bytes_down", 0) for r in history)
        summary["clients_per_round"] = per_round

    summary["final_metrics"] = final
    if task.details():
        summary["task_details"] = task.details()
    best = min if not task.higher_is_better else max
    summary["best_" + headline_key] = best(
        (r[f"eval_{headline_key}"] for r in history if f"eval_{headline_key}" in r), default=None
    )
    summary["higher_is_better"] = task.higher_is_better
    summary["wall_time"] = time.perf_counter() - t_start
    write_summary(out / "summary.json", summary)
    if not quiet:
        print_table(history, headline_key, sys.stdout)
        shown = final.get(headline_key, final.get(f"{headline_key}_mean", float("nan")))
        print(f"final {headline_key}: {shown:.4f}   "
              f"wall time {summary['wall_time']:.1f}s   outputs in {out}", file=sys.stdout)
    return RunResult(output_dir=out, history=history, final_metrics=final, summary=summary)


def _model_meta(exp: Experiment, task: Task, model) -> ModelMeta:
    """What the saved model is, for `fedtune export` and `fedtune predict`."""
    config = model.config
    return ModelMeta(
        task=task.kind, base_model=exp.model.name, num_labels=int(getattr(config, "num_labels", 0) or 0),
        problem_type=getattr(config, "problem_type", None) or "", label_names=task.units.label_names,
        max_length=exp.data.max_length, doc_stride=exp.data.doc_stride, prompt_template=exp.data.prompt_template,
        threshold=float(task.details().get("threshold", exp.eval.threshold)),
    )


def _personalization_report(exp, model, global_params, simulation, client_data, tests, task: Task,
                            ctx: EvalContext, pad_id, device) -> dict[str, Any]:
    """Score the global and each client's personalized model on that client's held-out rows."""
    cfg = exp.personalization

    def score(cid: str, params) -> float:
        set_trainable(model, params)
        return task.score_rows(model, tests[cid], ctx)

    def personal(cid: str):
        if cfg.method == "fedper" or exp.model.lora.aggregation == "fedsa":  # FedSA: the client's own B
            own = simulation.client_states.get(cid, {}).get(PERSONAL_STATE_KEY)
            return with_personal(global_params, own)
        local = dataclasses.replace(local_train_config(exp), epochs=0.0, max_steps=cfg.finetune_steps)
        plan = RoundPlan(round=exp.federation.rounds + 1, params=global_params, local=local)
        update = local_train(model, client_data[cid], plan, cid, pad_id=pad_id, device=device,
                             seed=client_seed(exp.seed, plan.round, cid))
        return tensors.add(global_params, update.delta)

    report = per_client_report(sorted(tests), score, global_params, personal)
    report["method"] = cfg.method
    return report


def _run_local(exp, strategy, model, train, shards, ids, initial, evaluate, pad_id, device, out, quiet,
               headline_key, summary):
    """Baseline: every client trains alone from the same start; each is scored on the common eval set."""
    history: list[dict] = []
    per_client: dict[str, dict[str, float]] = {}
    progress = _Progress(quiet, len(ids), 1, desc="clients (local baseline)")
    for cid, shard in zip(ids, shards):
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
    return history, final
