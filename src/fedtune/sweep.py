"""Sweeps: a grid of experiments over any config keys, run one after another, resumable.

A sweep file (TOML) names a base experiment, a ``[grid]`` whose cartesian product gives the
runs, and optional extra ``[[runs]]`` with explicit override lists::

    base = "../default.toml"          # experiment file, relative to this file (or an inline [base] table)
    output_dir = "runs/noniid_study"  # one subfolder per run (relative to the working directory)
    set = ["federation.rounds=2"]     # optional: overrides applied to every run

    [grid]                            # cartesian product, keys in file order
    "strategy.name" = ["fedavg", "fedprox"]
    "partition.method" = ["iid", "dirichlet"]

    [[runs]]                          # optional extra runs: base + set + these overrides
    name = "alpha0.01"                # optional; derived from the overrides when absent
    set = ["partition.alpha=0.01"]

Every run is planned and validated (unknown keys, wrong types) before the first one starts.
A run whose folder has ``summary.json`` is finished and skipped when the sweep is run again;
a folder without it is a half-finished run and is redone from scratch. ``sweep.json`` in the
sweep folder lists every run with its overrides and status.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import tomli_w
import tomllib

from fedtune.config import ConfigError, Experiment, default_experiment, from_dict, read_toml

log = logging.getLogger(__name__)

SWEEP_KEYS = {"name", "base", "output_dir", "set", "grid", "runs"}
"""Top-level keys a sweep file may have (anything else is an error naming the key)."""
RUN_KEYS = {"name", "set"}
"""Keys of one ``[[runs]]`` entry."""
MAX_NAME = 80
"""Longest derived run name; longer ones are cut and given a hash of their overrides."""


@dataclass
class Sweep:
    """What to run: a base experiment, common overrides, a grid and extra named runs."""

    base: Path | dict[str, Any] | None
    """An experiment file, an inline experiment table, or None for the default experiment."""
    output_dir: Path
    grid: dict[str, list[Any]] = field(default_factory=dict)
    extra_runs: list[tuple[str | None, list[str]]] = field(default_factory=list)
    common: list[str] = field(default_factory=list)
    source: str = "<sweep>"
    """Where the sweep came from (the sweep file, or ``--grid``), used in error messages."""


@dataclass
class SweepRun:
    """One planned run: its folder name, overrides (on top of the base) and resolved experiment."""

    name: str
    overrides: list[str]
    experiment: Experiment

    @property
    def output_dir(self) -> Path:
        """The run's folder (``<sweep output>/<name>``)."""
        return Path(self.experiment.output_dir)

    @property
    def finished(self) -> bool:
        """True when the run's folder has a ``summary.json`` (a previous sweep completed it)."""
        return (self.output_dir / "summary.json").is_file()


def toml_literal(value: Any) -> str:
    """``value`` written as a TOML literal (``"fedprox"``, ``0.01``, ``true``, ``["a", "b"]``)."""
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def parse_value(text: str) -> Any:
    """A TOML literal, or the text itself when it is a bare word (``fedprox``), as ``--set`` does."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets, braces or quotes: ``1,[2,3],"a,b"`` -> 3 items."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return items


def parse_grid_arg(item: str) -> tuple[str, list[Any]]:
    """``--grid key=v1,v2,...`` -> (key, [v1, v2, ...]); each value a TOML literal or a bare word."""
    if "=" not in item:
        raise ConfigError(f"--grid {item!r}: expected key=value1,value2,...")
    key, text = item.split("=", 1)
    key = key.strip()
    values = [parse_value(v) for v in split_top_level(text)]
    if not key or not text.strip() or any(v == "" for v in values):
        raise ConfigError(f"--grid {item!r}: expected key=value1,value2,... with no empty value")
    return key, values


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file; errors name the file and the offending key."""
    path = Path(path)
    raw = read_toml(path, "sweep")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(SWEEP_KEYS))})")

    base: Path | dict[str, Any] | None = None
    if "base" in raw:
        if isinstance(raw["base"], str):
            base = (path.parent / raw["base"]).resolve()
        elif isinstance(raw["base"], dict):
            base = raw["base"]
        else:
            raise ConfigError(f"{path}: base must be an experiment file name or a [base] table")
    output = raw.get("output_dir", str(Path("runs") / raw.get("name", path.stem)))
    if not isinstance(output, str):
        raise ConfigError(f"{path}: output_dir must be a string")

    grid = raw.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: grid must be a table of key = [values]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid key {key!r} must be a non-empty list of values, got {values!r}")

    extra: list[tuple[str | None, list[str]]] = []
    runs = raw.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ConfigError(f"{path}: runs must be an array of tables ([[runs]])")
    for i, run in enumerate(runs):
        bad = sorted(set(run) - RUN_KEYS)
        if bad:
            raise ConfigError(f"{path}: runs[{i}]: unknown key {bad[0]!r} (known keys: name, set)")
        name = run.get("name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{path}: runs[{i}].name must be a string")
        extra.append((name, _string_list(run.get("set", []), f"{path}: runs[{i}].set")))

    return Sweep(
        base=base,
        output_dir=Path(output),
        grid=dict(grid),
        extra_runs=extra,
        common=_string_list(raw.get("set", []), f"{path}: set"),
        source=str(path),
    )


