"""FlowerTransport: the round loop's Transport over a Flower ``Grid`` (SuperLink or simulation engine).

Client ids are the nodes' own: at start the server sends every connected node an IDENTIFY
query, and each node answers with the client id from its node config
(:mod:`fedtune.runtime.flower.node`). The server keeps ``client id -> node id`` and addresses
each sampled client's RoundPlan to its node. Replies are yielded as they arrive, so the
strategy's streaming aggregate consumes them one by one, in sampled order (see ``run_round``). ``bytes_down`` / ``bytes_up`` count
the serialized records of every message actually sent (:func:`messages.encoded_size`): the codec
payloads (``[federation] codec_down`` / ``codec_up``, see :mod:`fedtune.channel`) plus Flower's
record framing (a few hundred bytes per message).

Nodes come and go: a SuperNode that restarts registers as a new Flower node. Every round, and
while a round waits for replies, the transport asks any node it has not seen yet which client it
is; a known client that answers from a new node is re-homed there, and when its plan for the
round is still unanswered the plan is sent again to the new node (one update per client and
round at most: the first reply wins, later ones are dropped). Every client that gives no update
is named, with its reason, in the round's ``CommStats.failed`` (the ``failed`` list of its
metrics.jsonl record).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedtune.channel import Channel, client_view
from fedtune.client.evaluate import ScoreRequest
from fedtune.codecs import CodecError
from fedtune.config import Experiment, RuntimeConfig
from fedtune.errors import one_line
from fedtune.payload import CommStats
from fedtune.runtime.flower import messages
from fedtune.tasks.data import load_task_data
from fedtune.tasks.task import Task
from fedtune.types import ClientScore, ClientUpdate, RoundPlan

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The federation cannot proceed: too few nodes, a node that cannot identify, clashing client ids."""


def server_task(exp: Experiment, tokenizer) -> Task:
    """The task as the server needs it: its evaluation data (and label vocabulary); the clients' rows stay home.

    Classification from local files with ``data.label_names`` set (or regression) reads only
    ``data.eval_file``; every other task is built from the server's copy of the experiment's data
    (its training rows are never trained on here: they only fix held-out splits and vocabularies).
    """
    from fedtune.tasks.registry import build_task, task_kind

    d = exp.data
    files = d.dataset.strip() == "files" or d.train_file
    if task_kind(exp) == "classification" and files and d.eval_file and (d.label_names or d.regression):
        from fedtune.tasks.classification_task import ClassificationTask

        data = load_task_data(dataclasses.replace(d, train_file=d.eval_file, train_size=0), seed=exp.seed)
        return ClassificationTask(data, tokenizer, d.max_length, exp.eval)
    if files and task_kind(exp) == "classification":
        log.warning("data.label_names is empty: the server reads %s only to infer the label names; "
                    "set data.label_names so it needs no training file", d.train_file)
    return build_task(exp, tokenizer)


