"""The Flower ServerApp: fedtune's own round loop (``run_experiment`` -> ``run_rounds``) over a FlowerTransport.

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
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedtune.experiment import run_experiment

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        exp = experiment(context.run_config)
        transport = FlowerTransport(grid, exp.runtime, expected_clients=exp.partition.num_clients,
                                    channel=Channel.from_config(exp.federation))
        again = resume or bool(context.run_config.get(RESUME_KEY, False))
        if again:
            log.info("resuming from the checkpoint in %s", exp.resolved_output_dir.resolve())
        result = run_experiment(exp, quiet=quiet, remote=transport, resume=again)
        if transport.failures:
            log.warning("client failures: %s", transport.failures)
        log.info("outputs in %s", result.output_dir.resolve())
        if on_result is not None:
            on_result(result)

    return app
