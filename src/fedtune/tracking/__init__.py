"""Experiment tracking: a run's config, round metrics and final files in TensorBoard, MLflow or W&B.

``[tracking] backends = [...]`` turns trackers on (:class:`fedtune.config.tracking.TrackingConfig`).
:func:`open_trackers` opens one tracked run per backend, importing each library only then (a missing
one is a one-line :class:`TrackingError` naming ``pip install -e ".[tracking]"``); the returned
:class:`Trackers` is the server loop's round callback, logs the final files with :meth:`Trackers.finish`,
and as a context manager ends the tracked runs FAILED when the run raises. A tracker that fails while
the run goes on is reported on stderr in one line and dropped: the run and its folder do not depend on it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedtune.errors import one_line
from fedtune.tracking.base import (
    FAILED,
    FINISHED,
    INSTALL_HINT,
    KILLED,
    Tracker,
    TrackingError,
    flat_config,
    numeric_metrics,
)

__all__ = ["BACKENDS", "FAILED", "FINISHED", "INSTALL_HINT", "KILLED", "Tracker", "Trackers", "TrackingError",
           "check_installed", "flat_config", "numeric_metrics", "open_trackers", "render_plots"]

log = logging.getLogger(__name__)

BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("fedtune.tracking.tensorboard_tracker", "tensorboard"),
    "mlflow": ("fedtune.tracking.mlflow_tracker", "mlflow"),
    "wandb": ("fedtune.tracking.wandb_tracker", "wandb"),
}
"""Backend name -> (fedtune's module for it, the library it needs)."""


def check_installed(exp) -> None:
    """Refuse, before anything is loaded, a ``tracking.backends`` entry whose library is not installed."""
    for backend in exp.tracking.backends:
        library = BACKENDS[backend][1]
        if importlib.util.find_spec(library) is None:
            raise TrackingError(f"tracking.backends names {backend!r} but {library} is not installed; "
                                f"install the trackers with: {INSTALL_HINT}")


def render_plots(run_dir: Path) -> list[Path]:
    """The run's plots: ``fedtune report``'s PNGs drawn into ``<run_dir>/plots/``, and any PNG in ``run_dir``."""
    run_dir = Path(run_dir)
    try:
        from fedtune.report import build_report

        build_report([run_dir], run_dir / "plots")
    except Exception as exc:  # noqa: BLE001 - plots are a bonus: the tracked run still gets its other files
        log.warning("tracking: no plots for %s: %s", run_dir, one_line(str(exc)))
    return sorted(run_dir.glob("*.png")) + sorted((run_dir / "plots").glob("*.png"))


class Trackers:
    """The tracked runs of one fedtune run (none when tracking is off: every method is then a no-op)."""

    def __init__(self, trackers: Iterable[Tracker] = ()) -> None:
        self.trackers: list[Tracker] = list(trackers)
        self.closed = False

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, what: str, fn_name: str, *args: Any, **kwargs: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, fn_name)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a tracker must not take the run (or its outputs) down
                print(f"fedtune: tracking: {tracker.name} failed to {what} ({type(exc).__name__}: "
                      f"{one_line(str(exc))}); no more logging to {tracker.name} in this run", file=sys.stderr)
                self.trackers.remove(tracker)

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """The flattened configuration to every tracker."""
        self._each("log the config", "log_params", flat)

    def log_round(self, record: Mapping[str, Any], prefix: str = "") -> None:
        """The record's numeric metrics at step ``record["round"]`` (keys prefixed with ``prefix``)."""
        if self.trackers:
            self._each("log a round", "log_round", int(record["round"]), numeric_metrics(record, prefix))

    def __call__(self, state, record: dict) -> None:
        """The server loop's round callback (:class:`fedtune.server.loop.RoundCallback`)."""
        self.log_round(record)

    def log_history(self, history: Iterable[Mapping[str, Any]]) -> None:
        """Rounds logged earlier (a resumed run's, a local baseline's: those keyed ``<client>/<metric>``)."""
        for record in history:
            client = record.get("client")
            self.log_round(record, f"{client}/" if client else "")

    def finish(self, run_dir: Path, *, log_model: bool) -> None:
        """Log the final files (``summary.json``, the model folder when ``log_model``, plots), end FINISHED."""
        if self.trackers:
            plots = render_plots(run_dir)
            self._each("log the final files", "log_artifacts", Path(run_dir), model=log_model, plots=plots)
        self.close(FINISHED)

    def close(self, status: str) -> None:
        """End every tracked run with ``status`` (once; later calls do nothing)."""
        if not self.closed:
            self.closed = True
            self._each(f"end its run as {status}", "close", status)

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close(FINISHED)
        else:  # (the run's own exception goes on; a tracker error here is one line on stderr)
            self.close(KILLED if issubclass(exc_type, KeyboardInterrupt) else FAILED)


def open_trackers(exp, out_dir: Path) -> Trackers:
    """One tracked run per ``exp.tracking.backends`` entry, its params logged; an empty :class:`Trackers` if none.

    A library that is missing, or a store that cannot be opened, is a one-line :class:`TrackingError`
    (the runs already opened are ended FAILED first).
    """
    opened = Trackers()
    if not exp.tracking.backends:
        return opened
    check_installed(exp)
    run_name = exp.tracking.run_name or exp.name
    flat = flat_config(exp.to_dict())
    for backend in exp.tracking.backends:
        module = importlib.import_module(BACKENDS[backend][0])
        try:
            tracker = module.open_tracker(exp, Path(out_dir), run_name)
        except TrackingError:
            opened.close(FAILED)
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. an unreachable MLflow server: one line naming the backend
            opened.close(FAILED)
            raise TrackingError(f"tracking: cannot start the {backend} run: {type(exc).__name__}: "
                                f"{one_line(str(exc))}") from None
        opened.trackers.append(tracker)
    opened.log_params(flat)
    return opened
