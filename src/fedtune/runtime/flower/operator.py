"""``fedtune server`` and ``fedtune status``: the federation operator's two commands.

``fedtune server CREDENTIALS`` starts a Flower SuperLink with TLS and SuperNode authentication from
one credentials folder, made on first use with :mod:`fedtune.runtime.flower.credentials`::

    CREDENTIALS/ca.crt ca.key server.pem server.key   the CA (ca.crt goes to every site) and the server's pair
    CREDENTIALS/nodes/<site> <site>.pub               one key pair per site (--site NAME makes a missing one)
    CREDENTIALS/flwr-home/config.toml                 the operator's Flower CLI connection "fedtune"

It registers every ``nodes/*.pub`` with the SuperLink (Flower's Control API, ``flwr supernode
register``), prints the address the sites use and the exact ``fedtune node`` command each site
runs, and stays in the foreground until interrupted. ``fedtune status CREDENTIALS`` asks the same
SuperLink (``flwr supernode ls`` / ``flwr ls``, Flower's own API) which nodes are connected and
which runs exist, and with ``--run RUN_DIR`` prints that run's last round from its
``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import CredentialsError, OperatorError
from fedtune.runtime.flower.credentials import TlsFiles, make_node_keys, make_tls_certificates
from fedtune.runtime.flower.site import flower_exe

CONNECTION = "fedtune"
"""The name of the operator's connection in ``CREDENTIALS/flwr-home/config.toml``."""


@dataclass(frozen=True)
class Credentials:
    """The files of one federation's credentials folder."""

    folder: Path

    @property
    def tls(self) -> TlsFiles:
        """The CA and server certificate files."""
        d = self.folder
        return TlsFiles(d / "ca.crt", d / "ca.key", d / "server.pem", d / "server.key")

    @property
    def nodes(self) -> Path:
        """The folder of the sites' key pairs."""
        return self.folder / "nodes"

    def public_keys(self) -> list[Path]:
        """Every site's public key, by name."""
        return sorted(self.nodes.glob("*.pub")) if self.nodes.is_dir() else []

    def flwr_home(self, address: str) -> Path:
        """A Flower CLI home with one connection to ``address`` trusting this CA."""
        import tomli_w

        home = self.folder / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        conn = {"address": address, "root-certificates": str(self.tls.ca_cert.resolve())}
        (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))
        return home


def prepare_credentials(folder: str | Path, hosts: list[str], sites: list[str]) -> tuple[Credentials, list[str]]:
    """The credentials folder, with what is missing made: the CA and server certificate, the named sites' keys.

    Returns the folder and a line for each file made. Existing files are kept, never overwritten; a
    server certificate that does not name one of ``hosts`` is an error (make a new folder).
    """
    creds = Credentials(Path(folder).expanduser().resolve())
    made = []
    tls = creds.tls
    present = [p.exists() for p in (tls.ca_cert, tls.server_cert, tls.server_key)]
    if not any(present):
        make_tls_certificates(creds.folder, hosts)
        made.append(f"made the CA and the server certificate in {creds.folder} (valid for localhost and "
                    f"{', '.join(hosts) or 'no other host'})")
    elif not all(present):
        missing = [str(p) for p, ok in zip((tls.ca_cert, tls.server_cert, tls.server_key), present, strict=True) if not ok]
        raise CredentialsError(f"{creds.folder} holds part of a TLS setup; missing {', '.join(missing)}")
    else:
        _check_hosts(tls.server_cert, hosts)
    new = [s for s in sites if not (creds.nodes / s).exists()]
    if new:
        make_node_keys(creds.nodes, new)
        made += [f"made the key pair of site {s}: give {creds.nodes / s} to that site only" for s in new]
    return creds, made


def _check_hosts(cert: Path, hosts: list[str]) -> None:
    from cryptography import x509

    names = {str(n.value) for n in x509.load_pem_x509_certificate(cert.read_bytes())
             .extensions.get_extension_for_class(x509.SubjectAlternativeName).value}
    missing = [h for h in hosts if h not in names]
    if missing:
        raise CredentialsError(f"{cert} is not valid for {', '.join(missing)} (it names {', '.join(sorted(names))}); "
                               "make the credentials in a new folder with every --host")


