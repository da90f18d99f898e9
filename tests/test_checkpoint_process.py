"""A real ``fedtune run`` process killed (SIGKILL) or interrupted (SIGINT, Ctrl-C) in round 2, then resumed.

Unlike test_checkpoint.py (which stops a run with an exception inside the process), these start the
command line as its own process and signal it from outside while it trains round 2, as a machine that
dies or a user who presses Ctrl-C would. ``fedtune run --resume`` must then finish the run bit for bit
as the uninterrupted one: the model, every strategy buffer and client state, and metrics.jsonl but for
timings. SCAFFOLD with top-k error feedback keeps state on the server and on every client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from equivalence import all_state_tensors, metric_lines, untimed
from safetensors.torch import load_file

from fedtune.checkpoint import read_checkpoint

SETS = ["federation.rounds=3", "eval.every=1", "train.epochs=40", "strategy.name=scaffold",
        'federation.codec_up="topk:0.2+int8"', "partition.num_clients=4", "federation.clients_per_round=3"]
# (40 epochs: a round lasts a few seconds, so the signal lands inside round 2, not between rounds)


def _default_sigint() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: the child gets Ctrl-C's default disposition, as in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fedtune(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=_default_sigint)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _config(tiny_experiment, path: Path, out: Path) -> Path:
    path.write_text(tiny_experiment(*SETS, f'output_dir="{out}"').to_toml())
    return path


def _signal_in_round_2(proc: subprocess.Popen, out: Path, sig: int, timeout: float = 240) -> None:
    """Send ``sig`` as soon as round 1's checkpoint is written (round 2 is then training)."""
    deadline = time.monotonic() + timeout
    index = out / "checkpoint" / "checkpoint.json"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before round 2: {proc.stderr.read()[-2000:]}"
        if index.exists():
            os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
            return
        time.sleep(0.02)
    raise TimeoutError("no checkpoint of round 1 in time")


def _assert_same_run(a: Path, b: Path) -> None:
    ma = load_file(a / "model" / "adapter_model.safetensors")
    mb = load_file(b / "model" / "adapter_model.safetensors")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    sa, sb = all_state_tensors(a), all_state_tensors(b)
    assert {k[2] for k in sa if k[0] == "client"} >= {"scaffold_c", "codec_residual"}  # state on the clients
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert untimed(metric_lines(b)) == untimed(metric_lines(a))
    assert [r["round"] for r in metric_lines(b)] == [1, 2, 3]


@pytest.mark.slow
def test_sigkill_and_sigint_in_round_2_then_resume_bit_for_bit(tiny_experiment, tmp_path):
    straight = tmp_path / "straight"
    code, err = _finish(_fedtune("run", str(_config(tiny_experiment, tmp_path / "s.toml", straight)), "--quiet"))
    assert code == 0, err

    for name, sig in (("killed", signal.SIGKILL), ("interrupted", signal.SIGINT)):
        out = tmp_path / name
        proc = _fedtune("run", str(_config(tiny_experiment, tmp_path / f"{name}.toml", out)), "--quiet")
        _signal_in_round_2(proc, out, sig)
        code, err = _finish(proc)
        assert read_checkpoint(out).round == 1, name  # stopped inside round 2
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:  # Ctrl-C: one line that says how to continue, no traceback
            assert code == 130, err
            assert err.strip().splitlines()[-1] == f"fedtune: interrupted; continue it with `fedtune run --resume {out}`"
            assert "Traceback" not in err
        assert not (out / "summary.json").exists()

        code, err = _finish(_fedtune("run", "--resume", str(out), "--quiet"))
        assert code == 0, err
        _assert_same_run(straight, out)
        assert json.loads((out / "summary.json").read_text())["final_metrics"] == \
            json.loads((straight / "summary.json").read_text())["final_metrics"]
