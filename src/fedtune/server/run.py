"""The one server run: the server's side of a federation, the round loop over a transport, the outputs.

:func:`run_federation` never looks at ``runtime.mode``: the caller builds the transport (the
simulation's in :mod:`fedtune.experiment`, a Flower ``Grid``'s in the ServerApp) and hands it in.
Both then evaluate, log, checkpoint, save and summarize through the same code.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedtune import checkpoint, tensors
from fedtune.artifacts import BASE_OFFSET_FILE, ModelMeta
from fedtune.budget import CommBudget
from fedtune.client.evaluate import HELD_OUT, TRAIN, ScoreRequest
from fedtune.config import Experiment
from fedtune.memory import release_memory
from fedtune.models import get_trainable, load_tokenizer, save_model, set_trainable
from fedtune.outputs import JsonlWriter, check_output_dir, prepare_output_dir, print_table, write_summary
from fedtune.payload import CommStats
from fedtune.personalization import per_client_report
from fedtune.precision import check_precision, check_quantization, native_bf16
from fedtune.resident import sync_base
from fedtune.server.loop import Transport, run_rounds
from fedtune.server.progress import Progress
from fedtune.strategies.base import Strategy
from fedtune.tasks.task import EvalContext, Task
from fedtune.tracking import Trackers, check_installed, open_trackers
from fedtune.types import BASE_OFFSET, ClientScore, ClientState, ServerState

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced: its folder, one record per round, and the final evaluation."""

    output_dir: Path
    history: list[dict]
    final_metrics: dict[str, float]
    summary: dict[str, Any] = field(default_factory=dict)


def build_model(task: Task, exp: Experiment, device: torch.device) -> torch.nn.Module:
    """The resident model every side builds alike: the task's head, the fine-tuning mode, a warm start."""
    model = task.build_model(exp.model, exp.seed).to(device)
    if exp.model.init_adapter:  # warm start from a trained peft adapter
        from fedtune.lora_merge import warm_start

        warm_start(model, exp.model.init_adapter)
    return model


def apply_state(model: torch.nn.Module, state: ServerState) -> None:
    """Make ``model`` the global model of ``state``: its trainable tensors and its base corrections."""
    set_trainable(model, state.params)
    sync_base(model, state.buffers.get(BASE_OFFSET, {}))


@dataclass
class ServerSide:
    """What the server holds: the configuration, the task (its evaluation data), the model, the output folder."""

    exp: Experiment
    task: Task
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    out: Path
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding id (0 when it has none)."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def eval_context(self) -> EvalContext:
        """How the server scores a model."""
        return EvalContext(self.exp.eval.batch_size, self.pad_id, self.device, self.exp.train.precision)


def pin_precision(exp: Experiment, device: torch.device, ckpt=None) -> Experiment:
    """``exp`` with ``train.precision = "auto"`` replaced by what this run uses, logged with the reason.

    A resumed run keeps its checkpoint's precision (the one its earlier rounds were trained in); a fresh
    one takes bf16 where ``device`` computes it natively, else fp32 (:func:`fedtune.precision.native_bf16`).
    The resolved value is what ``config.toml``, the round plans and evaluation see.
    """
    if exp.train.precision != "auto":
        return exp
    if ckpt is not None:
        chosen = ckpt.config.get("train", {}).get("precision", "fp32")
        why = "the checkpoint's precision"
    else:
        native, why = native_bf16(device)
        chosen = "bf16" if native else "fp32"
    log.info("train.precision = 'auto' -> %r (%s)", chosen, why)
    return dataclasses.replace(exp, train=dataclasses.replace(exp.train, precision=chosen))


