"""Reports: a Markdown table and PNG plots comparing finished runs (a sweep, or any run folders).

A run folder holds ``summary.json``, ``metrics.jsonl`` and ``config.toml`` (what
:func:`fedtune.experiment.run_experiment` writes). A sweep folder holds run folders. The table
shows, per run, the config keys whose values differ across the reported runs, the final and best
headline metric, rounds, bytes up/down, wall time and the last round's client divergence (when
``metrics.jsonl`` records it).

Plots overlay the runs per round: the headline eval metric (only rounds that were evaluated,
including a round-0 record), ``train_loss``, and ``divergence`` and ``uplink_error`` (each only
when some run has it).
Local-baseline runs (``mode = "local"``) have one line per client and round, marked with a
``client`` key: they are plotted as the mean over clients at each round, and their "final"
value is the mean over clients from ``summary.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from fedtune.config import Experiment, flatten_table
from fedtune.report_classes import class_sections

IGNORED_KEYS = {"name", "output_dir"}
"""Config keys that differ between any two runs by construction; never shown as 'what differs'."""


class ReportError(ValueError):
    """A folder is not a run or sweep folder, or a run's files are unreadable."""


@dataclass
class RunData:
    """One finished run as read from its folder."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    """The flattened config: ``{"strategy.name": "fedavg", ...}``."""
    records: list[dict[str, Any]]
    name: str = ""
    label: str = ""
    differs: dict[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        """The headline metric's name (without ``eval_``), e.g. ``accuracy``."""
        return self.summary.get("headline_metric", "")

    @property
    def local(self) -> bool:
        """A local baseline: one metrics line per client and round."""
        return any("client" in r for r in self.records)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Rounds that have ``key`` and its value there; client lines are averaged per round."""
        by_round: dict[int, list[float]] = defaultdict(list)
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "round" in r:
                by_round[int(r["round"])].append(float(v))
        rounds = sorted(by_round)
        return rounds, [sum(by_round[x]) / len(by_round[x]) for x in rounds]

    def final(self) -> float | None:
        """Final headline value (for a local baseline, the mean over clients)."""
        fm = self.summary.get("final_metrics") or {}
        v = fm.get(self.headline, fm.get(f"{self.headline}_mean"))
        return v if isinstance(v, (int, float)) else None

    def best(self) -> float | None:
        """Best headline value over the evaluated rounds (``best_<headline>`` in summary.json)."""
        v = self.summary.get(f"best_{self.headline}")
        return v if isinstance(v, (int, float)) else None

    def total_bytes(self, direction: str) -> int:
        """Total bytes ``up`` or ``down`` (summary total, else summed from metrics.jsonl)."""
        v = self.summary.get(f"bytes_{direction}_total")
        if isinstance(v, (int, float)):
            return int(v)
        return int(sum(r.get(f"bytes_{direction}", 0) or 0 for r in self.records))

    def final_divergence(self) -> float | None:
        """The divergence of the last round that recorded one (None when never recorded)."""
        rounds, values = self.series("divergence")
        return values[-1] if values else None


def is_run_dir(path: Path) -> bool:
    """A run folder has ``summary.json`` and ``config.toml``."""
    return (path / "summary.json").is_file() and (path / "config.toml").is_file()


def find_runs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Expand run and sweep folders into run folders; also return sweep subfolders left unfinished.

    A sweep folder's runs come in ``sweep.json`` order when it has one, else sorted by name.
    """
    runs: list[Path] = []
    unfinished: list[Path] = []
    for p in paths:
        if not p.is_dir():
            raise ReportError(f"{p}: not a folder")
        if is_run_dir(p):
            runs.append(p)
            continue
        children = sorted(c for c in p.iterdir() if c.is_dir())
        order = _sweep_order(p)
        if order:
            rank = {n: i for i, n in enumerate(order)}
            children.sort(key=lambda c: (rank.get(c.name, len(rank)), c.name))
        found = [c for c in children if is_run_dir(c)]
        if not found:
            raise ReportError(f"{p}: neither a run folder (summary.json + config.toml) nor a folder of runs")
        runs.extend(found)
        unfinished.extend(c for c in children if not is_run_dir(c) and (c / "config.toml").is_file())
    seen, unique = set(), []
    for r in runs:
        if r.resolve() not in seen:
            seen.add(r.resolve())
            unique.append(r)
    return unique, unfinished


