"""The Flower ClientApp: the one client runtime, ``fedtune.client.local_train``, on the node's own data.

The node builds the experiment's task on its own rows (every task kind: the registry's Task, with the
server's label names), the model with that task's head (:func:`fedtune.server.run.build_model`, as
the server does), and trains whatever the RoundPlan declares: its objective, a LoRA rule's client
half, personal tensors, base corrections (all decoded generically, :mod:`fedtune.wire`).

Two message handlers:

- ``query.identify``: answer which fedtune client this node is (node config, see
  :mod:`fedtune.runtime.flower.node`) and how many training rows it holds.
- ``train``: decode the RoundPlan (with the request's downlink codec), train on the node's rows with
  the seed the simulation would use for (seed, round, client id), reply with the ClientUpdate encoded
  with the uplink codec (error feedback residuals in the client state). In a SecAgg+ round the
  handler runs inside Flower's ``secaggplus_mod`` and replies with its delta as a ``FitRes``, which
  the mod masks before anything leaves the node (:mod:`fedtune.runtime.flower.secagg`). The client's persistent state
  (``ClientState``: SCAFFOLD's control variate, codec residuals, ...) lives in ``context.state``
  as ArrayRecords, so it survives between rounds on this node and never leaves it.

Loaded models and encoded rows are cached per process (Flower's simulation engine reuses its
workers); a deployed SuperNode starts a fresh ClientApp process per message (in both of Flower's
isolation modes), so the node's tokenized rows are also cached on disk (:mod:`fedtune.encode_cache`)
and every message reports where its time went (:mod:`fedtune.runtime.flower.node_timing`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune import encode_cache
from fedtune.attacks import byzantine_update, poison_rows
from fedtune.client import local_train
from fedtune.client.evaluate import HELD_OUT, client_scores
from fedtune.config import Experiment
from fedtune.memory import configure_allocator
from fedtune.models import load_tokenizer
from fedtune.precision import default_device
from fedtune.runtime.flower import messages, secagg
from fedtune.runtime.flower.experiment_source import ExperimentSource
from fedtune.runtime.flower.node import NodeData
from fedtune.runtime.flower.node_timing import PhaseClock  # first: its import time starts the "imports" phase
from fedtune.runtime.simulation import client_seed
from fedtune.server.run import build_model, needs_holdout
from fedtune.tasks.task import EvalContext
from fedtune.types import ClientScore

log = logging.getLogger(__name__)
_IMPORTS_DONE = time.time()
_FIRST_MESSAGE = [True]


def _clock() -> PhaseClock:
    """A PhaseClock for this message; the process's start-up phases go to its first message only."""
    clock = PhaseClock()
    if _FIRST_MESSAGE[0]:
        _FIRST_MESSAGE[0] = False
        clock.start_of_process(_IMPORTS_DONE, time.time())
    return clock


@dataclass
class _Resident:
    """This process's resident model and task, this node's encoded training rows and held-out rows."""

    model: torch.nn.Module
    task: Any
    rows: Any
    held_out: Any
    pad_id: int
    attack: Any = None
    """This node's byzantine behaviour (fedtune.attacks), or None."""


_RESIDENT: dict[tuple, _Resident] = {}


def _resident(exp: Experiment, node: NodeData, task_info: messages.TaskInfo, device: torch.device,
              clock: PhaseClock | None = None) -> _Resident:
    """Build (once per process) the task on this node's data and the model with the task's head."""
    clock = clock if clock is not None else PhaseClock()
    key = (exp.to_toml(), node, task_info, str(device))
    if key not in _RESIDENT:
        _RESIDENT.clear()  # one resident model per process
        with clock.phase("tokenizer"):
            tokenizer = load_tokenizer(exp.model.name, exp.model.gguf_file)
        with clock.phase("data"), encode_cache.enabled():  # later messages read the rows back (encode_cache)
            task, rows, held_out = node.load_task(exp, task_info.label_names, tokenizer,
                                                  holdout=exp.personalization.holdout if needs_holdout(exp) else 0.0)
        attack = node.attack_in(exp)
        if attack is not None:
            log.warning("client %s is byzantine: %s", node.client_id, attack)
            rows = poison_rows(rows, attack, len(task_info.label_names or ()))
        with clock.phase("model"):
            model = build_model(task, exp, device)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        _RESIDENT[key] = _Resident(model, task, rows, held_out, pad_id, attack)
    return _RESIDENT[key]


