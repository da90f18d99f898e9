"""Memory and throughput at scale: clients per round, population size, and the centralized ceiling.

Each case is a whole ``fedtune`` run (the embedded MiniLM, LoRA r=8, AG News at length 64, IID
shards of ``--examples`` rows per client) in a fresh Python process, so its peak resident memory
(``ru_maxrss``) is its own. Printed per case: the device, the peak RSS, the training time (the
rounds' ``round_time``, which leaves evaluation out) and the client-examples trained per second; then the
ratios the issue asks for: peak memory of the largest case over the smallest in each group (flat
means within 1.10), and each federated case's throughput over the centralized ceiling (the same
rows trained as one client's batch stream).

    FEDTUNE_DATA_DIR=../shared/data python benchmarks/scale_memory.py --clients 10,1000 --parallel 1,4 --centralized
    FEDTUNE_DATA_DIR=../shared/data python benchmarks/scale_memory.py --clients 10,1000 --rows 4000 --parallel 1,4
    FEDTUNE_DATA_DIR=../shared/data python benchmarks/scale_memory.py --strategy scaffold --clients 100 \\
        --population 100,10000 --rounds 3 --parallel 1

``--clients`` are clients per round; ``--population`` (default: the same as ``--clients``) is how
many clients the partition has (SCAFFOLD keeps a control variate for every client it has sampled,
in the run's client-state store). ``--synthetic-rows N`` trains from a local CSV of N rows made by
repeating AG News's training rows in order (AG News here has 10,001; populations of 100,000 need
more): the rows repeat, so only memory and speed are meaningful there, not accuracy.

    FEDTUNE_DATA_DIR=../shared/data python benchmarks/scale_memory.py --strategy scaffold --clients 100 \\
        --population 100,100000 --rounds 3 --parallel 1 --synthetic-rows 100000 --examples 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(spec: dict) -> None:
    """Run one case in this process and print its figures as one JSON line."""
    from fedtune.config import Experiment
    from fedtune.experiment import run_experiment
    from fedtune.precision import default_device, resolve_precision

    population, per_round, examples = spec["population"], spec["clients"], spec["examples"]
    data = ['data.dataset="ag_news"']
    if spec.get("files"):
        data = ['data.dataset="files"', f'data.train_file="{spec["files"][0]}"', f'data.eval_file="{spec["files"][1]}"',
                'data.text_column="text"', 'data.label_column="label"']
    overrides = [
        *data, "data.max_length=64", f"data.train_size={population * examples}",
        "data.eval_size=200", 'model.mode="lora"', "model.lora.r=8", "model.lora.alpha=16.0",
        f'strategy.name="{spec["strategy"]}"', f"train.lr={spec['lr']}", "train.batch_size=16",
        f'train.precision="{spec["precision"]}"', f"federation.rounds={spec['rounds']}",
        f"eval.every={spec['rounds']}", f'output_dir="{spec["out"]}"', "seed=0",
        f"simulation.parallel_clients={spec['parallel']}",
        f"simulation.state_cache={max(spec['parallel'], spec['state_cache'])}",
        f'partition.manifest_format="{spec.get("manifest_format", "auto")}"',
        f"simulation.workers={spec.get('workers', 1)}",
    ]
    if spec["strategy"] == "scaffold":
        overrides.append('train.optimizer="sgd"')
    if spec["centralized"]:
        overrides += ['mode="centralized"', "partition.num_clients=1", "partition.min_examples=1"]
    else:
        overrides += ['partition.method="iid"', f"partition.num_clients={population}",
                      f"partition.min_examples={min(examples, 1)}", f"federation.clients_per_round={per_round}"]
    exp = Experiment.from_overrides(overrides)
    device = default_device()
    t0 = time.perf_counter()
    result = run_experiment(exp, quiet=True)
    wall = time.perf_counter() - t0
    available = json.loads((result.output_dir / "summary.json").read_text())["train_rows"]
    if available < population * examples:  # (a smaller dataset than asked: the case would not be the one labelled)
        raise SystemExit(f"the training set has {available} rows, fewer than population x examples = "
                         f"{population} x {examples}; use --examples {max(available // population, 1)} or fewer clients")
    records = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r.get("round", 0) >= 1]
    train_s = sum(r.get("round_time", 0.0) for r in rounds)  # (the round loop's round_time leaves evaluation out)
    rows = per_round * examples * spec["rounds"] if not spec["centralized"] else population * examples
    print("RESULT " + json.dumps({
        "device": str(device), "precision": resolve_precision(spec["precision"], device),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "train_s": train_s,
        "wall_s": wall, "rows": rows, "examples_per_s": rows / train_s if train_s else 0.0,
        "accuracy": result.final_metrics.get("accuracy"),
    }), flush=True)


def run_case(spec: dict) -> dict:
    """``spec`` in a fresh process; its figures."""
    with tempfile.TemporaryDirectory(prefix="fedtune-scale-") as tmp:
        spec = {**spec, "out": str(Path(tmp) / "run")}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"case {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def write_synthetic(rows: int, folder: Path) -> tuple[str, str]:
    """A train CSV of ``rows`` rows (AG News's training rows repeated in order) and an eval CSV of its
    first 200 test rows, in ``folder``."""
    import csv

    from fedtune.config import DataConfig
    from fedtune.tasks.data import load_task_data

    task = load_task_data(DataConfig(dataset="ag_news", eval_size=200), seed=0)
    names = task.label_names
    evals = next(iter(task.evals.values()))
    paths = folder / "train.csv", folder / "eval.csv"
    for path, texts, labels, n in ((paths[0], task.train.texts, task.train.labels, rows),
                                   (paths[1], evals.texts, evals.labels, len(evals.texts))):
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(n):
                w.writerow([texts[i % len(texts)], names[int(labels[i % len(labels)])]])
    return str(paths[0]), str(paths[1])


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="10,1000", help="clients per round, comma-separated")
    ap.add_argument("--population", default="", help="clients in the partition, comma-separated (default: --clients)")
    ap.add_argument("--examples", type=int, default=4, help="training rows per client")
    ap.add_argument("--rows", type=int, default=0,
                    help="instead of --examples: this many rows in every case, split over its clients (so cases "
                         "differ only in how many clients share the same training)")
    ap.add_argument("--parallel", default="1,4", help="simulation.parallel_clients values, comma-separated")
    ap.add_argument("--workers", default="1", help="simulation.workers values, comma-separated")
    ap.add_argument("--strategy", default="fedavg")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--state-cache", type=int, default=128)
    ap.add_argument("--manifest-format", default="auto", choices=["auto", "json", "parquet"],
                    help="partition.manifest_format of every case (auto: Parquet above 1,000 clients)")
    ap.add_argument("--centralized", action="store_true", help="also the same rows as one centralized client")
    ap.add_argument("--synthetic-rows", type=int, default=0,
                    help="train from a local CSV of this many rows (AG News's rows repeated) instead of AG News")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    files = None
    if args.synthetic_rows:
        folder = Path(tempfile.mkdtemp(prefix="fedtune-synthetic-"))
        files = write_synthetic(args.synthetic_rows, folder)
        print(f"synthetic training file {files[0]}: {args.synthetic_rows} rows, AG News's training rows repeated",
              flush=True)

    base = dict(examples=args.examples, strategy=args.strategy, rounds=args.rounds, precision=args.precision,
                lr=args.lr, state_cache=args.state_cache, centralized=False, manifest_format=args.manifest_format,
                files=files)
    per_round = _ints(args.clients)
    # (clients per round, population): every pair with --population, else the population is the round
    pairs = [(c, p) for p in _ints(args.population) for c in per_round if c <= p] or [(c, c) for c in per_round]
    cases = []  # (group, label, spec)
    for k in _ints(args.parallel):
        for w in _ints(args.workers):
            group = f"K={k}" + (f" W={w}" if w > 1 else "")
            for c, pop in pairs:
                examples = args.rows // pop if args.rows else args.examples
                label = f"{group} clients/round={c} population={pop} x{examples}"
                cases.append((group, label, {**base, "parallel": k, "workers": w, "clients": c, "population": pop,
                                             "examples": examples}))
    if args.centralized:
        biggest = max(p for _, p in pairs)
        examples = args.rows // biggest if args.rows else args.examples
        cases.append(("ceiling", f"centralized {biggest * examples} rows",
                      {**base, "parallel": 1, "clients": 1, "population": biggest, "examples": examples,
                       "centralized": True}))
    print(f"{'case':<50} {'device':>6} {'prec':>5} {'peak_MB':>8} {'train_s':>8} {'ex/s':>7} {'acc':>6}", flush=True)
    results = []
    for group, label, spec in cases:
        r = run_case(spec)
        results.append((group, label, r))
        print(f"{label:<50} {r['device']:>6} {r['precision']:>5} {r['peak_rss_mb']:8.0f} {r['train_s']:8.1f} "
              f"{r['examples_per_s']:7.1f} {r['accuracy'] if r['accuracy'] is not None else float('nan'):6.3f}",
              flush=True)
    print()
    for group in dict.fromkeys(g for g, _, _ in results if g != "ceiling"):
        peaks = [(label, r["peak_rss_mb"]) for g, label, r in results if g == group]
        if len(peaks) > 1:
            (lo_label, lo), (hi_label, hi) = peaks[0], peaks[-1]
            print(f"memory {group}: {hi_label} / {lo_label} = {hi / lo:.3f} ({'flat' if hi / lo <= 1.10 else 'GROWS'})")
    ceiling = [r for g, _, r in results if g == "ceiling"]
    if ceiling:
        for g, label, r in results:
            if g != "ceiling" and r["rows"] == ceiling[0]["rows"]:
                print(f"throughput {label}: {r['examples_per_s'] / ceiling[0]['examples_per_s']:.2f}x the centralized "
                      f"ceiling ({r['examples_per_s']:.1f} vs {ceiling[0]['examples_per_s']:.1f} ex/s)")
    print(f"(torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}; each case a fresh process)")
    if files:
        shutil.rmtree(Path(files[0]).parent, ignore_errors=True)


if __name__ == "__main__":
    main()