def _sweep_order(folder: Path) -> list[str]:
    try:
        data = json.loads((folder / "sweep.json").read_text())
        return [r["name"] for r in data.get("runs", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def load_run(path: Path) -> RunData:
    """Read a run folder; errors name the file."""
    try:
        summary = json.loads((path / "summary.json").read_text())
    except ValueError as exc:
        raise ReportError(f"{path / 'summary.json'}: not valid JSON: {exc}") from None
    try:
        config = flatten_table(tomllib.loads((path / "config.toml").read_text()))
    except tomllib.TOMLDecodeError as exc:
        raise ReportError(f"{path / 'config.toml'}: not valid TOML: {exc}") from None
    records = []
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for i, line in enumerate(metrics.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    raise ReportError(f"{metrics}:{i}: not valid JSON") from None
    return RunData(path=path, summary=summary, config=config, records=records)


MAX_LABEL = 70
"""Longest plot label built from the differing keys; longer ones give way to the run names."""


def label_runs(runs: list[RunData]) -> list[str]:
    """Set each run's name, differing keys and plot label; return the differing keys (config order)."""
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):
        names = [f"{r.path.parent.name}/{r.path.name}" for r in runs]
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.config if k not in keys]
    # A run saved before a config key existed ran with that key's default: compare it as such.
    defaults = flatten_table(Experiment().to_dict())
    missing = object()

    def value(r: RunData, k: str) -> Any:
        return r.config.get(k, defaults.get(k, missing))

    def comparable(v: Any) -> str:  # 3 and 3.0 are the same setting
        return json.dumps(float(v) if isinstance(v, int) and not isinstance(v, bool) else v, default=str)

    differing = [
        k for k in keys
        if k not in IGNORED_KEYS and len({comparable(value(r, k)) for r in runs}) > 1
    ]
    short = _short_keys(differing)
    for r, name in zip(runs, names, strict=True):
        r.name = name
        r.differs = {k: (None if value(r, k) is missing else value(r, k)) for k in differing}
        r.label = ", ".join(f"{short[k]}={_fmt_value(v)}" for k, v in r.differs.items()) or name
    if max(len(r.label) for r in runs) > MAX_LABEL:  # too many differing keys to read: the run names say it
        for r in runs:
            r.label = r.name
    return differing


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Short legend names: ``strategy.mu`` -> ``mu``, ``strategy.name`` -> ``strategy``; full key if ambiguous."""
    def short(k: str) -> str:
        parts = k.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]

    shorts = [short(k) for k in keys]
    return {k: (s if shorts.count(s) == 1 else k) for k, s in zip(keys, shorts, strict=True)}


def _fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _fmt_metric(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _fmt_seconds(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(runs: list[RunData], differing: list[str]) -> str:
    """The comparison table (one row per run) in Markdown."""
    headlines = {r.headline for r in runs}
    same = len(headlines) == 1
    h = next(iter(headlines)) if same else "metric"
    cols = ["run", *differing]
    if not same:
        cols.append("metric")
    cols += [f"final {h}", f"best {h}", "rounds", "bytes up", "bytes down", "wall time"]
    has_div = any(r.final_divergence() is not None for r in runs)
    if has_div:
        cols.append("final divergence")
    rows = []
    for r in runs:
        final = _fmt_metric(r.final())
        if r.local and r.final() is not None:
            final += " (client mean)"
        row = [r.name, *(_fmt_value(r.differs.get(k)) for k in differing)]
        if not same:
            row.append(r.headline)
        row += [final, _fmt_metric(r.best()), str(r.summary.get("rounds", "-")),
                _fmt_bytes(r.total_bytes("up")), _fmt_bytes(r.total_bytes("down")),
                _fmt_seconds(r.summary.get("wall_time"))]
        if has_div:
            d = r.final_divergence()
            row.append("-" if d is None else f"{d:.4g}")
        rows.append(row)
    lines = ["| " + " | ".join(_cell(c) for c in cols) + " |",
             "|" + "|".join("---" if i < 1 + len(differing) else "---:" for i in range(len(cols))) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot(runs: list[RunData], key: str, ylabel: str, title: str, path: Path) -> Path | None:
    """Overlay ``key`` vs round for every run that has it; write a PNG; None when no run has it."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend (renders with Agg)
    from matplotlib.ticker import MaxNLocator

    series = [(r, *r.series(key if key != "headline" else f"eval_{r.headline}")) for r in runs]
    series = [(r, x, y) for r, x, y in series if x]
    if not series:
        return None
    fig = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    markers = "osD^v<>pXh*"
    styles = ["-", "--", ":", "-."]  # identical curves still show each other
    for i, (r, x, y) in enumerate(series):
        ax.plot(x, y, marker=markers[i % len(markers)], markersize=5, linewidth=1.8,
                linestyle=styles[i % len(styles)], label=r.label + (" (client mean)" if r.local else ""))
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.35)
    if len(series) <= 6:
        ax.legend(fontsize=9, loc="best", framealpha=0.85)
    else:
        fig.legend(fontsize=8, loc="outside right upper")
    fig.savefig(path)
    return path


