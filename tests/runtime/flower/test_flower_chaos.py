"""Chaos on real Flower processes: SuperNodes hang, die and restart at seeded random moments while a run goes on.

Three SuperNodes serve three clients over five rounds (``runtime.min_clients = 2``). The seed picks
which node each event hits and when (a random delay after that node received its train message):

- round 1, a node hangs (SIGSTOP) while training and a replacement for the same client starts; once
  the replacement has the round's plan the old node wakes up (SIGCONT), so both may answer: the
  client's update must be counted once;
- round 2, a node is killed while training and restarted a moment later: its plan goes again to the
  restarted node and the round completes with every client;
- round 3, a node is killed and stays down until the round is over: the round completes with the
  other two and its record names the failed client; the node restarts during round 4 and is back
  by round 5.

The run must finish, and every round's record must account for each sampled client exactly once:
aggregated, or named in ``failed`` with its reason. (When a kill lands after the node had already
answered, that round loses nothing; the node's log tells, and the checks follow it.)
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flower_processes import (  # noqa: E402
    federation,
    flower_experiment,
    run_in_background,
    wait_for_training,
    write_manifests,
)

SEED = 20261202
TIMEOUT = 90  # seconds a round waits: a restarted SuperNode starts, identifies and trains within it (Flower starts
# a ClientApp process per message: two starts, each importing torch, on two loaded cores)


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait(condition, what: str, thread: threading.Thread, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or not thread.is_alive():
            raise TimeoutError(what)
        time.sleep(0.1)


def _answered(log: Path, rnd: int) -> bool:
    """Whether the SuperNode writing ``log`` has sent its round-``rnd`` train reply."""
    return bool(re.search(rf"ROUND {rnd}\][^\n]*\n[^\n]*Sending: train message", log.read_text()))


@pytest.mark.slow
def test_nodes_hang_die_and_restart_while_the_run_goes_on(tiny_experiment, tmp_path, capfd):
    rng = random.Random(SEED)
    hung, killed, down = rng.sample(range(3), 3)  # one node per event
    out = tmp_path / "out"

    def exp(*extra: str):
        return flower_experiment(tiny_experiment, out, 3, 5, "train.epochs=2", *extra)

    manifests = write_manifests(exp(), tmp_path / "shards")
    with federation(tmp_path / "flower") as fed:
        fed.start_superlink()
        config = [f'manifest="{m}"' for m in manifests]
        nodes = [fed.start_supernode(f"node{i}", config[i]) for i in range(3)]
        run = exp('runtime.mode="flower"', f'runtime.superlink="{fed.address}"', "runtime.insecure=true",
                  "runtime.min_clients=2", "runtime.connect_timeout=90", f"runtime.round_timeout={TIMEOUT}")
        thread, outcome = run_in_background(run)
        log = fed.workdir

        def fail(what: str):
            return f"{what}: {outcome.get('error')!r}\n{capfd.readouterr().out[-3000:]}\n{fed.tail()}"

        try:
            # round 1: hangs; a replacement takes the client's plan; the old node wakes up and answers too
            wait_for_training(log / f"node{hung}.log", 1)
            time.sleep(rng.uniform(0, 1.0))
            fed.freeze(nodes[hung])
            early_1 = _answered(log / f"node{hung}.log", 1)
            fed.start_supernode(f"node{hung}b", config[hung])
            if not early_1:
                wait_for_training(log / f"node{hung}b.log", 1, timeout=TIMEOUT)
            fed.resume(nodes[hung])

            # round 2: killed while training, restarted a moment later
            wait_for_training(log / f"node{killed}.log", 2)
            time.sleep(rng.uniform(0, 1.0))
            fed.kill(nodes[killed])
            early_2 = _answered(log / f"node{killed}.log", 2)
            time.sleep(rng.uniform(0, 2.0))
            fed.start_supernode(f"node{killed}b", config[killed])

            # round 3: killed while training, back only after the round is over
            wait_for_training(log / f"node{down}.log", 3)
            time.sleep(rng.uniform(0, 1.0))
            fed.kill(nodes[down])
            early_3 = _answered(log / f"node{down}.log", 3)
            _wait(lambda: len(_records(out)) >= 3, "round 3 was not recorded", thread)
            fed.start_supernode(f"node{down}b", config[down])
        except TimeoutError as exc:
            pytest.fail(fail(str(exc)))

        thread.join(400)
        assert not thread.is_alive(), fail("fedtune run did not return")
        assert "result" in outcome, fail("the run failed")

    records = _records(out)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:  # every sampled client once: aggregated, or named as failed
        failed = [f["client"] for f in r.get("failed", [])]
        assert len(failed) == len(set(failed)), r
        assert r["clients_aggregated"] + len(failed) == r["clients"] == 3, r
    name = [f"client_{i:03d}" for i in range(3)]
    if not early_1:
        assert records[0]["restarted"] == [name[hung]]  # its plan went to the replacement ...
    assert records[0]["clients_aggregated"] == 3  # ... and the two answers for it count once
    if not early_2:  # killed before it answered: the plan went again to the restarted node
        assert records[1].get("restarted") == [name[killed]], records[1]
    assert records[1]["clients_aggregated"] == 3, records[1]
    if not early_3:  # killed before it answered and down for the rest of the round: named, with the reason
        assert [f["client"] for f in records[2]["failed"]] == [name[down]], records[2]
        assert records[2]["failed"][0]["reason"], records[2]
    assert records[4]["clients_aggregated"] == 3 and "failed" not in records[4], records[4]  # all back