def _string_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of \"key=value\" strings, got {value!r}")
    return list(value)


def slug(text: str) -> str:
    """Filesystem-safe: letters, digits, ``.``, ``_``, ``-``; everything else becomes ``-``."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s or "x"


def _name_part(key: str, value: Any) -> str:
    """``strategy.name=fedprox`` -> ``fedprox``; ``strategy.mu=0.1`` -> ``mu0.1``; ``x.flag=true`` -> ``flag-true``."""
    short = key.rsplit(".", 1)[-1]
    if isinstance(value, str):
        return slug(Path(value).name if "/" in value else value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return slug(f"{short}{value}")
    return slug(f"{short}-{toml_literal(value)}")


def run_name(pairs: Sequence[tuple[str, Any]]) -> str:
    """A readable folder name from ``(key, value)`` overrides, e.g. ``fedprox_iid_mu0.1``."""
    if not pairs:
        return "base"
    name = "_".join(_name_part(k, v) for k, v in pairs)
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 9].rstrip("_-.") + "-" + _digest([f"{k}={v!r}" for k, v in pairs])
    return name


def _digest(items: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(items).encode()).hexdigest()[:8]


def _pairs(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        out.append((key.strip(), parse_value(text)))
    return out


def expand(sweep: Sweep) -> list[tuple[str, list[str]]]:
    """The runs as ``(name, overrides)``: the grid's cartesian product, then the extra runs.

    Grid names come from the values (see :func:`run_name`); a name that would repeat gets a short
    hash of its overrides appended, so names are unique and depend only on the sweep.
    """
    planned: list[tuple[str, list[str], bool]] = []  # (name, overrides, name given explicitly)
    keys = list(sweep.grid)
    if keys:
        for combo in itertools.product(*(sweep.grid[k] for k in keys)):
            pairs = list(zip(keys, combo, strict=True))
            planned.append((run_name(pairs), [f"{k}={toml_literal(v)}" for k, v in pairs], False))
    for i, (name, overrides) in enumerate(sweep.extra_runs):
        if name is not None and slug(name) != name:
            raise ConfigError(f"{sweep.source}: runs[{i}].name {name!r} is not a safe folder name (try {slug(name)!r})")
        planned.append((name or run_name(_pairs(overrides)), list(overrides), name is not None))
    if not planned:
        raise ConfigError(f"{sweep.source}: the sweep has no runs (add a [grid] or [[runs]], or --grid)")

    counts: dict[str, int] = {}
    for name, _, _ in planned:
        counts[name] = counts.get(name, 0) + 1
    result, seen = [], set()
    for name, overrides, explicit in planned:
        if counts[name] > 1 and not explicit:
            name = f"{name}-{_digest(overrides)}"
        if name in seen:
            raise ConfigError(f"{sweep.source}: two runs are both named {name!r}")
        seen.add(name)
        result.append((name, overrides))
    return result


def plan(sweep: Sweep) -> list[SweepRun]:
    """Expand the sweep and resolve every run's Experiment; any config error stops here, naming the run."""
    base_exp: Experiment | None = None
    if isinstance(sweep.base, dict):
        base_exp = from_dict(Experiment, sweep.base, source=f"{sweep.source}: [base]")
    elif sweep.base is None:
        base_exp = default_experiment()
    base_name = base_exp.name if base_exp is not None else None

    runs = []
    for name, overrides in expand(sweep):
        try:
            if isinstance(sweep.base, Path):
                exp = Experiment.from_toml(sweep.base, [*sweep.common, *overrides])
            else:
                exp = Experiment.from_overrides([*sweep.common, *overrides], base=base_exp)
            out = sweep.output_dir / name
            exp = Experiment.from_overrides(
                [f"name={toml_literal(f'{base_name or exp.name}-{name}')}", f"output_dir={toml_literal(str(out))}",
                 *tracking_overrides(exp, sweep, name)],
                base=exp,
            )
        except ConfigError as exc:
            what = ", ".join(overrides) or "no overrides"
            raise ConfigError(f"{sweep.source}: run {name!r} ({what}): {exc}") from None
        runs.append(SweepRun(name=name, overrides=list(overrides), experiment=exp))
    _check_existing_folders(runs)
    return runs


