"""``fedtune server``, ``fedtune node`` and ``fedtune status`` on real processes: one command per site.

The operator's ``fedtune server`` makes the credentials (CA, server certificate, two site keys), starts
a SuperLink with TLS and node authentication and registers the keys; a site whose file lacks the text
column is refused before it joins, with one line naming the file and the column; two sites join with
``fedtune node`` (TLS, their keys, their own files); ``fedtune status`` lists them online; the run
trains a round on them and ``fedtune status --run`` reports it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

pytest.importorskip("flwr")

from flower_processes import LABELS, federation, flower_experiment, free_port  # noqa: E402

pytestmark = pytest.mark.slow


def _fedtune(*args: str, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _wait_for(log, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{log.name}: no {text!r} within {timeout}s:\n{log.read_text()[-3000:] if log.exists() else ''}")


def test_server_node_and_status_commands_run_a_federation(tiny_experiment, tiny_csv, tmp_path):
    exp = flower_experiment(tiny_experiment, tmp_path / "out", 2, 1)
    exp_file = tmp_path / "experiment.toml"
    exp_file.write_text(exp.to_toml())
    rows = tiny_csv[0].read_text().splitlines()
    (tmp_path / "site_a.csv").write_text("\n".join([rows[0], *rows[1:121]]) + "\n")
    (tmp_path / "site_b.csv").write_text("\n".join([rows[0], *rows[121:]]) + "\n")
    (tmp_path / "broken.csv").write_text("body,label\n" + "\n".join(rows[1:20]) + "\n")
    port = free_port()
    address, creds = f"127.0.0.1:{port}", tmp_path / "creds"
    with federation(tmp_path / "procs") as fed:
        fed._start("server", [sys.executable, "-m", "fedtune.cli", "server", str(creds), "--site", "site_a",
                              "--site", "site_b", "--port", str(port), "--experiment", str(exp_file)])
        server_log = fed.logs[-1]
        _wait_for(server_log, "SuperLink ready", 60)
        text = server_log.read_text()
        assert "registered site site_a (node " in text and "registered site site_b (node " in text, text
        assert f"fedtune node {exp_file} --superlink {address} --root-certificates ca.crt --auth-key site_a" in text

        tls = ["--superlink", address, "--root-certificates", str(creds / "ca.crt")]
        bad = _fedtune("node", str(exp_file), *tls, "--auth-key", str(creds / "nodes" / "site_b"),
                       "--client-id", "site_b", "--train-file", str(tmp_path / "broken.csv"), cwd=tmp_path)
        assert bad.returncode == 1 and "joining" not in bad.stdout, bad.stdout + bad.stderr
        (line,) = [x for x in bad.stderr.splitlines() if x.startswith("fedtune:")]
        assert line == (f"fedtune: error: {tmp_path / 'broken.csv'}: column 'text' (data.text_column) not found; "
                        "available columns: 'body', 'label'")

        for site in ("site_a", "site_b"):
            fed._start(site, [sys.executable, "-m", "fedtune.cli", "node", str(exp_file), *tls,
                              "--auth-key", str(creds / "nodes" / site), "--client-id", site,
                              "--train-file", str(tmp_path / f"{site}.csv"), "--threads", "1"])
        for log in fed.logs[-2:]:
            _wait_for(log, "data check passed; joining")
        report = fed.logs[-2].read_text()
        names = LABELS.strip("[]").replace('"', "").split(",")
        assert "client site_a: 120 training rows (classification)" in report, report
        assert all(f"  {n}" in report for n in names), report

        deadline = time.monotonic() + 90
        while True:
            status = _fedtune("status", str(creds), "--superlink", address, cwd=tmp_path)
            assert status.returncode == 0, status.stderr
            if "2 SuperNode(s), 2 online" in status.stdout or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert "2 SuperNode(s), 2 online" in status.stdout, status.stdout + fed.tail()
        assert "site_a " in status.stdout and "site_b " in status.stdout, status.stdout

        run = _fedtune("run", str(exp_file), "--set", 'runtime.mode="flower"', "--set",
                       f'runtime.superlink="{address}"', "--set", "runtime.insecure=false", "--set",
                       f'runtime.root_certificates="{creds / "ca.crt"}"', "--set", "runtime.connect_timeout=90",
                       cwd=tmp_path, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + fed.tail()
        after = _fedtune("status", str(creds), "--superlink", address, "--run", str(tmp_path / "out"), cwd=tmp_path)
        assert after.returncode == 0, after.stderr
        assert "1 run(s):" in after.stdout and "finished:completed" in after.stdout, after.stdout
        assert f"{tmp_path / 'out'}: round 1 done: clients_aggregated 2" in after.stdout, after.stdout

        # A second server on the same port is refused in one line; SIGTERM to a fedtune command stops the
        # Flower process it started (nothing outlives it: no orphaned SuperNode or SuperLink holding the port).
        again = _fedtune("server", str(creds), "--port", str(port), cwd=tmp_path)
        assert again.returncode == 1 and f"fedtune: error: port {port} is in use" in again.stderr, again.stderr
        for proc in (fed.procs[-1], fed.procs[0]):  # site_b's fedtune node, then fedtune server
            children = psutil.Process(proc.pid).children(recursive=True)
            assert children, "the fedtune command started no Flower process"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) is not None
            _, alive = psutil.wait_procs(children, timeout=30)
            assert not alive, [p.cmdline() for p in alive]
