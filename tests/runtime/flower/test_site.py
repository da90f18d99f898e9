"""fedtune node without processes: the node config it builds, the data check and its refusals, the flags."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from flower_processes import LABELS  # noqa: E402
from flwr.common.config import parse_config_args  # noqa: E402

from fedtune.cli import main  # noqa: E402
from fedtune.runtime.flower import site  # noqa: E402
from fedtune.runtime.flower.node import NodeConfigError, NodeData  # noqa: E402


def test_node_config_text_is_what_flower_parses_back(tmp_path):
    data = tmp_path / "my data.csv"
    node, raw = site.site_node("site_a", str(data), threads=2, require_secagg=True)
    assert raw == {"client-id": "site_a", "train-file": str(data), "threads": 2, "require-secagg": True}
    assert parse_config_args([site.node_config_text(raw)]) == raw  # (a path with a space survives)
    assert NodeData.from_node_config(raw) == node
    with pytest.raises(NodeConfigError, match="cannot carry quotes"):
        site.node_config_text({"train-file": 'a"b.csv'})


def test_supernode_command_flags(tmp_path):
    ca, key = tmp_path / "ca.crt", tmp_path / "site_a"
    ca.write_text("x")
    key.write_text("x")
    cmd = site.supernode_command({"client-id": "a", "threads": 1}, "h:9092", root_certificates=str(ca),
                                 auth_key=str(key), port=9999)
    assert cmd[1:] == ["--superlink", "h:9092", "--root-certificates", str(ca), "--auth-supernode-private-key",
                       str(key), "--port", "9999", "--node-config", 'client-id="a" threads=1']
    assert "--insecure" in site.supernode_command({}, "h:1", insecure=True)
    with pytest.raises(NodeConfigError, match="--insecure cannot be combined"):
        site.supernode_command({}, "h:1", insecure=True, auth_key=str(key))
    with pytest.raises(NodeConfigError, match="--root-certificates nope.crt: no such file"):
        site.supernode_command({}, "h:1", root_certificates="nope.crt")
    with pytest.raises(NodeConfigError, match="--auth-key nokey: no such file"):
        site.supernode_command({}, "h:1", auth_key="nokey")


def _exp_file(tiny_experiment, tmp_path, *extra):
    exp = tiny_experiment(f"data.label_names={LABELS}", *extra)
    path = tmp_path / "experiment.toml"
    path.write_text(exp.to_toml())
    return path


def test_check_reports_rows_and_labels(tiny_experiment, tiny_csv, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    exp = tiny_experiment(f"data.label_names={LABELS}")
    node, _ = site.site_node("site_a", str(tiny_csv[0]))
    report = site.check_node_data(exp, node)
    assert report.rows == 240 and report.kind == "classification"
    assert list(report.labels) == ["money", "sports", "tech"] and sum(report.labels.values()) == 240
    assert report.lines()[0] == f"client site_a: 240 training rows (classification) from {tiny_csv[0]}"
    assert list((tmp_path / "cache" / "encoded").glob("*.safetensors"))  # the first round reads them back

    path = _exp_file(tiny_experiment, tmp_path)
    assert main(["node", str(path), "--client-id", "site_a", "--train-file", str(tiny_csv[0]), "--check"]) == 0
    out = capsys.readouterr().out
    assert "  money" in out and "data check passed; not joining (--check)" in out


@pytest.mark.parametrize("content, message", [
    ("body,label\nbuy stocks,money\n", "{file}: column 'text' (data.text_column) not found; available columns: "
                                       "'body', 'label'"),
    ("text,label\nbuy stocks,money\nthe moon,space\n", "{file}, row 2: label 'space' in column 'label' is not one "
                                                        "of data.label_names ['money', 'sports', 'tech']"),
])
def test_a_bad_file_is_refused_in_one_line_before_joining(tiny_experiment, tmp_path, capsys, content, message):
    bad = tmp_path / "site.csv"
    bad.write_text(content)
    path = _exp_file(tiny_experiment, tmp_path)
    code = main(["node", str(path), "--client-id", "s", "--train-file", str(bad), "--superlink", "127.0.0.1:1",
                 "--insecure"])
    err = capsys.readouterr()
    assert code == 1 and "joining" not in err.out
    assert err.err.strip() == "fedtune: error: " + message.format(file=bad)


def test_node_needs_a_superlink_or_check(tiny_experiment, tiny_csv, tmp_path, capsys):
    path = _exp_file(tiny_experiment, tmp_path)
    assert main(["node", str(path), "--client-id", "s", "--train-file", str(tiny_csv[0])]) == 2
    assert "fedtune node needs --superlink HOST:PORT" in capsys.readouterr().err
