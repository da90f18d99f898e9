"""The fedtune command: config printing, clear config errors, partition and run."""

import json

from fedtune.cli import main


def test_config_prints_defaults_with_override(capsys):
    assert main(["config", "--set", "federation.rounds=9"]) == 0
    out = capsys.readouterr().out
    assert "rounds = 9" in out and 'dataset = "ag_news"' in out


def test_bad_key_exits_2_with_message(capsys, tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train]\nlr = 0.1\nbatchsize = 4\n")
    assert main(["config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "train.batchsize" in err and str(p) in err


def test_bad_override_value(capsys):
    assert main(["config", "--set", "federation.rounds=many"]) == 2
    assert "federation.rounds" in capsys.readouterr().err


def test_partition_writes_manifests(tiny_experiment, tmp_path, capsys):
    exp = tiny_experiment("partition.method=dirichlet", "partition.alpha=0.3")
    cfg = tmp_path / "exp.toml"
    cfg.write_text(exp.to_toml())
    assert main(["partition", str(cfg), "--out", str(tmp_path / "p")]) == 0
    summary = json.loads((tmp_path / "p" / "partition" / "summary.json").read_text())
    assert summary["num_clients"] == 3 and sum(summary["sizes"]) == 240
    assert "3 clients" in capsys.readouterr().out


def test_run_prints_table_and_writes_outputs(tiny_experiment, tmp_path, capsys):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(tiny_experiment("federation.rounds=1").to_toml())
    assert main(["run", str(cfg), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "final accuracy" in out and "bytes_up" in out
    assert (tmp_path / "out" / "metrics.jsonl").is_file()


def test_missing_data_file_exits_1_naming_it(tiny_experiment, tmp_path, capsys):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(tiny_experiment(f'data.train_file="{tmp_path / "absent.csv"}"').to_toml())
    assert main(["run", str(cfg), "--quiet"]) == 1
    assert "absent.csv" in capsys.readouterr().err
