"""The Flower ServerApp: the one server run (:func:`fedtune.server.run.run_federation`) over a FlowerTransport.

The strategy, sampling, validation, evaluation of the global model (on the server's eval split)
and outputs (``metrics.jsonl``, ``summary.json``, ``model/``) are exactly the simulation's; only
the Transport differs. A relative ``output_dir`` resolves against the working directory of the
process running the ServerApp (for a deployed SuperLink: the folder ``flower-superlink`` was
started in).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.channel import Channel
from fedtune.errors import SERVER_FAILED, one_line
from fedtune.memory import configure_allocator
from fedtune.runtime.flower.experiment_source import RESUME_KEY, ExperimentSource
from fedtune.runtime.flower.transport import FlowerTransport

log = logging.getLogger(__name__)


def make_server_app(
    experiment: ExperimentSource, *, on_result: Callable[[Any], None] | None = None, quiet: bool = False,
    resume: bool = False,
) -> ServerApp:
    """A ServerApp running the Experiment built by ``experiment`` from the run config.

    ``on_result`` receives the RunResult (when the app runs in this process, e.g. Flower simulation).
    ``resume`` (or the run config's ``resume = true``) continues from the output folder's checkpoint.
    """
    configure_allocator()  # FEDTUNE_ALLOCATOR=bounded: freed tensors go back to the OS (fedtune.memory)
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        exp = experiment(context.run_config)
        transport = FlowerTransport(grid, exp.runtime, expected_clients=exp.partition.num_clients,
                                    channel=Channel.from_config(exp.federation))
        again = resume or bool(context.run_config.get(RESUME_KEY, False))
        if again:
            log.info("resuming from the checkpoint in %s", exp.resolved_output_dir.resolve())
        try:
            result = run_on_grid(exp, transport, quiet=quiet, resume=again)
        except Exception as exc:  # one line for `fedtune run` (it reads what follows SERVER_FAILED), then Flower's log
            log.error("%s%s: %s", SERVER_FAILED, type(exc).__name__, one_line(exc))
            raise
        if transport.failures:
            log.warning("client failures: %s", transport.failures)
        log.info("outputs in %s", result.output_dir.resolve())
        if on_result is not None:
            on_result(result)

    return app


def run_on_grid(exp, transport: FlowerTransport, *, quiet: bool = False, resume: bool = False):
    """The server run of ``exp`` with its clients behind ``transport``: prepare, connect, the round loop, outputs."""
    import hashlib
    import json

    from fedtune import checkpoint
    from fedtune.attacks import experiment_attacker
    from fedtune.config.checks import check_experiment
    from fedtune.precision import default_device
    from fedtune.runtime.flower.transport import server_task
    from fedtune.server.loop import clients_per_round
    from fedtune.server.run import Federation, pin_precision, prepare_server, run_federation, server_strategy

    check_experiment(exp)
    ckpt = checkpoint.checkpoint_to_resume(exp, remote=True) if resume else None
    exp = pin_precision(exp, default_device(), ckpt)  # the nodes train in the server's resolved precision (plan)
    side = prepare_server(exp, server_task, default_device(), resume=ckpt is not None)
    transport.timing_log = side.out / "node_timing.jsonl"  # where each reply's time went (node_timing)
    sizes = transport.connect(side.task.units.label_names)  # the training data stays on the nodes
    ids = sorted(sizes)
    # The server sees only who the clients are and how many rows each holds: that is its fingerprint.
    fingerprint = hashlib.sha256(json.dumps(sorted(sizes.items())).encode()).hexdigest()
    checkpoint.check_fingerprint(ckpt, fingerprint, "set of clients or their row counts")
    log.info("%s (%s): %d train rows over %d clients", side.task.name, side.task.kind, sum(sizes.values()), len(ids))
    strategy = server_strategy(side, len(ids))
    per_round = clients_per_round(len(ids), exp.federation.clients_per_round, exp.federation.fraction)
    summary = {}
    if exp.attack.kind != "none":  # the nodes decide alike (fedtune.attacks); nodes' own attacks stay unknown here
        attackers = [c for c in ids if experiment_attacker(exp.attack, c, exp.partition.num_clients, exp.seed)]
        log.info("attack %s by %d clients: %s", exp.attack.kind, len(attackers), attackers)
        summary["attackers"] = attackers
    return run_federation(side, strategy, transport, Federation(ids, sum(sizes.values()), None, per_round,
                                                                data_fingerprint=fingerprint),
                          quiet=quiet, ckpt=ckpt, summary=summary)
