"""Sweeps: grid expansion, run names, dry run, validation before running, resume, failed runs."""

from __future__ import annotations

import json

import pytest
import tomli_w
from conftest import REPO

from fedtune import sweep as sw
from fedtune.cli import main
from fedtune.config import ConfigError
from fedtune.experiment import run_experiment


def write_sweep(tmp_path, exp, body: str, name: str = "sweep.toml"):
    """A base experiment file plus a sweep file pointing at it; output under tmp_path/out."""
    (tmp_path / "base.toml").write_text(exp.to_toml())
    path = tmp_path / name
    path.write_text(f'base = "base.toml"\noutput_dir = "{tmp_path / "out"}"\n' + body)
    return path


GRID = """
[grid]
"strategy.name" = ["fedavg", "fedprox"]
"partition.method" = ["iid", "dirichlet"]

[[runs]]
name = "alpha0.01"
set = ['partition.method="dirichlet"', "partition.alpha=0.01"]
"""


class Counter:
    """A runner that counts calls (and optionally delegates to run_experiment)."""

    def __init__(self, real: bool = False):
        self.names: list[str] = []
        self.real = real

    def __call__(self, exp, quiet=False):
        self.names.append(exp.output_dir.rsplit("/", 1)[-1])
        return run_experiment(exp, quiet=True) if self.real else None


def test_grid_expands_to_cartesian_product_plus_extra_runs(tiny_experiment, tmp_path):
    path = write_sweep(tmp_path, tiny_experiment(), GRID)
    runs = sw.plan(sw.load_sweep(path))
    assert [r.name for r in runs] == [
        "fedavg_iid", "fedavg_dirichlet", "fedprox_iid", "fedprox_dirichlet", "alpha0.01",
    ]
    by_name = {r.name: r for r in runs}
    assert by_name["fedprox_iid"].overrides == ['strategy.name="fedprox"', 'partition.method="iid"']
    e = by_name["fedprox_dirichlet"].experiment
    assert (e.strategy.name, e.partition.method) == ("fedprox", "dirichlet")
    e = by_name["alpha0.01"].experiment
    assert (e.strategy.name, e.partition.method, e.partition.alpha) == ("fedavg", "dirichlet", 0.01)
    # Everything else comes from the base file; each run has its own folder under output_dir.
    assert all(r.experiment.model.lora.r == 4 for r in runs)
    assert by_name["fedavg_iid"].output_dir == tmp_path / "out" / "fedavg_iid"
    assert len({r.experiment.name for r in runs}) == len(runs)


