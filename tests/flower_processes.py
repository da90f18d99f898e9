"""Start and stop real Flower processes (SuperLink, SuperNodes) on localhost for tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedtune.errors import OperatorError
from fedtune.runtime.flower.operator import wait_listening
from fedtune.runtime.flower.site import flower_exe as _exe  # noqa: F401 (free_port: the tests' import)
from fedtune.runtime.flower.site import free_port


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    """:func:`fedtune.runtime.flower.operator.wait_listening`, failing with the process's log attached."""
    try:
        wait_listening(port, proc, timeout)
    except OperatorError as exc:
        raise RuntimeError(f"{exc}:\n{log.read_text()[-3000:]}") from None


@dataclass
class Federation:
    """A SuperLink and its SuperNodes running as child processes (each in its own process group)."""

    workdir: Path
    superlink_port: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet and Control API share one port in Flower 1.41)."""
        return f"127.0.0.1:{self.superlink_port}"

    def env(self) -> dict[str, str]:
        """Environment of the processes: a private FLWR_HOME (never the user's ~/.flwr)."""
        return {**os.environ, "FLWR_HOME": str(self.workdir / "flwr-home"), "PYTHONUNBUFFERED": "1"}

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=self.env(),
                                cwd=self.workdir, start_new_session=True)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def start_superlink(self, tls: list[str] | None = None, timeout: float = 30) -> None:
        """``flower-superlink`` on a free port (insecure unless ``tls`` flags are given)."""
        self.superlink_port = free_port()
        flags = tls if tls is not None else ["--insecure"]
        proc = self._start("superlink", [_exe("flower-superlink"), *flags, "--port", str(self.superlink_port),
                                         "--disable-runtime-dependency-installation"])
        wait_for_port(self.superlink_port, timeout, proc, self.logs[-1])

    def start_supernode(self, name: str, node_config: str, tls: list[str] | None = None,
                        extra: list[str] = ()) -> subprocess.Popen:
        """``flower-supernode`` connected to the SuperLink with ``--node-config node_config`` (plus ``extra`` flags)."""
        flags = tls if tls is not None else ["--insecure"]
        return self._start(name, [_exe("flower-supernode"), *flags, "--superlink", self.address,
                                  "--port", str(free_port()), "--node-config", node_config, "--max-wait-time", "60",
                                  *extra])

    def flwr(self, *args: str, root_certificates: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the Flower CLI (``flwr args...``) against this SuperLink through a connection named ``test``."""
        home = self.workdir / "flwr-home"
        home.mkdir(exist_ok=True)
        conn = f'address = "{self.address}"\n' + (
            f'root-certificates = "{root_certificates}"\n' if root_certificates else "insecure = true\n")
        (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n{conn}')
        return subprocess.run([_exe("flwr"), *args], env=self.env(), cwd=self.workdir, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL one process we started and its descendants (a machine that dies mid-round)."""
        psutil.wait_procs(_each(_family(proc), "kill"), timeout=5)

    def freeze(self, proc: subprocess.Popen) -> None:
        """SIGSTOP one process we started and its descendants (a machine that hangs: it never answers)."""
        _each(_family(proc), "suspend")

    def resume(self, proc: subprocess.Popen) -> None:
        """SIGCONT a frozen process and its descendants (a machine that hung wakes up)."""
        _each(_family(proc), "resume")

    def stop(self) -> None:
        """Kill every process we started and all of its descendants (Flower detaches some into new sessions)."""
        victims = [p for proc in self.procs for p in _family(proc)]
        _each(victims, "resume")  # frozen ones (freeze) must run again to act on SIGTERM
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        _each(victims, "terminate")
        _, alive = psutil.wait_procs(victims, timeout=5)
        _each(alive, "kill")
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def tail(self, chars: int = 2500) -> str:
        """The end of every process log (for failure messages)."""
        return "\n".join(f"--- {p.name}\n{p.read_text()[-chars:]}" for p in self.logs if p.exists())


def _each(procs: list[psutil.Process], action: str) -> list[psutil.Process]:
    """Call ``action`` (kill, suspend, resume, terminate) on each of ``procs`` still alive; return ``procs``."""
    for p in procs:
        try:
            getattr(p, action)()
        except psutil.NoSuchProcess:
            pass
    return procs


def _family(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@contextmanager
def federation(workdir: Path):
    """A :class:`Federation` working in ``workdir`` (created), always stopped on exit."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    fed = Federation(workdir)
    try:
        yield fed
    finally:
        fed.stop()


LABELS = '["money","sports","tech"]'
"""The tiny data's label names, given to Flower runs so the server needs no training file."""


def flower_experiment(tiny_experiment, out: Path, clients: int, rounds: int = 1, *extra: str):
    """The tiny experiment as the Flower tests run it: ``clients`` clients, ``rounds`` rounds of one
    epoch, fixed label names, outputs in ``out``; ``extra`` overrides on top."""
    return tiny_experiment(f"partition.num_clients={clients}", f"federation.rounds={rounds}", "train.epochs=1",
                           f"data.label_names={LABELS}", f'output_dir="{out}"', *extra)


def write_manifests(exp, out: Path) -> list[Path]:
    """Partition ``exp``'s training set as the simulation would; return the clients' manifest files."""
    from fedtune.shards import make_shards
    from fedtune.tasks.classification_task import classification_units
    from fedtune.tasks.data import load_task_data

    data = load_task_data(exp.data, seed=exp.seed)
    shards = make_shards(exp, classification_units(data), data.name, out)
    return [out / "partition" / f"client_{i:03d}.json" for i in range(len(shards))]


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit code of ``proc`` once it ends within ``timeout`` seconds, else None (still running)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def wait_for_training(log: Path, rnd: int, timeout: float = 120) -> None:
    """Block until the SuperNode writing ``log`` has received its round-``rnd`` train message."""
    pattern = re.compile(rf"ROUND {rnd}\][^\n]*\n[^\n]*Receiving: train message")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and pattern.search(log.read_text()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{log.name}: no round-{rnd} train message within {timeout}s:\n{log.read_text()[-2000:]}")


def run_in_background(run) -> tuple[threading.Thread, dict]:
    """Start ``run_experiment(run)`` in a daemon thread; the dict gets ``result`` or ``error`` when it ends."""
    from fedtune.experiment import run_experiment

    outcome: dict = {}

    def submit() -> None:
        try:
            outcome["result"] = run_experiment(run, quiet=True)
        except Exception as exc:  # noqa: BLE001 (the caller checks it)
            outcome["error"] = exc

    thread = threading.Thread(target=submit, daemon=True)
    thread.start()
    return thread, outcome
