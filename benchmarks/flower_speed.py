"""A Flower round against the same round in the simulation, one sitting, with the node's per-phase breakdown.

Runs an experiment (default: the README walk-through, ``flower_app/experiment.toml``: 2 clients,
2 rounds of LoRA on the embedded MiniLM over 600 AG News rows) twice, each in its own ``fedtune run``
process: in the in-process simulation, then on real Flower processes on this machine (a SuperLink
and one SuperNode per client, each reading its shard through a manifest, as the walk-through does).
Both write ``metrics.jsonl``; the Flower run also writes ``node_timing.jsonl`` (where every reply's
time went on its node, :mod:`fedtune.runtime.flower.node_timing`).

    FEDTUNE_DATA_DIR=../shared/data python benchmarks/flower_speed.py [--experiment FILE] [--set KEY=VALUE ...]
        [--fresh-cache] [--rss] [--keep DIR]

Prints each round's time both ways and the ratio Flower / simulation (target: <= 1.5 plus a few
seconds), the end-to-end wall times, the headline metrics of both (they must agree: the runtimes
are equal), and the mean seconds per phase on the nodes for identify, each round's train, and
scoring, and the largest difference between the two runs' saved models (the runtimes must agree).
``--fresh-cache`` gives both runs an empty fedtune cache (the first run on a new machine); ``--rss``
samples every Flower process during the Flower run (``scripts/peak_rss.py``) and prints each
role's peak resident memory (SuperLink with the ServerApp, each SuperNode with its ClientApps).
Large payloads: ``--set model.mode='"full"'`` on ``embedded-llm`` moves the whole model each way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' helper that starts and stops Flower processes

from flower_processes import federation  # noqa: E402


def _fedtune(*args: str, env: dict, cwd: Path) -> float:
    """Run ``fedtune args...``; return its wall time (fail with its output when it fails)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"fedtune {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _rounds(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _phase_table(timings: list[dict]) -> list[str]:
    """Mean seconds per phase, one row per (kind, round)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for t in timings:
        groups[(t["kind"], t["round"])].append(t)
    names: list[str] = []
    for t in timings:
        names += [n for n in t["phases"] if n not in names]
    head = ["message", "n", "round trip", *names, "not on the node"]
    rows = [" | ".join(head), " | ".join("---" for _ in head)]
    for (kind, rnd), ts in groups.items():
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        trip = mean([t["round_trip"] for t in ts])
        cells = [mean([t["phases"].get(n, 0.0) for t in ts]) for n in names]
        on_node = sum(cells)
        label = kind if kind == "identify" else f"{kind} {rnd}"
        rows.append(" | ".join([label, str(len(ts)), f"{trip:.2f}", *(f"{c:.2f}" for c in cells),
                                f"{trip - on_node:.2f}"]))
    return rows


def _model_diff(a: Path, b: Path) -> float:
    """The largest absolute difference between the tensors of two runs' ``model/`` safetensors files."""
    from safetensors.torch import load_file

    files = sorted(p.name for p in (a / "model").glob("*.safetensors"))
    if not files or files != sorted(p.name for p in (b / "model").glob("*.safetensors")):
        raise SystemExit(f"the runs saved different model files: {files} / {list((b / 'model').glob('*'))}")
    worst = 0.0
    for name in files:
        x, y = load_file(a / "model" / name), load_file(b / "model" / name)
        if set(x) != set(y):
            raise SystemExit(f"{name}: the runs saved different tensors")
        worst = max([worst, *((x[k].float() - y[k].float()).abs().max().item() for k in x)])
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default=str(ROOT / "flower_app" / "experiment.toml"))
    ap.add_argument("--set", action="append", default=[], help="an override for both runs (fedtune run --set)")
    ap.add_argument("--fresh-cache", action="store_true", help="start from an empty fedtune cache (FEDTUNE_CACHE)")
    ap.add_argument("--node-threads", type=int, default=-1,
                    help="node-config threads of each SuperNode (default: this machine's cores split over the "
                         "nodes; 0: torch's default, every core for every node)")
    ap.add_argument("--rss", action="store_true", help="peak resident memory of every Flower process")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one, removed)")
    args = ap.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="flower_speed_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.fresh_cache:  # an empty fedtune cache of its own (GGUF conversions and tokenized rows start over)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        env["FEDTUNE_CACHE"] = str(cache)
    sets = [x for s in args.set for x in ("--set", s)]
    exp = str(Path(args.experiment).resolve())
    import tomllib

    clients = tomllib.loads(Path(exp).read_text()).get("partition", {}).get("num_clients", 2)
    for s in args.set:
        if s.startswith("partition.num_clients="):
            clients = int(s.split("=", 1)[1])

    if args.node_threads < 0:
        args.node_threads = max(1, (os.cpu_count() or 1) // clients)
    sim_out, fl_out = work / "sim", work / "flower"
    for out in (sim_out, fl_out):
        shutil.rmtree(out, ignore_errors=True)
    print(f"simulation: fedtune run {Path(exp).name} ({clients} clients) ...", flush=True)
    sim_wall = _fedtune("run", exp, "--output", str(sim_out), "--set", "runtime.mode=simulation", *sets,
                        env=env, cwd=work)
    _fedtune("partition", exp, "--out", str(fl_out), *sets, env=env, cwd=work)
    data_dir = os.environ.get("FEDTUNE_DATA_DIR", "")
    print(f"flower: a SuperLink and one SuperNode per client (threads={args.node_threads} each) ...", flush=True)
    with federation(work / "procs") as fed:
        fed.env = lambda: {**env, "FLWR_HOME": str(work / "procs" / "flwr-home")}  # the nodes share the cache
        fed.start_superlink()
        for i in range(clients):
            manifest = fl_out / "partition" / f"client_{i:03d}.json"
            fed.start_supernode(f"node{i}", f'manifest="{manifest}" data-dir="{data_dir}" threads={args.node_threads}')
        rss = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "peak_rss.py"), "--out", str(work / "rss.json")],
                               stdout=subprocess.DEVNULL) if args.rss else None
        try:
            fl_wall = _fedtune("run", exp, "--output", str(fl_out), "--set", "runtime.mode=flower",
                               "--set", f'runtime.superlink="{fed.address}"', "--set", "runtime.insecure=true",
                               "--set", f"runtime.min_clients={clients}", *sets, env=env, cwd=work)
        finally:
            if rss is not None:
                rss.terminate()
                rss.wait(30)
    sim, fl = _rounds(sim_out / "metrics.jsonl"), _rounds(fl_out / "metrics.jsonl")
    timings = _rounds(fl_out / "node_timing.jsonl")

    print("\n| round | simulation (s) | Flower (s) | ratio Flower / simulation |")
    print("|---|---|---|---|")
    for a, b in zip(sim, fl, strict=True):
        print(f"| {a['round']} | {a['round_time']:.1f} | {b['round_time']:.1f} | {b['round_time'] / a['round_time']:.2f} |")
    print(f"\nend to end: simulation {sim_wall:.1f} s, Flower {fl_wall:.1f} s (ratio {fl_wall / sim_wall:.2f}); "
          "the Flower side's time includes the nodes' identification")
    keys = sorted(k for k in sim[-1] if k.startswith("eval_") and k != "eval_time" and isinstance(sim[-1][k], float))
    for k in keys:
        print(f"{k}: simulation {sim[-1][k]:.6f}, Flower {fl[-1].get(k, float('nan')):.6f}")
    print("\nseconds on the nodes per message (mean over the nodes):")
    print("\n".join(_phase_table(timings)))
    print(f"\nlargest |Flower - simulation| over the saved model's tensors: {_model_diff(sim_out, fl_out):.3e}")
    print(f"bytes per round: up {fl[-1]['bytes_up']:,}, down {fl[-1]['bytes_down']:,} (Flower records); "
          f"simulation {sim[-1]['bytes_up']:,} / {sim[-1]['bytes_down']:,}")
    if args.rss:
        peaks = json.loads((work / "rss.json").read_text())
        print("peak resident memory (GB): " + ", ".join(f"{k} {v}" for k, v in peaks["peak_gb"].items())
              + f"; all at once {peaks['peak_sum_gb']}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"\nruns kept in {work}")


if __name__ == "__main__":
    main()