def test_inline_base_table_common_set_and_cli_grid(tiny_experiment, tmp_path, capsys):
    exp = tiny_experiment()
    path = tmp_path / "inline.toml"
    path.write_text(tomli_w.dumps({
        "output_dir": str(tmp_path / "out"), "set": ["federation.rounds=1"],
        "grid": {"strategy.mu": [0.0, 0.01]}, "base": exp.to_dict(),
    }))
    runs = sw.plan(sw.load_sweep(path))
    assert [r.name for r in runs] == ["mu0.0", "mu0.01"]
    assert [r.experiment.strategy.mu for r in runs] == [0.0, 0.01]
    assert all(r.experiment.federation.rounds == 1 for r in runs)

    # --grid adds an axis to the file's grid; values are TOML literals or bare words.
    assert main(["sweep", str(path), "--grid", "strategy.name=fedavg,fedprox", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs" in out and "mu0.01_fedprox" in out and 'strategy.name="fedprox"' in out


def test_parse_grid_arg_values_are_toml_literals():
    assert sw.parse_grid_arg("strategy.mu=0,0.01,1e-3") == ("strategy.mu", [0, 0.01, 0.001])
    assert sw.parse_grid_arg("strategy.name=fedavg, fedprox") == ("strategy.name", ["fedavg", "fedprox"])
    assert sw.parse_grid_arg('model.lora.target_modules=["query"],["query","value"]') == (
        "model.lora.target_modules", [["query"], ["query", "value"]],
    )
    assert sw.parse_grid_arg('data.text_column="a,b",c') == ("data.text_column", ["a,b", "c"])
    with pytest.raises(ConfigError, match="key=value1"):
        sw.parse_grid_arg("strategy.name")
    with pytest.raises(ConfigError, match="no empty value"):
        sw.parse_grid_arg("strategy.name=fedavg,")


def test_names_are_deterministic_unique_and_filesystem_safe(tmp_path):
    spec = sw.Sweep(base=None, output_dir=tmp_path, grid={
        "data.text_column": ["my text", "my-text", "a/b:c"],  # the first two slug alike
        "eval.per_client": [True, False],
    }, extra_runs=[(None, ["train.lr=0.1"]), ("custom", ["seed=3"])])
    first = sw.expand(spec)
    assert sw.expand(spec) == first
    names = [n for n, _ in first]
    assert len(set(names)) == len(names) == 8
    assert all(n == sw.slug(n) and "/" not in n and " " not in n for n in names)
    assert "b-c_per_client-true" in names and "lr0.1" in names and names[-1] == "custom"
    # The colliding pair are told apart by a hash of their overrides, both times the same.
    collided = [n for n in names if n.startswith("my-text_per_client-true")]
    assert len(collided) == 2 and collided[0] != collided[1]
    assert sw.run_name([("partition.alpha", 0.5), ("strategy.name", "fedprox")]) == "alpha0.5_fedprox"
    long = sw.run_name([("data.text_column", "x" * 200)])
    assert len(long) <= sw.MAX_NAME


def test_duplicate_explicit_names_rejected(tmp_path):
    spec = sw.Sweep(base=None, output_dir=tmp_path, extra_runs=[("a", ["seed=1"]), ("a", ["seed=2"])], source="s.toml")
    with pytest.raises(ConfigError, match="s.toml: two runs are both named 'a'"):
        sw.expand(spec)
    spec = sw.Sweep(base=None, output_dir=tmp_path, extra_runs=[("bad name/x", [])], source="s.toml")
    with pytest.raises(ConfigError, match="not a safe folder name"):
        sw.expand(spec)


def test_dry_run_lists_runs_and_runs_nothing(tiny_experiment, tmp_path, capsys, monkeypatch):
    import fedtune.experiment

    def boom(*a, **k):
        raise AssertionError("dry run must not run anything")

    monkeypatch.setattr(fedtune.experiment, "run_experiment", boom)
    path = write_sweep(tmp_path, tiny_experiment(), GRID)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 runs" in out
    for name in ("fedavg_iid", "fedprox_dirichlet", "alpha0.01"):
        assert name in out
    assert "partition.alpha=0.01" in out and "dry run" in out
    assert not (tmp_path / "out").exists()


def test_invalid_key_fails_before_any_run_naming_the_key(tiny_experiment, tmp_path, capsys):
    # The bad key is in the LAST run: nothing may start before it is found.
    body = GRID + '\n[[runs]]\nname = "typo"\nset = ["train.lrr=0.1"]\n'
    path = write_sweep(tmp_path, tiny_experiment(), body)
    counter = Counter()
    with pytest.raises(ConfigError, match=r"run 'typo'.*unknown key 'train.lrr'"):
        sw.run_sweep(sw.load_sweep(path), runner=counter)
    assert counter.names == [] and not (tmp_path / "out").exists()

    bad_type = write_sweep(tmp_path, tiny_experiment(), '[grid]\n"federation.rounds" = [1, "two"]\n', "t.toml")
    assert main(["sweep", str(bad_type)]) == 2
    err = capsys.readouterr().err
    assert "federation.rounds" in err and "t.toml" in err and not (tmp_path / "out").exists()

    assert main(["sweep", str(path), "--grid", "strategy.nam=fedavg"]) == 2
    assert "strategy.nam" in capsys.readouterr().err


def test_unknown_sweep_file_key_named(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('output_dir = "x"\n[grids]\n"seed" = [1]\n')
    with pytest.raises(ConfigError, match=r"s.toml: unknown key 'grids'"):
        sw.load_sweep(path)
    path.write_text('[grid]\n"seed" = 1\n')
    with pytest.raises(ConfigError, match=r"grid key 'seed' must be a non-empty list"):
        sw.load_sweep(path)


def test_resume_skips_finished_and_redoes_half_finished(tiny_experiment, tmp_path):
    body = '[grid]\n"strategy.name" = ["fedavg", "fedprox"]\n'
    path = write_sweep(tmp_path, tiny_experiment("federation.rounds=1"), body)
    first = Counter(real=True)
    records = sw.run_sweep(sw.load_sweep(path), runner=first, quiet=True)
    assert first.names == ["fedavg", "fedprox"] and all(r["status"] == "finished" for r in records)
    out = tmp_path / "out"
    done = out / "fedavg" / "summary.json"
    mtime = done.stat().st_mtime_ns

    # fedprox becomes half-finished: its folder exists but has no summary.json.
    (out / "fedprox" / "summary.json").unlink()
    (out / "fedprox" / "stale.txt").write_text("left over from an interrupted run")
    second = Counter(real=True)
    records = sw.run_sweep(sw.load_sweep(path), runner=second, quiet=True)
    assert second.names == ["fedprox"]
    assert done.stat().st_mtime_ns == mtime
    assert (out / "fedprox" / "summary.json").is_file() and not (out / "fedprox" / "stale.txt").exists()
    saved = json.loads((out / "sweep.json").read_text())
    assert [(r["name"], r["status"], r["reused"]) for r in saved["runs"]] == [
        ("fedavg", "finished", True), ("fedprox", "finished", False),
    ]
    assert saved["runs"][1]["overrides"] == ['strategy.name="fedprox"']
    assert saved["grid"] == {"strategy.name": ["fedavg", "fedprox"]}

    # A third pass has nothing left to do.
    third = Counter()
    sw.run_sweep(sw.load_sweep(path), runner=third, quiet=True)
    assert third.names == []


def test_finished_run_with_changed_config_is_refused(tiny_experiment, tmp_path):
    path = write_sweep(tmp_path, tiny_experiment(), '[grid]\n"strategy.mu" = [0.1]\n')
    (run,) = sw.plan(sw.load_sweep(path))
    run.output_dir.mkdir(parents=True)
    (run.output_dir / "summary.json").write_text("{}")
    (run.output_dir / "config.toml").write_text(run.experiment.to_toml())
    assert sw.plan(sw.load_sweep(path))[0].finished  # same config: fine, would be skipped

    changed = write_sweep(tmp_path, tiny_experiment("train.lr=0.5"), '[grid]\n"strategy.mu" = [0.1]\n')
    with pytest.raises(ConfigError, match="finished run with a different configuration"):
        sw.plan(sw.load_sweep(changed))

    # A folder in the way that no run wrote (no config.toml) is never deleted.
    run.output_dir.joinpath("config.toml").unlink()
    run.output_dir.joinpath("summary.json").unlink()
    (run.output_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a fedtune run folder"):
        sw.run_sweep(sw.load_sweep(path), runner=Counter())
    assert (run.output_dir / "notes.txt").is_file()


def test_failed_run_is_recorded_and_sweep_continues(tiny_experiment, tmp_path, capsys):
    exp = tiny_experiment("federation.rounds=1")
    missing = tmp_path / "missing.csv"
    body = f'[grid]\n"data.train_file" = ["{missing}", "{exp.data.train_file}"]\n'
    path = write_sweep(tmp_path, exp, body)
    assert main(["sweep", str(path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "missing.csv: FAILED" in out and "1 failed" in out
    runs = json.loads((tmp_path / "out" / "sweep.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["failed", "finished"]
    assert "missing.csv" in runs[0]["error"] and "error" not in runs[1]
    assert (tmp_path / "out" / "train.csv" / "summary.json").is_file()


def test_shipped_sweep_files_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output_dir is relative to the working directory: keep it empty
    files = sorted((REPO / "experiments" / "sweeps").glob("*.toml"))
    assert files
    for f in files:
        runs = sw.plan(sw.load_sweep(f))
        assert len(runs) >= 2 and not any(r.finished for r in runs)
