"""The federation commands of the ``fedtune`` CLI: ``fedtune node``, ``fedtune server``, ``fedtune status``.

Each starts (or asks) a Flower process and never lets it outlive the command (:func:`_terminated_on_exit`).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from fedtune.config import ConfigError, Experiment


def cmd_node(args: argparse.Namespace) -> int:
    """Check this site's data against the experiment, then join the federation as a Flower SuperNode."""
    import subprocess

    from fedtune.runtime.flower import site

    if not args.superlink and not args.check:
        raise ConfigError("fedtune node needs --superlink HOST:PORT (or --check to only check the data)")
    exp = Experiment.from_toml(args.config, list(args.set or []))
    node, raw = site.site_node(args.client_id or "", args.train_file or "", args.manifest or "", args.data_dir or "",
                               args.threads, args.require_secagg)
    cmd = site.supernode_command(raw, args.superlink, insecure=args.insecure, root_certificates=args.root_certificates,
                                 auth_key=args.auth_key, port=args.port) if args.superlink else []
    report = site.check_node_data(exp, node)
    print("\n".join(report.lines()))
    if not exp.data.label_names and site.kind_has_label_names(exp):
        print("  (the experiment sets no data.label_names: the server's label names are compared with these "
              "when the federation starts)")
    if args.check:
        print("data check passed; not joining (--check)")
        return 0
    print("data check passed; joining: " + " ".join(cmd), flush=True)
    return _foreground(subprocess.Popen(cmd, env=site.node_env()))


def cmd_server(args: argparse.Namespace) -> int:
    """Start a SuperLink with TLS and node authentication from a credentials folder; print what the sites run."""
    import subprocess

    from fedtune.runtime.flower import operator

    creds, made = operator.prepare_credentials(args.credentials, args.host or [], args.site or [])
    for line in made:
        print(line)
    auth = not args.no_auth
    if auth and not creds.public_keys():
        raise ConfigError(f"no site keys in {creds.nodes}: name each site with --site NAME (or run with --no-auth)")
    operator.check_port_free(args.port)
    proc = subprocess.Popen(operator.superlink_command(creds, args.port, args.bind, auth))
    with _terminated_on_exit(proc):
        operator.wait_listening(args.port, proc)
        local = f"127.0.0.1:{args.port}"
        for line in operator.register_sites(creds, local) if auth else []:
            print(line)
        address = f"{(args.host or ['127.0.0.1'])[0]}:{args.port}"
        print(f"SuperLink ready at {address} (TLS{', node authentication' if auth else ''}).")
        print(f"Give every site {creds.tls.ca_cert}" + (f" and its own private key from {creds.nodes}/" if auth else "")
              + "; each runs:")
        for line in operator.site_commands(creds, address, args.experiment, auth):
            print(f"  {line}")
        print(f"Start the run:  fedtune run {args.experiment or 'experiment.toml'} --set 'runtime.superlink=\"{address}\"' "
              f"--set runtime.insecure=false --set 'runtime.root_certificates=\"{creds.tls.ca_cert}\"'")
        print(f"Watch it:       fedtune status {args.credentials} --superlink {local} [--run RUN_DIR]", flush=True)
        return proc.wait()


def _foreground(proc) -> int:
    """Wait for ``proc`` (a Flower process we started); stop it when we are interrupted or terminated."""
    with _terminated_on_exit(proc):
        return proc.wait()


@contextlib.contextmanager
def _terminated_on_exit(proc):
    """Within the block, SIGTERM ends us like Ctrl-C does; on leaving it, ``proc`` is stopped if still running
    (a SuperLink or SuperNode must not outlive the fedtune command that started it)."""
    import signal
    import subprocess

    def stop(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cmd_status(args: argparse.Namespace) -> int:
    """The SuperLink's connected nodes and runs (Flower's Control API), and a run's last round."""
    from fedtune.runtime.flower import operator

    creds = operator.Credentials(Path(args.credentials).expanduser().resolve())
    if not creds.tls.ca_cert.is_file():
        raise ConfigError(f"{creds.tls.ca_cert}: no such file (the credentials folder of `fedtune server`)")
    nodes = operator.list_json(operator.flwr_cli(creds, args.superlink, "supernode", "ls", "--format", "json"),
                               "nodes")
    runs = operator.list_json(operator.flwr_cli(creds, args.superlink, "ls", "--format", "json"), "runs")
    print(operator.status_text(nodes, runs, operator.site_names(creds), args.run))
    return 0
