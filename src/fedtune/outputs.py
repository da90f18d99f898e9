"""What a run writes: resolved config, per-round JSONL metrics, summary, and the end-of-run table."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, TextIO

from fedtune.config import ConfigError, Experiment


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


RUN_FILES = ("config.toml", "metrics.jsonl", "summary.json", "checkpoint", "client_states", "model", "samples.jsonl",
             "predictions.json", "export", "node_timing.jsonl")
"""What a run writes into its output folder (``partition/`` aside: ``fedtune partition`` writes it first)."""


def run_files_in(out: Path) -> list[str]:
    """The run files already in ``out`` (empty when it holds no run)."""
    return [name for name in RUN_FILES if (out / name).exists()]


def check_output_dir(exp: Experiment, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse an output folder that would lose something, before anything is loaded or written.

    A folder holding another run is refused unless ``resume`` (continue it) or ``overwrite``
    (replace it); a file in the way or a folder that cannot be written is refused too.
    """
    out = exp.resolved_output_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a folder")
    found = run_files_in(out) if out.is_dir() else []
    if found and not (resume or overwrite):
        raise ConfigError(f"{out} already holds a run ({', '.join(found)}): continue it with "
                          f"`fedtune run --resume {out}`, pick another --output, or replace it with --overwrite")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create the output folder {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the output folder {out}: {parent} is not writable")
    return out


def clear_run_files(out: Path) -> None:
    """Remove every file a previous run left in ``out`` (:data:`RUN_FILES`; ``partition/`` stays)."""
    for name in run_files_in(out):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def prepare_output_dir(exp: Experiment, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Create the output folder and write the resolved ``config.toml`` (after :func:`check_output_dir`).

    ``overwrite`` first removes every file of the previous run (:data:`RUN_FILES`), so the folder
    never mixes two runs; a resumed run keeps its ``metrics.jsonl`` and checkpoint
    (:mod:`fedtune.checkpoint`).
    """
    out = check_output_dir(exp, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        clear_run_files(out)
    (out / "config.toml").write_text(exp.to_toml())
    return out


class JsonlWriter:
    """Round callback appending one JSON line per round to ``metrics.jsonl``."""

    def __init__(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        self.path = path
        self.extra = extra or {}

    def __call__(self, state, record: dict) -> None:
        """Append the round's record to metrics.jsonl (a RoundCallback)."""
        with self.path.open("a") as fh:
            fh.write(json.dumps(_jsonable({**self.extra, **record})) + "\n")


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json``."""
    path.write_text(json.dumps(_jsonable(summary), indent=2) + "\n")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def format_table(history: list[dict], headline: str) -> str:
    """A fixed-width table of the rounds: loss, headline metric, bytes, time."""
    cols = ["round", "clients", "train_loss", f"eval_{headline}", "eval_loss", "bytes_up", "bytes_down", "wall_time"]
    cols = [c for c in cols if any(c in r for r in history)]
    rows = [[_fmt(r.get(c)) for c in cols] for r in history]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def print_table(history: list[dict], headline: str, stream: TextIO) -> None:
    """Print :func:`format_table` to ``stream``."""
    if history:
        print(format_table(history, headline), file=stream)