def tracking_overrides(exp: Experiment, sweep: Sweep, name: str) -> list[str]:
    """``[tracking]`` of a sweep's run: its own tracked run, all of them under one experiment named after the sweep.

    MLflow experiment / W&B project ``tracking.experiment`` (the sweep folder's name unless the base sets one),
    W&B group and MLflow tag ``tracking.group`` the sweep's name, run name the run's name, TensorBoard events
    in ``<sweep folder>/tensorboard/<run>`` (or ``<base's tensorboard_dir>/<run>``), so ``tensorboard
    --logdir <sweep folder>/tensorboard`` compares them. Nothing when tracking is off.
    """
    tracking = exp.tracking
    if not tracking.backends:
        return []
    sweep_name = sweep.output_dir.name
    tb_root = Path(tracking.tensorboard_dir) if tracking.tensorboard_dir else sweep.output_dir / "tensorboard"
    return [f"tracking.experiment={toml_literal(tracking.experiment or sweep_name)}",
            f"tracking.group={toml_literal(tracking.group or sweep_name)}",
            f"tracking.run_name={toml_literal(tracking.run_name + '-' + name if tracking.run_name else name)}",
            f"tracking.tensorboard_dir={toml_literal(str(tb_root / name))}"]


def _check_existing_folders(runs: Sequence[SweepRun]) -> None:
    """Refuse to skip a finished run whose saved config differs, or to delete a folder that is not a run's."""
    for run in runs:
        folder = run.output_dir
        if folder.is_dir() and not run.finished and not (folder / "config.toml").is_file() and any(folder.iterdir()):
            raise ConfigError(f"{folder} exists but is not a fedtune run folder (no config.toml); "
                              "refusing to delete it: move it away or choose another output folder")
        if not run.finished:
            continue
        saved_path = run.output_dir / "config.toml"
        try:
            saved = Experiment.from_toml(saved_path)
        except ConfigError:
            saved = None
        if saved is not None and run.experiment.train.precision == "auto":  # saved: auto as resolved by the run
            saved = dataclasses.replace(saved, train=dataclasses.replace(saved.train, precision="auto"))
        if saved != run.experiment:
            raise ConfigError(
                f"{run.output_dir} is a finished run with a different configuration than the sweep now asks "
                f"for (compare {saved_path}); delete that folder to redo it, or choose another output folder"
            )


def describe(runs: Sequence[SweepRun], sweep: Sweep | None = None, stream: TextIO | None = None) -> None:
    """Print the planned runs: name, whether already finished, and overrides (``--dry-run``)."""
    stream = stream or sys.stdout
    width = max(len(r.name) for r in runs)
    if sweep is not None:
        base = sweep.base if isinstance(sweep.base, Path) else ("[base] table" if sweep.base else "default experiment")
        print(f"base: {base}" + (f"; every run: {' '.join(sweep.common)}" if sweep.common else ""), file=stream)
    print(f"{len(runs)} runs", file=stream)
    for r in runs:
        state = "finished" if r.finished else ("partial" if r.output_dir.exists() else "todo")
        print(f"  {r.name.ljust(width)}  {state:<8}  {' '.join(r.overrides) or '(base)'}", file=stream)