def prepare_server(exp: Experiment, build_task: Callable[[Experiment, Any], Task], device: torch.device, *,
                   resume: bool, overwrite: bool = False) -> ServerSide:
    """Tokenizer, task, model and output folder of the server (``build_task(exp, tokenizer)`` loads the task).

    The folder is checked first and written last: a bad model or bad data stops the run before it
    touches an existing folder (:func:`fedtune.outputs.check_output_dir`).
    """
    t_start = time.perf_counter()
    torch.manual_seed(exp.seed)
    check_precision(exp.train.precision, device)
    check_quantization(exp.model.quantization, device)
    check_output_dir(exp, resume=resume, overwrite=overwrite)
    check_installed(exp)  # ([tracking]: a tracker library that is missing stops the run here)
    tokenizer = load_tokenizer(exp.model.name, exp.model.gguf_file)
    task = build_task(exp, tokenizer)
    model = build_model(task, exp, device)
    out = prepare_output_dir(exp, resume=resume, overwrite=overwrite)
    return ServerSide(exp, task, model, tokenizer, device, out, t_start)


@dataclass
class Federation:
    """Who the clients are, how much they hold, and where their own state lives."""

    clients: Sequence[str]
    train_rows: int
    client_states: MutableMapping[str, ClientState] | None = None
    """The clients' states when they live in this process (a ClientStateStore in a run) (checkpointed with the run); None on Flower."""
    per_round: int = 1
    data_fingerprint: str = ""
    """What the clients train on (:func:`fedtune.shards.data_fingerprint`), kept in every checkpoint."""


def model_meta(exp: Experiment, task: Task, model) -> ModelMeta:
    """What the saved model is, for `fedtune export` and `fedtune predict`."""
    config = model.config
    fields = dict(
        task=task.kind, base_model=exp.model.name, base_gguf_file=exp.model.gguf_file, num_labels=int(getattr(config, "num_labels", 0) or 0),
        problem_type=getattr(config, "problem_type", None) or "", label_names=task.units.label_names,
        max_length=exp.data.max_length, doc_stride=exp.data.doc_stride, prompt_template=exp.data.prompt_template,
        prompt_format=exp.data.prompt_format, threshold=float(task.details().get("threshold", exp.eval.threshold)),
    )
    return ModelMeta(**{**fields, **task.meta_fields()})


def save_base_offset(state: ServerState, directory: Path) -> Path | None:
    """Write the state's base corrections (fedex / flora) to ``directory``; None when there are none."""
    offset = state.buffers.get(BASE_OFFSET)
    if not offset:
        return None
    path = Path(directory) / BASE_OFFSET_FILE
    save_file({k: v.contiguous() for k, v in offset.items()}, str(path))
    return path


def base_summary(side: ServerSide, strategy_name: str, fed: Federation, initial) -> dict[str, Any]:
    """The summary fields every run has."""
    exp, task = side.exp, side.task
    return {
        "name": exp.name, "mode": exp.mode, "dataset": task.name, "task": task.kind, "model": exp.model.name,
        "finetuning": exp.model.mode, "strategy": strategy_name, "rounds": exp.federation.rounds,
        "num_clients": len(fed.clients), "train_rows": fed.train_rows, "trainable_params": tensors.numel(initial),
        "device": str(side.device), "headline_metric": task.headline,
    }


def server_strategy(side: ServerSide, num_clients: int) -> Strategy:
    """The run's strategy (``[strategy]``, ``[privacy]``, ``model.lora``), with FedPer's personal head when asked."""
    from fedtune.models import head_param_names, trainable_names
    from fedtune.personalization import personal_tensor_names
    from fedtune.strategies.from_config import build_strategy
    from fedtune.strategies.personal import PersonalLayers

    strategy = build_strategy(side.exp, num_clients=num_clients)
    if side.exp.personalization.method == "fedper":
        names = personal_tensor_names(trainable_names(side.model), head_param_names(side.model),
                                      side.exp.personalization.personal_layers)
        strategy = PersonalLayers(strategy, names)
    return strategy


def needs_holdout(exp: Experiment) -> bool:
    """Whether every client keeps ``personalization.holdout`` of its rows out of training, to score on."""
    return exp.personalization.method != "none" or exp.eval.federated


