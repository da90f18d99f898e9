"""``fedtune run`` with ``runtime.mode = "flower-simulation"`` or ``"flower"``.

- ``flower-simulation``: the same ServerApp and ClientApp under Flower's simulation engine (Ray),
  in this process; one virtual SuperNode per client, each reading its shard of the partition.
- ``flower``: submit the Flower App to the SuperLink at ``runtime.superlink`` (what ``flwr run``
  does), with the experiment shipped inside the app, and stream the run's logs. The SuperNodes
  must already be running, each with its own data (:mod:`fedtune.runtime.flower.node`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.config import Experiment
from fedtune.errors import SERVER_FAILED, FlowerRunError

if TYPE_CHECKING:
    from flwr.common import ConfigRecordValues

APP_MODULE = "fedtune_app"
"""Module (inside the app folder) binding the ServerApp and ClientApp to the app's experiment."""
EXPERIMENT_FILE = "experiment.toml"

_PYPROJECT = """\
# A Flower App running fedtune (written by fedtune.runtime.flower.launch.write_app).
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedtune-flower-app"
version = "0.1.0"
description = "fedtune federated fine-tuning as a Flower App"
license = "Apache-2.0"
dependencies = ["fedtune", "flwr==1.41.0"]

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "{module}:server_app"
clientapp = "{module}:client_app"

[tool.flwr.app.config]
# The fedtune experiment (inside this folder); any other key is a fedtune override,
# e.g. `flwr run . my-superlink -c 'federation.rounds=3'` once declared here.
experiment = "{experiment}"
# true: the ServerApp continues from the checkpoint in the output folder (`fedtune run --resume OUT`).
resume = false
"""

_MODULE = '''\
"""fedtune's Flower apps, bound to the experiment TOML shipped in this folder (see pyproject.toml)."""

from pathlib import Path

from fedtune.runtime.flower.client_app import make_client_app
from fedtune.runtime.flower.experiment_source import from_app_dir
from fedtune.runtime.flower.server_app import make_server_app

_experiment = from_app_dir(Path(__file__).parent)
server_app = make_server_app(_experiment)
client_app = make_client_app(_experiment)
'''


def app_files(experiment_file: str = EXPERIMENT_FILE) -> dict[str, str]:
    """The files of a fedtune Flower App folder (besides the experiment TOML itself)."""
    return {
        "pyproject.toml": _PYPROJECT.format(module=APP_MODULE, experiment=experiment_file),
        f"{APP_MODULE}.py": _MODULE,
    }


