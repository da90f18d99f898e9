"""fedtune server / status without processes: the credentials folder, the SuperLink flags, the status text."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")

from fedtune.errors import CredentialsError, OperatorError  # noqa: E402
from fedtune.runtime.flower import operator  # noqa: E402


def test_credentials_are_made_once_and_kept(tmp_path):
    creds, made = operator.prepare_credentials(tmp_path / "c", ["fl.example.org"], ["site_a", "site_b"])
    assert len(made) == 3 and all(p.is_file() for p in (creds.tls.ca_cert, creds.tls.server_cert, creds.tls.server_key))
    assert [p.name for p in creds.public_keys()] == ["site_a.pub", "site_b.pub"]
    before = (creds.nodes / "site_a").read_bytes()
    again, made = operator.prepare_credentials(tmp_path / "c", ["fl.example.org"], ["site_a", "site_c"])
    assert made == [f"made the key pair of site site_c: give {creds.nodes / 'site_c'} to that site only"]
    assert (again.nodes / "site_a").read_bytes() == before  # never overwritten
    with pytest.raises(CredentialsError, match="is not valid for other.org"):
        operator.prepare_credentials(tmp_path / "c", ["other.org"], [])
    (creds.tls.server_key).unlink()
    with pytest.raises(CredentialsError, match="holds part of a TLS setup; missing .*server.key"):
        operator.prepare_credentials(tmp_path / "c", [], [])


def test_superlink_command_and_site_commands(tmp_path):
    creds, _ = operator.prepare_credentials(tmp_path / "c", [], ["a"])
    cmd = operator.superlink_command(creds, 9092, "0.0.0.0", auth=True)
    assert cmd[1:] == [*creds.tls.superlink_flags(), "--port", "9092", "--disable-runtime-dependency-installation",
                       "--host", "0.0.0.0", "--enable-supernode-auth"]
    assert "--enable-supernode-auth" not in operator.superlink_command(creds, 9092, "", auth=False)
    (line,) = operator.site_commands(creds, "h:9092", "exp.toml", auth=True)
    assert line == ("fedtune node exp.toml --superlink h:9092 --root-certificates ca.crt --auth-key a --client-id a "
                    "--train-file <the site's data file>")
    home = creds.flwr_home("127.0.0.1:9092")
    assert 'address = "127.0.0.1:9092"' in (home / "config.toml").read_text()


def test_status_text_names_sites_runs_and_the_last_round(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n" + json.dumps(
        {"round": 2, "train_loss": 0.5, "clients_aggregated": 2, "eval_accuracy": 0.85, "eval_time": 3.0,
         "bytes_up": 10}) + "\n")
    nodes = [{"node-id": "11", "status": "online", "online-at": "2026-12-02 10:00:00Z"},
             {"node-id": "22", "status": "registered", "online-at": "N/A"}]
    runs = [{"run-id": 5, "status": "running", "elapsed": "12.34"}]
    text = operator.status_text(nodes, runs, {"11": "site_a"}, str(run))
    assert text.splitlines() == [
        "2 SuperNode(s), 1 online:",
        "  site_a 11: online since 2026-12-02 10:00:00Z",
        "  node 22: registered",
        "1 run(s):",
        "  run 5: running, elapsed 12.3 s",
        f"{run}: round 2 done: train_loss 0.5, clients_aggregated 2, eval_accuracy 0.85",
    ]
    assert operator.status_text([], [], {}, str(tmp_path / "none")).endswith("no round finished yet")


def test_list_json_refuses_what_is_not_flowers_answer():
    assert operator.list_json('noise {"success": true, "nodes": [{"node-id": "1"}]}', "nodes") == [{"node-id": "1"}]
    with pytest.raises(OperatorError, match="did not answer JSON"):
        operator.list_json("Connection refused", "nodes")
    with pytest.raises(OperatorError, match="Flower's CLI failed: unavailable"):
        operator.list_json('{"success": false, "error-message": "unavailable"}', "runs")


def test_a_port_in_use_is_refused():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OperatorError, match=f"port {port} is in use on this machine"):
            operator.check_port_free(port)
    operator.check_port_free(port)  # closed again: free