def score_mode(exp: Experiment) -> str:
    """What a client's personalized model is: its own personal tensors (FedPer, FedSA's B) or fine-tuned."""
    p = exp.personalization.method
    if p == "none":
        return "none"
    return "fedper" if p == "fedper" or exp.model.lora.aggregation == "fedsa" else p


def gather_scores(strategy: Strategy, transport, state: ServerState, clients: Sequence[str],
                  request: ScoreRequest) -> list[ClientScore]:
    """Every client scores the model it would train from after ``state`` (the next round's plan)."""
    plan = strategy.configure(state.round + 1, state, list(clients))
    return list(transport.score_round(plan, list(clients), request, CommStats()))


def weighted_score(scores: Sequence[ClientScore], key: str = "global") -> float:
    """The example-weighted mean of the clients' ``key`` scores."""
    total = sum(s.num_examples for s in scores)
    return sum(s.num_examples * s.scores[key] for s in scores) / total


def run_federation(
    side: ServerSide,
    strategy: Strategy,
    transport: Transport,
    fed: Federation,
    *,
    quiet: bool = False,
    ckpt: checkpoint.Checkpoint | None = None,
    summary: dict[str, Any] | None = None,
) -> RunResult:
    """Run the rounds of ``side.exp`` over ``transport`` and write every output of the run.

    ``ckpt`` continues from a checkpoint (its client states go back into ``fed.client_states``).
    Client-side scores (``eval.federated``, ``eval.per_client``, ``[personalization]``) are asked of
    the clients through ``transport.score_round``, so they are computed where the rows are.
    ``[tracking]``: every round goes to the trackers too; a run that raises ends their runs FAILED.
    """
    with open_trackers(side.exp, side.out) as trackers:
        return _run_federation(side, strategy, transport, fed, trackers, quiet=quiet, ckpt=ckpt, summary=summary)


