"""Client failures on real Flower processes: a SuperNode killed mid-round, one that hangs and never answers.

Three SuperNodes, ``runtime.min_clients = 2``, two rounds. In round 1 one node is killed while it
trains: the round waits ``runtime.round_timeout`` for it, then completes with the two others. In
round 2 a second node freezes (SIGSTOP: connected, never answers): only one client answers, fewer
than ``min_clients``, and the run stops with an error naming the round, the setting and the clients.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("flwr")

from flower_processes import (  # noqa: E402
    federation,
    flower_experiment,
    run_in_background,
    wait_for_training,
    write_manifests,
)

TIMEOUT = 40  # seconds; a ClientApp process starts, loads the model and trains within it even on loaded cores


@pytest.mark.slow
def test_killed_and_hanging_clients(tiny_experiment, tmp_path, capfd):
    """Round 1 survives a killed client (2 of 3 >= min_clients); round 2 with 1 answer is a clear error."""
    def exp(*extra: str):
        return flower_experiment(tiny_experiment, tmp_path / "out", 3, 2, *extra)

    manifests = write_manifests(exp(), tmp_path / "shards")
    with federation(tmp_path / "flower") as fed:
        fed.start_superlink()
        nodes = [fed.start_supernode(f"node{i}", f'manifest="{manifests[i]}"') for i in range(3)]
        run = exp('runtime.mode="flower"', f'runtime.superlink="{fed.address}"', "runtime.insecure=true",
                  "runtime.min_clients=2", "runtime.connect_timeout=90", f"runtime.round_timeout={TIMEOUT}")
        thread, outcome = run_in_background(run)
        wait_for_training(fed.workdir / "node2.log", 1)
        fed.kill(nodes[2])  # dies while training round 1
        wait_for_training(fed.workdir / "node1.log", 2)
        fed.freeze(nodes[1])  # hangs in round 2: connected, never answers
        thread.join(300)
        assert not thread.is_alive(), "fedtune run did not return"
        log = capfd.readouterr().out

    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"], r["clients_aggregated"]) for r in records] == [(1, 3, 2)], log[-3000:]
    assert "round 1: no reply from 2 before the timeout" in log
    assert isinstance(outcome.get("error"), RuntimeError), outcome
    assert (f"round 2: only 1 of 3 clients answered within runtime.round_timeout = {TIMEOUT}s, "
            "runtime.min_clients = 2 needs 2") in log, log[-3000:]
    # both round-2 failures are named, with their reason (timeout, offline, or the SuperLink's error)
    assert re.search(r"failed: client_00[12] \([^)]+\), client_00[12] \([^)]+\)", log), log[-3000:]
