"""TLS and SuperNode authentication on real Flower processes (SuperLink, SuperNodes, ``fedtune run``).

One federation on localhost: the SuperLink serves TLS with a CA made by
:mod:`fedtune.runtime.flower.credentials` and admits only SuperNodes whose public keys were
registered with ``flwr supernode register``. Two registered nodes train one round; a node with an
unregistered key and a node that does not trust the CA are refused; ``fedtune run`` without the
CA fails with an error naming ``runtime.root_certificates``, and with ``runtime.insecure = true`` one
naming ``runtime.insecure``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from flower_processes import federation, flower_experiment, wait_exit, write_manifests  # noqa: E402

from fedtune.cli import main  # noqa: E402
from fedtune.experiment import run_experiment  # noqa: E402
from fedtune.runtime.flower.credentials import make_node_keys, make_tls_certificates  # noqa: E402


def test_tls_and_supernode_authentication(tiny_experiment, tmp_path, capsys):
    """Registered nodes train over TLS; an unregistered key or an untrusted CA cannot join."""
    tls = make_tls_certificates(tmp_path / "certs")
    keys = make_node_keys(tmp_path / "keys", ["site_a", "site_b", "intruder"])

    def exp(*extra: str):
        return flower_experiment(tiny_experiment, tmp_path / "out", 2, 1, *extra)

    manifests = write_manifests(exp(), tmp_path / "shards")
    with federation(tmp_path / "flower") as fed:
        fed.start_superlink(tls=[*tls.superlink_flags(), "--enable-supernode-auth"])
        for name in ("site_a", "site_b"):
            reg = fed.flwr("supernode", "register", str(keys[name].public_key), "test",
                           root_certificates=str(tls.ca_cert))
            assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout + reg.stderr
        for i, name in enumerate(("site_a", "site_b")):
            fed.start_supernode(name, f'manifest="{manifests[i]}"', tls=tls.supernode_flags(),
                                extra=["--auth-supernode-private-key", str(keys[name].private_key)])
        intruder = fed.start_supernode("intruder", 'client-id="intruder" train-file="x.csv"',
                                       tls=tls.supernode_flags(),
                                       extra=["--auth-supernode-private-key", str(keys["intruder"].private_key)])
        no_ca = fed.start_supernode("no_ca", 'client-id="no_ca" train-file="x.csv"', tls=[],
                                    extra=["--auth-supernode-private-key", str(keys["site_a"].private_key)])

        # Refused before any run: the SuperNode logs Flower's exit code 305 and exits with status 1
        # (what a script sees; the README says so).
        for proc, name, reason in ((intruder, "intruder", "Failed to activate SuperNode"),
                                   (no_ca, "no_ca", "CERTIFICATE_VERIFY_FAILED")):
            assert wait_exit(proc, 60) == 1, fed.tail()
            log = (fed.workdir / f"{name}.log").read_text()
            assert "Exit Code: 305" in log and reason in log, log

        common = ['runtime.mode="flower"', f'runtime.superlink="{fed.address}"', "runtime.min_clients=2",
                  "runtime.connect_timeout=90", "runtime.round_timeout=120"]
        with pytest.raises(ConnectionError, match="runtime.root_certificates"):
            run_experiment(exp(*common), quiet=True)  # TLS on, but the system CAs do not know ours
        with pytest.raises(ConnectionError, match="probably serves TLS.*runtime.insecure = false"):
            run_experiment(exp(*common, "runtime.insecure=true"), quiet=True)
        # The same refusal through the command line: one line on stderr naming the setting, exit status 1.
        wrong_ca = make_tls_certificates(tmp_path / "other-ca").ca_cert
        exp_file = tmp_path / "tls.toml"
        exp_file.write_text(exp(*common, f'runtime.root_certificates="{wrong_ca}"').to_toml())
        capsys.readouterr()
        assert main(["run", str(exp_file)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("fedtune: error: TLS:"), err
        assert "not trusted by runtime.root_certificates" in err, err

        try:
            result = run_experiment(exp(*common, f'runtime.root_certificates="{tls.ca_cert}"'), quiet=True)
        except Exception as exc:
            raise AssertionError(f"TLS run failed: {exc}\n{fed.tail()}") from exc
        assert [r["clients"] for r in result.history] == [2], fed.tail()
        assert result.history[0]["bytes_up"] > 0 and "accuracy" in result.final_metrics

        # A ServerApp that raises (here: its eval file is not where the SuperLink runs) ends `fedtune run`
        # with its error on one line, not a traceback.
        bad = tmp_path / "bad.toml"
        bad.write_text(exp(*common, f'runtime.root_certificates="{tls.ca_cert}"',
                           f'data.eval_file="{tmp_path / "nowhere.csv"}"', f'output_dir="{tmp_path / "bad"}"').to_toml())
        capsys.readouterr()
        assert main(["run", str(bad), "--quiet"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fedtune: error: the Flower run on"), err
        assert "failed on the server: DataError" in err[0] and "nowhere.csv" in err[0], err
        nodes = fed.flwr("supernode", "ls", "--format", "json", "test", root_certificates=str(tls.ca_cert))
        assert nodes.stdout.count('"online"') == 2, nodes.stdout  # the two registered sites, nobody else