class FlowerTransport:
    """The round loop's Transport to fedtune clients running the ClientApp on Flower nodes."""

    def __init__(self, grid: Grid, runtime: RuntimeConfig, expected_clients: int, *, poll: float = 0.2,
                 channel: Channel | None = None) -> None:
        self.grid = grid
        self.channel = channel if channel is not None else Channel()
        """The federation's codecs: plans go out with ``channel.down``, replies must use ``channel.up``."""
        self.runtime = runtime
        self.needed = runtime.min_clients or expected_clients
        self.poll = poll
        self.nodes: dict[str, int] = {}
        """client id -> Flower node id, from the nodes' IDENTIFY replies."""
        self.task = messages.TaskInfo(label_names=None)
        self.failures: list[tuple[int, str, str]] = []
        """(round, client id, reason) of every client that failed or timed out."""
        self.missing: list = []
        """Keys of the messages that got no reply in the last exchange."""
        self.sizes: dict[str, int] = {}
        """client id -> training rows, from the IDENTIFY replies."""
        self.seen: set[int] = set()
        """Node ids asked (or being asked) which client they are."""
        self.asking: dict[str, int] = {}
        """Message id -> node id of IDENTIFY requests sent to nodes that joined after the start."""
        self._next_look = 0.0
        self.timings: list[dict] = []
        """One record per reply: kind, round, client, ``round_trip`` seconds and the node's ``phases``
        (:mod:`fedtune.runtime.flower.node_timing`); appended to ``timing_log`` when it is set."""
        self.timing_log: Path | None = None
        self._round_trips: dict[Any, float] = {}

    def connect(self, label_names: Sequence[str] | None) -> dict[str, int]:
        """Wait for enough SuperNodes, ask each which client it is; return ``{client_id: num_examples}``.

        ``label_names`` (the server task's vocabulary, None when it has none) go to every node, whose
        data must use them.
        """
        self.task = messages.TaskInfo(tuple(label_names) if label_names is not None else None)
        deadline = time.monotonic() + self.runtime.connect_timeout
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < self.needed:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(nodes)} of {self.needed} SuperNodes connected within "
                    f"runtime.connect_timeout = {self.runtime.connect_timeout:g}s"
                )
            time.sleep(self.poll * 5)
            nodes = list(self.grid.get_node_ids())
        log.info("%d SuperNodes connected; identifying them", len(nodes))
        self.seen.update(int(n) for n in nodes)
        content = messages.encode_identify_request(self.task)
        out = [Message(content, dst_node_id=n, message_type=messages.IDENTIFY) for n in nodes]
        sizes: dict[str, int] = {}
        for node_id, reply in self._exchange(out, deadline, nodes, "identify"):
            if reply.has_error():
                raise FederationError(f"SuperNode {node_id} could not identify: {error_text(reply)}")
            ident = messages.decode_identity(reply.content)
            if ident.client_id in self.nodes:
                raise FederationError(f"SuperNodes {self.nodes[ident.client_id]} and {node_id} both claim "
                                      f"client id {ident.client_id!r}; give each node its own client-id")
            self.nodes[ident.client_id] = int(node_id)
            sizes[ident.client_id] = ident.num_examples
            self._note_timing("identify", 0, ident.client_id, node_id, reply)
        self.sizes = sizes
        if len(sizes) < self.needed:
            raise FederationError(f"only {len(sizes)} of {self.needed} SuperNodes identified within "
                                  f"runtime.connect_timeout = {self.runtime.connect_timeout:g}s")
        log.info("clients: %s", ", ".join(f"{c} (node {self.nodes[c]}, {sizes[c]} rows)" for c in sorted(sizes)))
        return sizes

    def run_round(self, plan: RoundPlan, clients: Sequence[str], stats: CommStats) -> Iterator[ClientUpdate]:
        """Send each sampled client its plan; yield the updates in sampled order as they arrive.

        Replies are decoded as they come in, but handed on in the order of ``clients``, so the
        aggregate sums in the same order as the simulation (float sums are order-sensitive; this
        is what makes the two runtimes agree to 1e-6 and runs reproducible). An update waits only
        for the earlier clients' replies. A client whose node restarts while the round waits gets
        its plan again on the new node; one that is offline (and does not come back while the
        others train), fails or times out (``runtime.round_timeout``) is skipped, logged and named
        in ``stats.failed``, and the round goes on with the others as long as :meth:`quorum` of
        them answered (else :class:`FederationError`).
        """
        unknown = [c for c in clients if c not in self.nodes]
        if unknown:
            raise FederationError(f"round {plan.round}: no SuperNode serves client(s) {unknown}")
        need = self.quorum(len(clients))
        self._rejoin()
        online = self._online(plan.round, clients, need)
        if self.runtime.secagg:
            for cid in clients:
                if cid not in online:
                    self._fail(plan.round, cid, "offline", stats)
            update, summed = self._secagg_round(plan, online, stats)
            self._check_quorum(plan.round, len(summed), len(online), need)
            yield update
            return
        contents: dict[int, Any] = {}
        shared = messages.SharedPayloads(self.channel.down)
        arrived: dict[int, ClientUpdate | None] = {}
        next_up = answered = 0

        def train_message(i: int) -> Message:
            cid = clients[i]
            if i not in contents:
                contents[i] = messages.encode_train_request(
                    messages.TrainRequest(cid, client_view(plan, cid), self.task, self.channel), shared)
            stats.bytes_down += messages.encoded_size(contents[i])
            return Message(contents[i], dst_node_id=self.nodes[cid], message_type=messages.TRAIN,
                           group_id=str(plan.round))

        def resend() -> list[tuple[Message, int]]:  # clients whose node restarted while the round waits
            again = []
            for cid, old, new in self._rejoin():
                i = clients.index(cid) if cid in clients else -1
                if i >= next_up and i not in arrived:
                    log.warning("round %d: client %s is back on SuperNode %d (was %d); its plan is sent there",
                                plan.round, cid, new, old)
                    again.append((train_message(i), i))
                    stats.restarted.append(cid)
            return again

        out = [(train_message(i), i) for i, cid in enumerate(clients) if cid in online]
        deadline = time.monotonic() + self.runtime.round_timeout
        for i, reply in self._exchange([m for m, _ in out], deadline, [i for _, i in out], f"round {plan.round}",
                                       resend=resend):
            self._note_timing("train", plan.round, clients[i], i, reply)
            arrived[i] = self._decode(plan, clients[i], reply, stats)
            while next_up in arrived:
                decoded = arrived.pop(next_up)
                next_up += 1
                if decoded is not None:
                    answered += 1
                    yield decoded
        for i in self.missing:
            self._fail(plan.round, clients[i], "timeout", stats)
        for i, cid in enumerate(clients):
            if i not in contents:
                self._fail(plan.round, cid, "offline", stats)
        for i in sorted(arrived):  # replies queued behind a client that never answered
            queued = arrived[i]
            if queued is not None:
                answered += 1
                yield queued
        self._check_quorum(plan.round, answered, len(clients), need)

    def score_round(self, plan: RoundPlan, clients: Sequence[str], request: ScoreRequest,
                    stats: CommStats) -> Iterator[ClientScore]:
        """Ask each client (an EVALUATE message) to score the plan's model on its own rows; yield in client order.

        A client that fails or times out is logged and left out (the scores are a mean over those that answered).
        """
        clients = [c for c in clients if c in self.nodes]
        out = []
        shared = messages.SharedPayloads(self.channel.down)
        for cid in clients:
            content = messages.encode_score_request(
                messages.TrainRequest(cid, client_view(plan, cid), self.task, self.channel), request, shared)
            stats.bytes_down += messages.encoded_size(content)
            out.append(Message(content, dst_node_id=self.nodes[cid], message_type=messages.SCORE,
                               group_id=f"score-{plan.round}"))
        deadline = time.monotonic() + self.runtime.round_timeout
        got: dict[int, ClientScore] = {}
        for i, reply in self._exchange(out, deadline, list(range(len(clients))), f"scoring before round {plan.round}"):
            if reply.has_error():
                log.error("client %s could not score: %s", clients[i], error_text(reply))
                self._fail(plan.round, clients[i], f"scoring: {error_text(reply)}", stats)
                continue
            stats.bytes_up += messages.encoded_size(reply.content)
            self._note_timing("score", plan.round, clients[i], i, reply)
            got[i] = messages.decode_score(reply.content)
        if not got:
            raise FederationError(f"no client answered the scoring request before round {plan.round}")
        for i in sorted(got):
            yield got[i]

    def quorum(self, sampled: int) -> int:
        """Answers a round needs: ``runtime.min_clients`` (at most the sampled count), or 1 when it is 0."""
        return min(self.runtime.min_clients, sampled) if self.runtime.min_clients > 0 else 1

    def _note_timing(self, kind: str, rnd: int, cid: str, key: Any, reply: Message) -> None:
        """Keep (and log to ``timing_log``) where the reply's time went: its round trip and the node's phases."""
        if reply.has_error():
            return
        try:
            phases = messages.read_timing(reply.content)
        except messages.MessageError as exc:  # diagnostics only: the reply itself is judged by its decoder
            log.warning("%s %d: client %s sent unreadable timings: %s", kind, rnd, cid, exc)
            phases = {}
        record = {"kind": kind, "round": rnd, "client": cid,
                  "round_trip": round(self._round_trips.get(key, float("nan")), 3),
                  "phases": {k: round(v, 3) for k, v in phases.items()}}
        self.timings.append(record)
        log.debug("%s %d client %s: %s", kind, rnd, cid, record)
        if self.timing_log is not None:
            with open(self.timing_log, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _fail(self, rnd: int, cid: str, why: str, stats: CommStats | None = None) -> None:
        self.failures.append((rnd, cid, why))
        if stats is not None:
            stats.failed.append((cid, why))

    def _rejoin(self) -> list[tuple[str, int, int]]:
        """Ask nodes that joined since the start which client they are; return (client, old node, new node) of
        every client now served by another node (a SuperNode that restarted registers as a new node)."""
        now = time.monotonic()
        new_nodes = []
        if now >= self._next_look:  # (at most once a second: one SuperLink call)
            self._next_look = now + 1.0
            new_nodes = [int(n) for n in self.grid.get_node_ids() if int(n) not in self.seen]
        if new_nodes:
            self.seen.update(new_nodes)
            content = messages.encode_identify_request(self.task)
            ids = self.grid.push_messages([Message(content, dst_node_id=n, message_type=messages.IDENTIFY)
                                           for n in new_nodes])
            self.asking.update(zip(ids, new_nodes, strict=True))
        if not self.asking:
            return []
        moved = []
        for reply in self.grid.pull_messages(list(self.asking)):
            node_id = self.asking.pop(reply.metadata.reply_to_message_id, None)
            if node_id is None:
                continue
            if reply.has_error():
                log.error("SuperNode %d joined but could not identify: %s", node_id, error_text(reply))
                continue
            ident = messages.decode_identity(reply.content)
            old = self.nodes.get(ident.client_id)
            if old is None:
                log.warning("SuperNode %d joined as client %s, which is not in this run's federation (fixed at "
                            "its start); it is not sampled", node_id, ident.client_id)
            elif old != node_id:
                log.warning("client %s now answers from SuperNode %d (was %d)", ident.client_id, node_id, old)
                moved.append((ident.client_id, old, node_id))
            self.nodes[ident.client_id] = node_id
            self.sizes[ident.client_id] = ident.num_examples
        return moved

    def _online(self, rnd: int, clients: Sequence[str], need: int) -> list[str]:
        """The sampled clients whose nodes the SuperLink lists as online (FederationError when fewer than ``need``)."""
        online = set(self.grid.get_node_ids())
        gone = [c for c in clients if self.nodes[c] not in online]
        for cid in gone:
            log.error("round %d: client %s (node %d) is offline; left out unless it is back before the others "
                      "answer", rnd, cid, self.nodes[cid])
        if len(clients) - len(gone) < need:
            raise FederationError(
                f"round {rnd}: only {len(clients) - len(gone)} of {len(clients)} sampled clients are online "
                f"(offline: {gone}); runtime.min_clients = {self.runtime.min_clients} needs {need}"
            )
        return [c for c in clients if c not in gone]

    def _check_quorum(self, rnd: int, answered: int, sampled: int, need: int) -> None:
        if answered < need:
            failed = [f"{c} ({why})" for r, c, why in self.failures if r == rnd]
            raise FederationError(
                f"round {rnd}: only {answered} of {sampled} clients answered within runtime.round_timeout = "
                f"{self.runtime.round_timeout:g}s, runtime.min_clients = {self.runtime.min_clients} needs {need}; "
                f"failed: {', '.join(failed) or 'none'}"
            )

    def _secagg_round(self, plan: RoundPlan, clients: Sequence[str],
                      stats: CommStats) -> tuple[ClientUpdate, list[str]]:
        """One SecAgg+ round (:mod:`.secagg`): the weighted mean as a single update, and the clients in it."""
        from fedtune.runtime.flower import secagg

        if len(clients) < 2:
            raise FederationError(f"round {plan.round}: SecAgg+ needs at least 2 clients per round, got {len(clients)}")
        big = {c: self.sizes[c] for c in clients if self.sizes.get(c, 0) > self.runtime.secagg_max_weight}
        if big:
            raise FederationError(f"round {plan.round}: client(s) {big} hold more examples than "
                                  f"runtime.secagg_max_weight = {self.runtime.secagg_max_weight:g}; raise it")
        shared = messages.SharedPayloads(self.channel.down)
        requests = {
            self.nodes[c]: messages.encode_train_request(messages.TrainRequest(c, plan, self.task, self.channel), shared)
            for c in clients
        }
        client_of = {self.nodes[c]: c for c in clients}
        update, summed = secagg.aggregate_round(_CountingGrid(self.grid, stats), self.runtime, plan.round,
                                                secagg.delta_names(plan.params), requests, client_of)
        for c in clients:
            if c not in summed:
                self._fail(plan.round, c, "left the SecAgg+ round", stats)
        return update, summed

    def _decode(self, plan: RoundPlan, cid: str, reply: Message, stats: CommStats) -> ClientUpdate | None:
        rnd = plan.round
        if reply.has_error():
            log.error("round %d: client %s failed: %s", rnd, cid, error_text(reply))
            self._fail(rnd, cid, error_text(reply), stats)
            return None
        stats.bytes_up += messages.encoded_size(reply.content)
        try:
            update = self.channel.decode_update(messages.decode_update(reply.content), plan)
        except (messages.MessageError, CodecError) as exc:
            log.error("round %d: client %s sent an unreadable update: %s", rnd, cid, exc)
            self._fail(rnd, cid, f"unreadable update: {exc}", stats)
            return None
        if update.client_id != cid:
            log.error("round %d: the node of client %s answered as %s; dropped", rnd, cid, update.client_id)
            self._fail(rnd, cid, f"answered as {update.client_id}", stats)
            return None
        return update

    def _exchange(self, out: list[Message], deadline: float, keys: list, what: str,
                  resend: Callable[[], list[tuple[Message, Any]]] | None = None) -> Iterator[tuple[Any, Message]]:
        """Push ``out`` (``keys[i]`` names ``out[i]``); yield ``(key, reply)`` as replies arrive until ``deadline``.

        ``resend`` (polled while waiting) returns further ``(message, key)`` pairs to push for keys it
        knows are still waiting (a client's plan again, to its restarted node). Each key yields at most
        once: the first reply wins and the key's other messages are forgotten. Keys without a reply by
        the deadline are left in ``self.missing`` (and logged).
        """
        self.missing = []
        pending = dict(zip(self.grid.push_messages(out), keys, strict=True))
        start = time.monotonic()
        sent = dict.fromkeys(keys, start)
        self._round_trips = {}
        done: set = set()
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is not None and key not in done:
                    done.add(key)
                    self._round_trips[key] = time.monotonic() - sent.get(key, start)
                    pending = {m: k for m, k in pending.items() if k != key}
                    yield key, reply
            if not pending:
                break
            if resend is not None:
                again = resend()
                if again:
                    pending.update(zip(self.grid.push_messages([m for m, _ in again]), [k for _, k in again], strict=True))
                    sent.update(dict.fromkeys((k for _, k in again), time.monotonic()))  # a plan sent again
            if time.monotonic() > deadline:
                self.missing = sorted(set(pending.values()))
                log.error("%s: no reply from %s before the timeout", what, ", ".join(map(str, self.missing)))
                return
            time.sleep(self.poll)


_FLOWER_REASON = re.compile(r"^<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>$", re.DOTALL)


def error_text(reply: Message) -> str:
    """A failed reply's reason as ``Type: message`` on one line (Flower sends ``<class 'Type'>:<'message'>``)."""
    reason = str(reply.error.reason)
    m = _FLOWER_REASON.match(reason.strip())
    return one_line(f"{m.group(1)}: {m.group(2)}" if m else reason)


class _CountingGrid:
    """A Grid for Flower's SecAgg+ workflow that counts the bytes of every message it carries."""

    def __init__(self, grid: Grid, stats: CommStats) -> None:
        self.grid = grid
        self.stats = stats

    def send_and_receive(self, out: Any, *, timeout: float | None = None) -> list[Message]:
        """``Grid.send_and_receive``, adding the serialized size of requests and replies to the round's stats."""
        out = list(out)
        self.stats.bytes_down += sum(messages.encoded_size(m.content) for m in out)
        replies = list(self.grid.send_and_receive(out, timeout=timeout))
        self.stats.bytes_up += sum(messages.encoded_size(r.content) for r in replies if not r.has_error())
        return replies