def write_app(directory: str | Path, exp: Experiment) -> Path:
    """Write a Flower App folder running ``exp`` (its TOML as ``experiment.toml``); return the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in app_files().items():
        (directory / name).write_text(text)
    (directory / EXPERIMENT_FILE).write_text(exp.to_toml())
    return directory


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Raise ConnectionError naming ``address`` when no SuperLink listens there within ``timeout`` seconds."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"runtime.superlink = {address!r}: expected host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(
            f"cannot reach the Flower SuperLink at {address} (runtime.superlink) within {timeout:g}s: {exc}. "
            "Is flower-superlink running there, and is the port open?"
        ) from None


def check_tls(address: str, root_certificates: str = "", timeout: float = 10.0) -> None:
    """Raise ConnectionError when the SuperLink at ``address`` does not pass a TLS handshake we trust.

    The server certificate must chain to ``root_certificates`` (a PEM CA file; the system CAs when
    empty) and name the host. Errors say which ``[runtime]`` setting to change.
    """
    import ssl

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if root_certificates:
        ca = Path(root_certificates).expanduser()
        if not ca.is_file():
            raise ConnectionError(f"runtime.root_certificates = {root_certificates!r}: no such file")
        try:
            context = ssl.create_default_context(cafile=str(ca))
        except ssl.SSLError as exc:
            raise ConnectionError(f"runtime.root_certificates = {root_certificates!r} is not a PEM "
                                  f"CA certificate: {exc}") from None
    else:
        context = ssl.create_default_context()
    trusted = f"runtime.root_certificates = {root_certificates!r}" if root_certificates else \
        "the system CAs (runtime.root_certificates is empty)"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                pass
    except ssl.SSLCertVerificationError as exc:
        raise ConnectionError(
            f"TLS: the SuperLink at {address} presented a certificate not trusted by {trusted}: "
            f"{exc.verify_message}. Set runtime.root_certificates to the CA certificate that signed the "
            "SuperLink's --ssl-certfile (and make sure the certificate names this host)."
        ) from None
    except ssl.SSLError as exc:
        raise ConnectionError(
            f"TLS handshake with the SuperLink at {address} failed ({exc.reason or exc}). A SuperLink started "
            "with --insecure speaks no TLS: start it with --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile, "
            "or set runtime.insecure = true (local tests only)."
        ) from None
    except OSError as exc:
        raise ConnectionError(f"TLS handshake with the SuperLink at {address} failed: {exc}") from None


def check_plain(address: str, timeout: float = 10.0) -> None:
    """Raise ConnectionError when the SuperLink at ``address`` does not answer plain HTTP (it serves TLS).

    For ``runtime.insecure = true``: one ``GET /`` whose answer must start like an HTTP response.
    """
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            answer = b""
            while len(answer) < 5 and (chunk := sock.recv(5 - len(answer))):
                answer += chunk
    except OSError as exc:  # a TLS server resets or drops a plain request
        answer = f"{type(exc).__name__}: {exc}".encode()
    if answer != b"HTTP/":
        raise ConnectionError(
            f"the SuperLink at {address} does not speak plain HTTP (answered {answer[:40]!r}): "
            "it probably serves TLS. Set "
            "runtime.insecure = false and runtime.root_certificates to the CA certificate that signed its "
            "--ssl-certfile (or start it with --insecure for a local test)."
        )


def flwr_home(directory: str | Path, exp: Experiment, connection: str = "fedtune") -> Path:
    """A Flower CLI home (``FLWR_HOME``) whose config names one SuperLink connection from ``[runtime]``."""
    import tomli_w

    r = exp.runtime
    conn: dict = {"address": r.superlink}
    if r.insecure:
        conn["insecure"] = True
    if r.root_certificates:
        conn["root-certificates"] = str(Path(r.root_certificates).expanduser().resolve())
    home = Path(directory)
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": connection, connection: conn}}))
    return home


def submit(exp: Experiment, *, timeout: float | None = None, resume: bool = False) -> tuple[int, str]:
    """Submit ``exp`` to the SuperLink at ``runtime.superlink`` and stream its logs.

    Returns flwr's exit code and the ServerApp's error (the text after :data:`SERVER_FAILED` in the
    streamed log; empty when it did not fail). ``resume`` sets the run config's ``resume = true``:
    the ServerApp continues from its checkpoint.
    """
    check_reachable(exp.runtime.superlink)
    if exp.runtime.insecure:
        check_plain(exp.runtime.superlink)
    else:
        check_tls(exp.runtime.superlink, exp.runtime.root_certificates)
    with tempfile.TemporaryDirectory(prefix="fedtune-flwr-") as tmp:
        app = write_app(Path(tmp) / "app", exp)
        env = {**os.environ, "FLWR_HOME": str(flwr_home(Path(tmp) / "home", exp))}
        cmd = [_flwr(), "run", str(app), "fedtune", "--stream"]
        if resume:
            cmd += ["--run-config", "resume=true"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, errors="replace")
        failure: list[str] = []
        stdout = proc.stdout
        if stdout is None:  # (stdout=PIPE: always a stream)
            raise RuntimeError("flwr run: no pipe to its output")

        def pump() -> None:  # echo the streamed log; remember the ServerApp's error
            for line in stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if SERVER_FAILED in line:
                    failure.append(_strip_ansi(line.split(SERVER_FAILED, 1)[1]).strip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            reader.join(10)
        return code, failure[-1] if failure else ""


def _flwr() -> str:
    from fedtune.runtime.flower.site import flower_exe

    return flower_exe("flwr")


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def run_on_flower(exp: Experiment, *, quiet: bool = False, resume: bool = False, overwrite: bool = False):
    """Run ``exp`` on Flower as ``exp.runtime.mode`` says; return the RunResult (read back from the outputs).

    ``resume``: the ServerApp continues from the checkpoint in the output folder (the caller has
    checked it fits, :func:`fedtune.checkpoint.checkpoint_to_resume`). ``overwrite`` removes a
    previous run's files from the output folder here before submitting (a ServerApp on another
    machine refuses a folder there that holds a run).
    """
    from fedtune.config.checks import check_experiment
    from fedtune.outputs import check_output_dir, clear_run_files

    check_experiment(exp)  # before anything is submitted
    check_output_dir(exp, resume=resume, overwrite=overwrite)
    out = exp.resolved_output_dir.resolve()
    if overwrite and not resume and out.is_dir():
        clear_run_files(out)
    if exp.runtime.mode == "flower-simulation":
        return _simulate(exp, quiet=quiet, resume=resume)
    # The ServerApp runs next to the SuperLink, in its folder: pin the output folder and every local
    # path the server reads (data files, a manifest folder, a model folder) to absolute paths.
    shipped = _absolute_paths(exp, out)
    r = exp.runtime  # generous bound so a stuck run can never hang `fedtune run` forever
    stages = 4 if r.secagg else 1  # SecAgg+ waits up to round_timeout in each of its four stages
    limit = r.connect_timeout + exp.federation.rounds * stages * r.round_timeout + 300
    summary = out / "summary.json"
    before = summary.stat().st_mtime_ns if summary.exists() else None
    try:
        code, failure = submit(shipped, timeout=limit, resume=resume)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the Flower run on {r.superlink} did not finish within {limit:g}s") from None
    if failure:  # (flwr run exits 0 when the ServerApp raised)
        hint = ("; the ServerApp runs in flower-superlink's process, with its environment (FEDTUNE_DATA_DIR, "
                "HF_HOME) and working folder" if failure.startswith(_SERVER_SIDE_ERRORS) else "")
        raise FlowerRunError(f"the Flower run on {r.superlink} failed on the server: {failure}{hint}")
    if code != 0:
        raise FlowerRunError(f"flwr run exited with code {code} (SuperLink {r.superlink}); its log is above")
    if not summary.exists() or summary.stat().st_mtime_ns == before:
        raise FlowerRunError(f"the Flower run on {r.superlink} ended without writing {summary}; "
                             "the ServerApp's log is above")
    return _read_result(out)


_SERVER_SIDE_ERRORS = ("DataError", "ModelLoadError", "FileNotFoundError", "PartitionError")
"""ServerApp errors that usually mean the SuperLink was started without the data or model settings."""


def _absolute_paths(exp: Experiment, out: Path) -> Experiment:
    """``exp`` with ``output_dir`` = ``out`` and its relative local paths made absolute (hub ids stay)."""
    import dataclasses

    def local(value: str) -> str:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    data = dataclasses.replace(exp.data, train_file=local(exp.data.train_file), eval_file=local(exp.data.eval_file))
    partition = dataclasses.replace(exp.partition, manifest_dir=local(exp.partition.manifest_dir))
    model = dataclasses.replace(exp.model, name=local(exp.model.name), init_adapter=local(exp.model.init_adapter))
    return dataclasses.replace(exp, output_dir=str(out), data=data, partition=partition, model=model)


def _read_result(out: Path):
    import json

    from fedtune.server.run import RunResult

    summary = json.loads((out / "summary.json").read_text())
    metrics = out / "metrics.jsonl"
    history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    return RunResult(out, history, summary.get("final_metrics", {}), summary)


def _simulate(exp: Experiment, *, quiet: bool, resume: bool = False):
    """Flower's simulation engine (Ray) in this process, one virtual SuperNode per client."""
    from flwr.simulation import run_simulation

    from fedtune.models import load_tokenizer
    from fedtune.runtime.flower.client_app import make_client_app
    from fedtune.runtime.flower.experiment_source import fixed
    from fedtune.runtime.flower.server_app import make_server_app
    from fedtune.shards import make_shards
    from fedtune.tasks.registry import build_task

    out = exp.resolved_output_dir
    task = build_task(exp, load_tokenizer(exp.model.name, exp.model.gguf_file))
    make_shards(exp, task.units, task.name, out)  # the virtual nodes' manifests
    results: list = []
    server = make_server_app(fixed(exp), on_result=results.append, quiet=quiet, resume=resume)
    client = make_client_app(fixed(exp), manifest_dir=out / "partition")
    backend: dict[str, dict[str, ConfigRecordValues]] = {
        "client_resources": {"num_cpus": exp.runtime.cpus_per_client, "num_gpus": 0.0},
        "init_args": {"logging_level": "error", "log_to_driver": True},
    }
    run_simulation(server_app=server, client_app=client, num_supernodes=exp.partition.num_clients,
                   backend_name="ray", backend_config=backend)
    if not results:
        raise RuntimeError("the Flower simulation ended without a result (see the ServerApp's log above)")
    return results[0]