def superlink_command(creds: Credentials, port: int, bind: str, auth: bool) -> list[str]:
    """The ``flower-superlink`` command for these credentials."""
    cmd = [flower_exe("flower-superlink"), *creds.tls.superlink_flags(), "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if bind:
        cmd += ["--host", bind]
    if auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def check_port_free(port: int) -> None:
    """OperatorError when something already listens on ``port`` on this machine (another SuperLink?)."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            pass
    except OSError:
        return
    raise OperatorError(f"port {port} is in use on this machine (another SuperLink?); stop it or choose --port")


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Return once something listens on ``port``; OperatorError when ``proc`` exits first or time runs out."""
    import socket

    name = Path(str(proc.args[0] if isinstance(proc.args, (list, tuple)) else proc.args)).name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise OperatorError(f"{name} exited with status {proc.returncode} before listening on port "
                                f"{port} (is the port taken?)")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise OperatorError(f"{name} does not listen on port {port} after {timeout:g} s")


def flwr_cli(creds: Credentials, address: str, *args: str, timeout: float = 60.0) -> str:
    """Run ``flwr args... fedtune`` against the SuperLink; its stdout (OperatorError with its message on failure)."""
    env = {**os.environ, "FLWR_HOME": str(creds.flwr_home(address))}
    proc = subprocess.run([flower_exe("flwr"), *args, CONNECTION], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        text = " ".join((proc.stdout + " " + proc.stderr).split())
        raise OperatorError(f"flwr {' '.join(args)} failed (status {proc.returncode}): {text[-400:]}")
    return proc.stdout


def register_sites(creds: Credentials, address: str) -> list[str]:
    """Register every ``nodes/*.pub`` with the SuperLink; a line per key (an already registered one is said so).

    Each new registration's Flower node id is kept in ``nodes/<site>.node-id``, so ``fedtune status``
    names the sites.
    """
    lines = []
    for pub in creds.public_keys():
        try:
            answer = list_json(flwr_cli(creds, address, "supernode", "register", str(pub), "--format", "json"), "")
        except OperatorError as exc:
            if "already in use" not in str(exc).lower():
                raise OperatorError(f"registering {pub}: {exc}") from None
            lines.append(f"site {pub.stem} was registered already")
            continue
        if "node-id" not in answer:
            raise OperatorError(f"registering {pub}: Flower's answer has no node-id: {answer}")
        (creds.nodes / f"{pub.stem}.node-id").write_text(f"{answer['node-id']}\n")
        lines.append(f"registered site {pub.stem} (node {answer['node-id']})")
    return lines


def site_names(creds: Credentials) -> dict[str, str]:
    """Flower node id -> site name, for the sites this folder registered."""
    return {p.read_text().strip(): p.name[: -len(".node-id")] for p in creds.nodes.glob("*.node-id")} \
        if creds.nodes.is_dir() else {}


def site_commands(creds: Credentials, address: str, experiment: str, auth: bool) -> list[str]:
    """The command each registered site runs (its data file is theirs to fill in)."""
    sites = [p.stem for p in creds.public_keys()] or ["<site>"]
    exp = experiment or "experiment.toml"
    out = []
    for site in sites:
        key = f" --auth-key {site}" if auth else ""
        out.append(f"fedtune node {exp} --superlink {address} --root-certificates ca.crt{key} "
                   f"--client-id {site} --train-file <the site's data file>")
    return out


def list_json(text: str, key: str):
    """The ``key`` list of a ``flwr ... --format json`` answer, or the whole answer when ``key`` is empty
    (OperatorError when the answer is not JSON or says it failed)."""
    try:
        value = json.loads(text[text.index("{"):])
    except (ValueError, json.JSONDecodeError):
        raise OperatorError(f"Flower's CLI did not answer JSON: {' '.join(text.split())[:200]}") from None
    if not value.get("success", True):
        raise OperatorError(f"Flower's CLI failed: {' '.join(str(value.get('error-message', value)).split())}")
    if not key:
        return value
    items = value.get(key, [])
    return items if isinstance(items, list) else []


def status_text(nodes: list[dict], runs: list[dict], names: dict[str, str], run_dir: str | None = None) -> str:
    """What ``fedtune status`` prints: the nodes (online or not), the runs, and a run folder's last round."""
    lines = [f"{len(nodes)} SuperNode(s), {sum(n.get('status') == 'online' for n in nodes)} online:"]
    for n in nodes:
        nid = str(n.get("node-id", "?"))
        since = f" since {n['online-at']}" if n.get("status") == "online" and n.get("online-at") not in (None, "N/A") else ""
        lines.append(f"  {names.get(nid, 'node')} {nid}: {n.get('status', '?')}{since}")
    lines.append(f"{len(runs)} run(s)" + (":" if runs else ""))
    for r in runs:
        elapsed = r.get("elapsed")
        took = f", elapsed {float(elapsed):.1f} s" if isinstance(elapsed, (int, float, str)) and _is_number(elapsed) else ""
        lines.append(f"  run {r.get('run-id', '?')}: {r.get('status', '?')}{took}")
    if run_dir:
        last = last_round(run_dir)
        if last is None:
            lines.append(f"{run_dir}: no round finished yet")
        else:
            shown = {k: v for k, v in last.items() if k in ("train_loss", "clients_aggregated", "round_time")
                     or (k.startswith("eval_") and k != "eval_time" and isinstance(v, float))}
            metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
            lines.append(f"{run_dir}: round {last.get('round')} done: {metrics}")
    return "\n".join(lines)


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def last_round(run_dir: str | Path) -> dict | None:
    """The last record of ``RUN_DIR/metrics.jsonl`` (None when the run has not finished a round)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