def make_client_app(experiment: ExperimentSource, manifest_dir: str | Path | None = None) -> ClientApp:
    """A ClientApp training fedtune clients; ``experiment`` builds the Experiment from the run config.

    ``manifest_dir`` is the partition folder for Flower-simulation virtual nodes (``partition-id``).
    """
    configure_allocator()  # FEDTUNE_ALLOCATOR=bounded: freed tensors go back to the OS (fedtune.memory)
    app = ClientApp()

    def node_of(context: Context) -> NodeData:
        node = NodeData.from_node_config(context.node_config, manifest_dir)
        if node.threads and torch.get_num_threads() != node.threads:
            torch.set_num_threads(node.threads)
        return node

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        clock = _clock()
        exp = experiment(context.run_config)
        task = messages.decode_identify_request(msg.content)
        node = node_of(context)
        rows = _resident(exp, node, task, default_device(), clock).rows
        log.info("node %s is client %s with %d rows (%s)", context.node_id, node.client_id, len(rows), clock.summary())
        content = messages.encode_identity(messages.Identity(node.client_id, len(rows)))
        return Message(messages.with_timing(content, clock.phases), reply_to=msg)

    @app.train(mods=[secagg.client_mod])
    def train(msg: Message, context: Context) -> Message:
        clock = _clock()
        exp = experiment(context.run_config)
        request = messages.decode_train_request(msg.content)
        node = node_of(context)
        if request.client_id != node.client_id:
            raise ValueError(f"node {context.node_id} is client {node.client_id!r}, "
                             f"but the server addressed client {request.client_id!r}")
        if node.require_secagg and not secagg.is_secagg(msg.content):
            raise PermissionError(f"client {node.client_id} trains only in SecAgg+ rounds (node-config "
                                  "require-secagg = true); the server asked for a plain update "
                                  "(runtime.secagg = false)")
        device = default_device()
        resident = _resident(exp, node, request.task, device, clock)
        state = messages.load_client_state(context.state)
        with clock.phase("train"):
            update = local_train(
                resident.model, resident.rows, request.plan, node.client_id, pad_id=resident.pad_id,
                seed=client_seed(exp.seed, request.plan.round, node.client_id), device=device, state=state,
            )
        update = byzantine_update(update, resident.attack, exp.seed, request.plan.round)
        if secagg.is_secagg(msg.content):  # secaggplus_mod masks the delta and drops the plain arrays
            messages.save_client_state(state, context.state)
            secagg.seed_rounding(client_seed(exp.seed, request.plan.round, f"{node.client_id}/secagg"))
            return Message(secagg.encode_reply(update, secagg.delta_names(request.plan.params)), reply_to=msg)
        with clock.phase("encode"):
            encoded = request.channel.encode_update(update, state, request.plan)  # codec_up; feedback in state
            messages.save_client_state(state, context.state)
            content = messages.encode_update(encoded)
        log.info("client %s round %d: %s", node.client_id, request.plan.round, clock.summary())
        return Message(messages.with_timing(content, clock.phases), reply_to=msg)

    @app.evaluate()
    def score(msg: Message, context: Context) -> Message:
        clock = _clock()
        exp = experiment(context.run_config)
        request, what = messages.decode_score_request(msg.content)
        node = node_of(context)
        if request.client_id != node.client_id:
            raise ValueError(f"node {context.node_id} is client {node.client_id!r}, "
                             f"but the server addressed client {request.client_id!r}")
        device = default_device()
        resident = _resident(exp, node, request.task, device, clock)
        ctx = EvalContext(exp.eval.batch_size, resident.pad_id, device, request.plan.local.precision)
        rows = resident.held_out if what.rows == HELD_OUT else resident.rows
        with clock.phase("score"):
            scores = client_scores(resident.model, resident.task, request.plan, node.client_id, what,
                                   train_rows=resident.rows, held_out=resident.held_out,
                                   state=messages.load_client_state(context.state), ctx=ctx,
                                   seed=client_seed(exp.seed, request.plan.round, node.client_id))
        reply = ClientScore(node.client_id, len(rows) if rows is not None else 0, scores)
        return Message(messages.with_timing(messages.encode_score(reply), clock.phases), reply_to=msg)

    return app
