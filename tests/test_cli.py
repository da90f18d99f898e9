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


def _one_error_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_environment_mistakes_are_one_line(tiny_experiment, tmp_path, capsys):
    import socket

    cfg = tmp_path / "exp.toml"
    cfg.write_text(tiny_experiment("train.precision='fp16'").to_toml())
    assert main(["run", str(cfg), "--quiet"]) == 2  # this machine has no CUDA device
    assert "train.precision = 'fp16' needs a CUDA device" in _one_error_line(capsys, "fedtune: config error: ")
    assert main(["run", "--set", 'runtime.superlink="127.0.0.1"']) == 2
    assert "runtime.superlink = '127.0.0.1' must be host:port" in _one_error_line(capsys, "fedtune: config error: ")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg.write_text(tiny_experiment('runtime.mode="flower"', f'runtime.superlink="127.0.0.1:{port}"').to_toml())
    assert main(["run", str(cfg), "--quiet"]) == 1
    assert f"127.0.0.1:{port}" in _one_error_line(capsys, "fedtune: error: ")


def test_ctrl_c_says_how_to_resume_and_debug_shows_the_traceback(tiny_experiment, tmp_path, capsys, monkeypatch):
    import pytest

    import fedtune.experiment

    cfg = tmp_path / "exp.toml"
    exp = tiny_experiment()
    cfg.write_text(exp.to_toml())

    def interrupted(*args, **kwargs):
        (exp.resolved_output_dir / "checkpoint").mkdir(parents=True)  # a round finished before Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(fedtune.experiment, "run_experiment", interrupted)
    assert main(["run", str(cfg), "--quiet"]) == 130
    err = _one_error_line(capsys, "fedtune: interrupted")
    assert f"continue it with `fedtune run --resume {exp.resolved_output_dir}`" in err
    monkeypatch.setattr(fedtune.experiment, "run_experiment", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        main(["--debug", "run", str(cfg), "--quiet"])


def test_help_and_version_import_no_heavy_library():
    """``fedtune --help``, ``run --help`` and ``--version`` answer without importing torch, transformers or flwr."""
    import subprocess
    import sys

    from fedtune import __version__

    probe = ("import sys\nfrom fedtune.cli import main\n"
             "for argv in (['--help'], ['run', '--help'], ['node', '--help'], ['--version']):\n"
             "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'flwr', 'datasets', 'peft') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert f"fedtune {__version__}" in out and "HEAVY []" in out, out[-500:]


def test_config_commands_import_no_heavy_library(tmp_path):
    """``fedtune config`` checks every strategy's options, codecs and privacy without loading torch:
    the strategy files bind torch and fedtune's tensor modules lazily (``fedtune.lazy_import``)."""
    import subprocess
    import sys

    cfg = tmp_path / "exp.toml"
    cfg.write_text('[strategy]\nname = "scaffold"\nserver_lr = 0.5\n[federation]\ncodec_up = "topk:0.1+int8+gzip"\n'
                   'error_feedback = true\n[privacy]\nenabled = false\n')
    probe = ("import sys, io, contextlib\nfrom fedtune.cli import main\n"
             f"for argv in (['config'], ['config', {str(cfg)!r}], ['config', '--set', 'model.lora.aggregation=\"svd\"'],"
             " ['config', '--set', 'strategy.name=\"krum\"', '--set', 'privacy.enabled=true']):\n"
             "    with contextlib.redirect_stdout(io.StringIO()) as out:\n        assert main(argv) == 0, argv\n"
             "    assert '[strategy]' in out.getvalue()\n"
             "loaded = sorted(m for m in ('torch._C', 'transformers', 'flwr', 'datasets', 'peft', 'numpy') if m in sys.modules)\n"
             "print('LOADED', loaded)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and "LOADED []" in out.stdout, (out.stdout + out.stderr)[-1500:]


def test_lazy_module_loads_on_first_use_and_refuses_a_missing_module():
    import subprocess
    import sys

    import pytest

    from fedtune.lazy_import import lazy_module

    with pytest.raises(ModuleNotFoundError, match="no_such_fedtune_module"):
        lazy_module("fedtune.no_such_fedtune_module")
    probe = ("import sys, threading\nfrom fedtune.lazy_import import lazy_module\n"
             "m = lazy_module('fedtune.tensors')\nassert 'fedtune.tensors' not in sys.modules\n"
             "before = 'torch._C' in sys.modules\nclone = m.clone\nafter = 'torch._C' in sys.modules\n"
             "import fedtune.tensors\nassert clone is fedtune.tensors.clone\n"
             "agg = lazy_module('fedtune.aggregate')\ngot = []\n"
             "threads = [threading.Thread(target=lambda: got.append(agg.weighted_mean)) for _ in range(4)]\n"
             "[t.start() for t in threads]\n[t.join() for t in threads]\n"
             "import fedtune.aggregate\nassert got == [fedtune.aggregate.weighted_mean] * 4, got\n"
             "import torch\nprint('BEFORE', before, 'AFTER', after, float(clone({'a': torch.ones(2)})['a'].sum()))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "BEFORE False AFTER True 2.0" in out, out
