"""What a run writes: resolved config, per-round JSONL metrics, summary, and the end-of-run table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TextIO

from fedtune.config import Experiment


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def prepare_output_dir(exp: Experiment, *, resume: bool = False) -> Path:
    """Create the output folder and write the resolved ``config.toml``; clear a previous metrics.jsonl and
    checkpoint (a resumed run keeps both: see :mod:`fedtune.checkpoint`)."""
    out = exp.resolved_output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(exp.to_toml())
    if not resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        import shutil

        from fedtune.checkpoint import CHECKPOINT_DIR

        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return out


class JsonlWriter:
    """Round callback appending one JSON line per round to ``metrics.jsonl``."""

    def __init__(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        self.path = path
        self.extra = extra or {}

    def __call__(self, state, record: dict) -> None:
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
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def print_table(history: list[dict], headline: str, stream: TextIO) -> None:
    """Print :func:`format_table` to ``stream``."""
    if history:
        print(format_table(history, headline), file=stream)