def build_report(dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Read the runs under ``dirs``, write ``report.md`` and PNG plots into ``out``; return report.md's path.

    ``out`` defaults to the single folder given, or the common parent of several.
    """
    paths = [Path(d) for d in dirs]
    if not paths:
        raise ReportError("no folders given")
    run_dirs, unfinished = find_runs(paths)
    runs = [load_run(p) for p in run_dirs]
    if out is None:
        out = paths[0] if len(paths) == 1 else Path(os.path.commonpath([p.resolve() for p in paths]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    differing = label_runs(runs)

    headlines = {r.headline for r in runs}
    metric_name = next(iter(headlines)) if len(headlines) == 1 else "headline metric"
    plots = [
        ("headline", f"eval {metric_name}", f"Evaluation {metric_name} by round", "metric.png"),
        ("train_loss", "train loss (example-weighted mean over clients)", "Training loss by round", "loss.png"),
        ("divergence", "RMS distance of client models from their mean", "Client divergence by round",
         "divergence.png"),
        ("uplink_error", "share of each update's norm the payload left out", "Uplink codec error by round",
         "uplink_error.png"),
    ]
    written = []
    for key, ylabel, title, filename in plots:
        p = plot(runs, key, ylabel, title, out / filename)
        if p is not None:
            written.append((title, p))

    lines = [f"# Report: {len(runs)} run{'s' if len(runs) != 1 else ''}", ""]
    if differing:
        lines += ["Config keys that differ across these runs: " + ", ".join(f"`{k}`" for k in differing) + ".", ""]
    elif len(runs) > 1:
        lines += ["These runs have the same configuration (apart from name and output folder).", ""]
    lines += [markdown_table(runs, differing), ""]
    if any(r.local for r in runs):
        lines += ["Local-baseline runs: final is the mean over clients; plotted values are the mean over "
                  "clients at each round.", ""]
    if unfinished:
        lines += ["Not finished (no summary.json), left out: " + ", ".join(f"`{p}`" for p in unfinished) + ".", ""]
    for title, p in written:
        rel = os.path.relpath(p, out)
        lines += [f"## {title}", "", f"![{title}]({rel})", ""]
    lines += class_sections(runs, out)
    lines += ["Runs: " + ", ".join(f"`{r.name}` ({r.path})" for r in runs), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
