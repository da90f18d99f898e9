"""Tracking's error paths: a missing library, a tracker that fails, a run that fails."""

from __future__ import annotations

import sys

import pytest
from tracking_runs import tiny_tracked

import fedtune.server.run
from fedtune.cli import main
from fedtune.experiment import run_experiment
from fedtune.tracking import TrackingError, open_trackers
from fedtune.tracking.base import import_backend
from fedtune.tracking.tensorboard_tracker import TensorBoardTracker


@pytest.mark.parametrize("backend", ["mlflow", "tensorboard", "wandb"])
def test_missing_library_is_one_line_naming_the_extra(backend, tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, backend, None)  # (import fails, find_spec says not installed)
    exp = tiny_tracked(tiny_model_dir, tiny_csv, tmp_path / "run", f'tracking.backends=["{backend}"]')
    with pytest.raises(TrackingError) as info:
        run_experiment(exp, quiet=True)
    message = str(info.value)
    assert "\n" not in message and backend in message and 'pip install -e ".[tracking]"' in message
    assert not (tmp_path / "run").exists()  # (refused before the output folder is made)
    with pytest.raises(TrackingError, match=r"\.\[tracking\]"):
        import_backend(backend, backend)
    with pytest.raises(TrackingError, match=r"\.\[tracking\]"):
        open_trackers(exp, tmp_path / "run")


def test_missing_library_on_the_command_line(tiny_model_dir, tiny_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    cfg = tmp_path / "exp.toml"
    cfg.write_text(tiny_tracked(tiny_model_dir, tiny_csv, tmp_path / "run", 'tracking.backends=["mlflow"]').to_toml())
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[tracking]"' in err, err


def test_no_backends_opens_nothing(tmp_path):
    from fedtune.config import Experiment

    trackers = open_trackers(Experiment(), tmp_path)
    assert not trackers
    trackers(None, {"round": 1, "x": 1.0})
    trackers.finish(tmp_path, log_model=True)
    assert not list(tmp_path.iterdir())


def test_a_tracker_failing_at_close_loses_nothing(tiny_model_dir, tiny_csv, tmp_path, monkeypatch, capsys):
    def boom(self, status):
        raise RuntimeError("store went away\nsecond line")

    monkeypatch.setattr(TensorBoardTracker, "close", boom)
    exp = tiny_tracked(tiny_model_dir, tiny_csv, tmp_path / "run", 'tracking.backends=["tensorboard"]',
                       "federation.rounds=1")
    result = run_experiment(exp, quiet=True)
    assert (result.output_dir / "summary.json").is_file() and (result.output_dir / "model").is_dir()
    lines = [line for line in capsys.readouterr().err.splitlines() if "tracking" in line]
    assert lines == ["fedtune: tracking: tensorboard failed to end its run as FINISHED (RuntimeError: store went "
                     "away second line); no more logging to tensorboard in this run"]


def test_a_failing_run_ends_its_tracked_run_failed(tiny_model_dir, tiny_csv, tmp_path, monkeypatch, capsys):
    from tracking_test_reader import session_status

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fedtune.server.run, "save_model", broken_save)
    exp = tiny_tracked(tiny_model_dir, tiny_csv, tmp_path / "run", 'tracking.backends=["tensorboard"]',
                       "federation.rounds=1")
    with pytest.raises(OSError, match="disk full"):
        run_experiment(exp, quiet=True)
    assert session_status(tmp_path / "run" / "tensorboard") == "STATUS_FAILURE"
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_a_tracker_failing_at_close_does_not_mask_the_runs_error(tiny_model_dir, tiny_csv, tmp_path, monkeypatch,
                                                                 capsys):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    def boom(self, status):
        raise RuntimeError(f"cannot close {status}")

    monkeypatch.setattr(fedtune.server.run, "save_model", broken_save)
    monkeypatch.setattr(TensorBoardTracker, "close", boom)
    exp = tiny_tracked(tiny_model_dir, tiny_csv, tmp_path / "run", 'tracking.backends=["tensorboard"]',
                       "federation.rounds=1")
    with pytest.raises(OSError, match="disk full"):
        run_experiment(exp, quiet=True)
    assert "cannot close FAILED" in capsys.readouterr().err