def _run_federation(side: ServerSide, strategy: Strategy, transport: Transport, fed: Federation, trackers: Trackers,
                    *, quiet: bool, ckpt: checkpoint.Checkpoint | None, summary: dict[str, Any] | None) -> RunResult:
    exp, task, model = side.exp, side.task, side.model
    out, ctx, headline = side.out, side.eval_context, side.task.headline
    samples_path = out / "samples.jsonl"
    initial = get_trainable(model)
    summary = {**base_summary(side, exp.strategy.name, fed, initial), **(summary or {})}

    def evaluate(state: ServerState) -> dict[str, float]:
        release_memory()  # the heap training freed: back to the OS before evaluation allocates its own sizes
        apply_state(model, state)
        result = task.evaluate(model, ctx)
        task.write_samples(model, ctx, samples_path, state.round)
        release_memory()  # evaluation's blocks differ in size from training's: hand them back
        if exp.eval.federated:  # each client scores the global model on its own held-out rows
            scores = gather_scores(strategy, transport, state, fed.clients, ScoreRequest(HELD_OUT))
            result[f"fed_{headline}"] = weighted_score(scores)
        if exp.eval.per_client:  # ... and on its own training rows
            values = [s.scores["global"] for s in
                      gather_scores(strategy, transport, state, fed.clients, ScoreRequest(TRAIN))]
            result[f"client_{headline}_mean"] = sum(values) / len(values)
            result[f"client_{headline}_min"] = min(values)
        return result

    rounds = exp.federation.rounds
    progress = Progress(quiet, rounds, fed.per_round)
    previous: list[dict] = []
    start = strategy.init(initial)
    if ckpt is not None:  # server state, client states, RNGs and metrics.jsonl back to the checkpoint's round
        start, previous = checkpoint.restore(ckpt, start, fed.client_states, out / "metrics.jsonl")
        trackers.log_history(previous)  # (a resumed run is a new tracked run: it gets the earlier rounds too)
    resumed_time = ckpt.wall_time if ckpt is not None else 0.0  # (a resumed run continues its clock)
    state, history = run_rounds(
        strategy, transport, list(fed.clients), start,
        rounds=rounds, per_round=fed.per_round, seed=exp.seed, evaluate=evaluate, eval_every=exp.eval.every,
        callbacks=[JsonlWriter(out / "metrics.jsonl"), progress.round_done,
                   checkpoint.Checkpointer(out, exp, fed.client_states, fed.data_fingerprint), trackers],
        on_client_done=progress.client_done, eval_initial=exp.eval.initial and start.round == 0,
        wall_time_offset=resumed_time,
        stop=CommBudget(exp.federation.comm_budget_bytes, exp.federation.budget_action, previous),
    )
    history = previous + history
    progress.close()
    final = {k[len("eval_"):]: v for k, v in history[-1].items() if k.startswith("eval_") and k != "eval_time"}
    mode = score_mode(exp)
    if mode != "none":  # each client's personalized model beside the global one, on its held-out rows
        request = ScoreRequest(HELD_OUT, mode, exp.personalization.finetune_steps)
        report = per_client_report(gather_scores(strategy, transport, state, fed.clients, request),
                                   task.higher_is_better)
        summary["personalization"] = {**report, "method": exp.personalization.method}
        for which in ("global", "personalized"):
            final.update({f"clients_{which}_{headline}_{k}": v for k, v in report[which].items()})
    apply_state(model, state)
    save_model(model, side.tokenizer, out / "model")
    save_base_offset(state, out / "model")
    model_meta(exp, task, model).write(out / "model")
    if history and history[-1].get("stopped"):
        summary["stopped"] = history[-1]["stopped"]
    summary["bytes_up_total"] = sum(r.get("bytes_up", 0) for r in history)
    summary["bytes_down_total"] = sum(r.get("bytes_down", 0) for r in history)
    summary["clients_per_round"] = fed.per_round
    return finish_run(side, history, final, summary, quiet, wall_time_offset=resumed_time, trackers=trackers)


def finish_run(side: ServerSide, history: list[dict], final: dict[str, float], summary: dict[str, Any],
               quiet: bool, *, wall_time_offset: float = 0.0, trackers: Trackers | None = None) -> RunResult:
    """Write ``summary.json`` (final and best metrics, wall time), print the table; the RunResult.

    ``wall_time_offset``: the wall time a resumed run had reached at its checkpoint, so the summary
    counts the whole run, not only the last process. ``trackers``: the run's trackers, which get the
    final files and are ended FINISHED; None opens them here (``[tracking]``) and logs ``history`` first
    (the local baseline, whose rounds ran without them).
    """
    task, headline = side.task, side.task.headline
    summary["final_metrics"] = final
    if task.details():
        summary["task_details"] = task.details()
    best = min if not task.higher_is_better else max
    summary["best_" + headline] = best(
        (r[f"eval_{headline}"] for r in history if f"eval_{headline}" in r), default=None
    )
    summary["higher_is_better"] = task.higher_is_better
    summary["wall_time"] = wall_time_offset + time.perf_counter() - side.t_start
    write_summary(side.out / "summary.json", summary)
    if trackers is None:
        with open_trackers(side.exp, side.out) as trackers:
            trackers.log_history(history)
            trackers.finish(side.out, log_model=side.exp.tracking.log_model)
    else:
        trackers.finish(side.out, log_model=side.exp.tracking.log_model)
    if not quiet:
        print_table(history, headline, sys.stdout)
        shown = final.get(headline, final.get(f"{headline}_mean", float("nan")))
        print(f"final {headline}: {shown:.4f}   "
              f"wall time {summary['wall_time']:.1f}s   outputs in {side.out}", file=sys.stdout)
    return RunResult(output_dir=side.out, history=history, final_metrics=final, summary=summary)
