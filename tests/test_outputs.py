"""fedtune.outputs: an output folder that holds a run is never lost or mixed with another run."""

from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager

import pytest

from fedtune.cli import main
from fedtune.config import ConfigError
from fedtune.experiment import run_experiment
from fedtune.tasks.data import DataError


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(tiny_experiment):
    exp = tiny_experiment("federation.rounds=1")
    run_experiment(exp, quiet=True)
    return exp


def test_a_folder_holding_a_run_is_refused_and_left_as_it_was(finished_run, tiny_experiment):
    folder = finished_run.resolved_output_dir
    before = _snapshot(folder)
    assert {"config.toml", "metrics.jsonl", "summary.json"} <= {str(p) for p in before}
    again = tiny_experiment("federation.rounds=2")  # another run, same folder
    with pytest.raises(ConfigError, match=r"already holds a run \(config.toml, metrics.jsonl, summary.json, "
                                          r"checkpoint, model\): continue it with `fedtune run --resume"):
        run_experiment(again, quiet=True)
    assert _snapshot(folder) == before


def test_overwrite_that_fails_on_bad_data_loses_nothing(finished_run, tiny_experiment, tmp_path):
    folder = finished_run.resolved_output_dir
    before = _snapshot(folder)
    broken = tiny_experiment(f'data.train_file="{tmp_path / "missing.csv"}"')
    with pytest.raises(DataError):
        run_experiment(broken, quiet=True, overwrite=True)
    assert _snapshot(folder) == before  # the folder is only cleared once data and model have loaded


def test_overwrite_replaces_every_file_of_the_old_run(finished_run, tiny_experiment):
    folder = finished_run.resolved_output_dir
    (folder / "predictions.json").write_text("{}")  # a file the new (classification) run never writes
    result = run_experiment(tiny_experiment("federation.rounds=2"), quiet=True, overwrite=True)
    assert not (folder / "predictions.json").exists()
    assert [r["round"] for r in result.history] == [1, 2]
    assert "rounds = 2" in (folder / "config.toml").read_text()


def test_a_folder_with_only_a_partition_is_not_a_run(tiny_experiment, tmp_path):
    exp = tiny_experiment()
    assert main(["partition", _file(exp, tmp_path)]) == 0
    assert [p.name for p in exp.resolved_output_dir.iterdir()] == ["partition"]
    run_experiment(exp, quiet=True)  # the walk-throughs partition first, then run into the same folder
    assert (exp.resolved_output_dir / "summary.json").is_file()


def test_cli_refuses_in_one_line_and_resume_with_overwrite(finished_run, capsys, tmp_path):
    folder = finished_run.resolved_output_dir
    assert main(["run", _file(finished_run, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtune: config error: ") and "already holds a run" in err and err.count("\n") == 1
    assert main(["run", "--resume", str(folder), "--overwrite"]) == 2
    assert "--resume continues the run in OUT_DIR and --overwrite replaces it" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_refused(tiny_experiment, tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run_experiment(tiny_experiment(f'output_dir="{path}"'), quiet=True)


def test_output_dir_inside_a_file_is_refused(tiny_experiment, tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a folder")
    with pytest.raises(ConfigError, match=rf"cannot create the output folder {path}/run: {path} is a file"):
        run_experiment(tiny_experiment(f'output_dir="{path / "run"}"'), quiet=True)


@contextmanager
def _read_only(folder):
    """``folder`` made immutable (``chattr +i``: not even root may write in it), restored on exit."""
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (needs CAP_LINUX_IMMUTABLE on ext4/xfs)")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_unwritable_output_folder_is_one_line_and_loses_nothing(finished_run, tiny_experiment, tmp_path, capsys):
    """A new run under a read-only folder, and --overwrite of a run in a read-only folder: refused up front."""
    locked = tmp_path / "locked"
    locked.mkdir()
    with _read_only(locked):
        assert main(["run", _file(tiny_experiment(f'output_dir="{locked / "run"}"'), tmp_path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err == f"fedtune: config error: cannot write the output folder {locked / 'run'}: {locked} is not writable\n"
        assert list(locked.iterdir()) == []
    folder = finished_run.resolved_output_dir
    before = _snapshot(folder)
    with _read_only(folder):
        assert main(["run", _file(finished_run, tmp_path), "--overwrite", "--quiet"]) == 2
        assert f"{folder} is not writable" in capsys.readouterr().err
    assert _snapshot(folder) == before


def _file(exp, tmp_path) -> str:
    """``exp`` as an experiment file for the command line."""
    path = tmp_path / "experiment.toml"
    path.write_text(exp.to_toml())
    return str(path)