Runner = Callable[..., Any]
"""``runner(experiment, quiet=bool)``: runs one experiment (``run_experiment`` by default)."""


def run_sweep(
    sweep: Sweep,
    *,
    quiet: bool = False,
    runner: Runner | None = None,
    stream: TextIO | None = None,
) -> list[dict[str, Any]]:
    """Plan and validate every run, then run the unfinished ones in order; return the run records.

    ``runner(experiment, quiet=...)`` defaults to :func:`fedtune.experiment.run_experiment`. A run
    that raises is recorded as failed (with its error) and the sweep continues. ``sweep.json`` in
    the sweep folder is rewritten after every run.
    """
    stream = stream or sys.stdout
    if runner is None:
        from fedtune.experiment import run_experiment

        runner = run_experiment
    run_one: Runner = runner
    runs = plan(sweep)
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = [
        {"name": r.name, "overrides": r.overrides, "output_dir": str(r.output_dir),
         "status": "finished" if r.finished else "pending", "reused": r.finished}
        for r in runs
    ]
    write_sweep_json(sweep, records)
    for i, (run, rec) in enumerate(zip(runs, records, strict=True), 1):
        prefix = f"[{i}/{len(runs)}] {run.name}"
        if rec["reused"]:
            print(f"{prefix}: finished earlier, skipped", file=stream)
            continue
        if run.output_dir.exists():
            log.info("%s: half-finished run (no summary.json), redoing it from scratch", run.output_dir)
            shutil.rmtree(run.output_dir)
        print(f"{prefix}: running ({' '.join(run.overrides) or 'base'})", file=stream, flush=True)
        rec["status"] = "running"
        write_sweep_json(sweep, records)
        t0 = time.perf_counter()
        try:
            result = run_one(run.experiment, quiet=quiet)
        except Exception as exc:  # noqa: BLE001 - one broken run must not stop the sweep
            rec.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            log.debug("run %s failed:\n%s", run.name, traceback.format_exc())
            print(f"{prefix}: FAILED: {rec['error']}", file=stream, flush=True)
        except BaseException:
            rec["status"] = "interrupted"
            write_sweep_json(sweep, records)
            raise
        else:
            rec["status"] = "finished"
            headline = _headline(result)
            if headline:
                rec["headline"] = headline
            print(f"{prefix}: finished in {time.perf_counter() - t0:.1f}s"
                  + (f" ({headline[0]} {headline[1]:.4f})" if headline else ""), file=stream, flush=True)
        rec["wall_time"] = time.perf_counter() - t0
        write_sweep_json(sweep, records)
    failed = [r["name"] for r in records if r["status"] == "failed"]
    done = sum(r["status"] == "finished" for r in records)
    print(f"sweep: {done}/{len(records)} finished" + (f", {len(failed)} failed: {', '.join(failed)}" if failed else "")
          + f"; outputs in {sweep.output_dir}", file=stream)
    return records


def _headline(result: Any) -> tuple[str, float] | None:
    summary: dict[str, Any] = getattr(result, "summary", None) or {}
    key = summary.get("headline_metric")
    if not isinstance(key, str) or not key:
        return None
    final = summary.get("final_metrics") or {}
    value = final.get(key, final.get(f"{key}_mean"))
    return (key, float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def write_sweep_json(sweep: Sweep, records: list[dict[str, Any]]) -> Path:
    """Write ``sweep.json`` (sweep source, base, grid, and every run's overrides and status) atomically."""
    path = sweep.output_dir / "sweep.json"
    data = {
        "source": sweep.source,
        "base": str(sweep.base) if isinstance(sweep.base, Path) else ("[base]" if sweep.base else "default"),
        "set": sweep.common,
        "grid": sweep.grid,
        "runs": records,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
