"""Communication codecs side by side: bytes each way against fp32, and final accuracy, on one standard run.

The run: the default experiment (AG News descriptions, embedded MiniLM-L6 with LoRA r=8 on
query/value plus the pooler/classifier head, AdamW lr 1e-3, batch 16, length 64, Dirichlet(0.5)
split) cut down to a stratified ``--train-size`` rows over ``--clients`` clients, ``--rounds``
rounds of FedAvg, the final model scored on a seeded ``--eval-size``-row subset of the official
test set. Every codec runs the same experiment (same seed: same partition, sampling and data
order); only ``[federation] codec_up`` / ``codec_down`` change. Top-k uplinks use error feedback
(the default ``federation.error_feedback = true``).

    FEDTUNE_DATA_DIR=../shared/data python benchmarks/codecs.py            # ~10 min on 2 CPU cores
    FEDTUNE_DATA_DIR=../shared/data python benchmarks/codecs.py --train-size 60 --eval-size 40 \\
        --clients 2 --rounds 1 --codecs "none;int8+gzip"                    # smoke test, ~1 min
    FEDTUNE_DATA_DIR=../shared/data python benchmarks/codecs.py --rounds 10 --eval-every 5 \\
        --codecs "none;topk:0.01+int8+gzip" --set 'train.optimizer="sgd"' --set train.lr=0.3   # ~25 min

Prints one row per codec: bytes up and down summed over the run (exact encoded sizes, as logged
in metrics.jsonl), their ratio to the fp32 run (``x`` = times smaller), ``left_out`` (the mean
``uplink_error`` over rounds: the share of each update's norm its payload did not carry), the
final accuracy and its change against fp32, and the run's wall time. ``--eval-every N`` adds the
accuracy curve, ``--set KEY=VALUE`` changes the standard run for every codec alike (e.g. the local
optimizer). ``--json FILE`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fedtune.config import Experiment, default_experiment
from fedtune.experiment import run_experiment

DEFAULT_CODECS = [  # (codec_up, codec_down); the first is the reference
    ("none", "none"),
    ("fp16", "fp16"),
    ("int8+gzip", "none"),
    ("int8+gzip", "int8"),
    ("topk:0.1+int8", "none"),
    ("topk:0.01+int8+gzip", "none"),
]


def parse_codecs(text: str) -> list[tuple[str, str]]:
    """``"up[/down];up[/down];..."`` -> [(up, down)], the downlink ``none`` when omitted."""
    pairs = []
    for item in text.split(";"):
        item = item.strip()
        if item:
            up, _, down = item.partition("/")
            pairs.append((up.strip(), down.strip() or "none"))
    return pairs


def experiment(args: argparse.Namespace, up: str, down: str, out: Path) -> Experiment:
    """The standard run with the given codecs, writing into ``out``."""
    min_examples = max(1, min(20, args.train_size // (4 * args.clients)))
    return Experiment.from_overrides([
        f"data.train_size={args.train_size}", f"data.eval_size={args.eval_size}",
        f"partition.num_clients={args.clients}", f"partition.min_examples={min_examples}",
        f"federation.rounds={args.rounds}", f"eval.every={args.eval_every or args.rounds}",
        f"simulation.parallel_clients={args.parallel_clients}",
        f"federation.codec_up={json.dumps(up)}", f"federation.codec_down={json.dumps(down)}",
        f"name={json.dumps('codecs-' + up + '-' + down)}", f"output_dir={json.dumps(str(out))}",
        *args.set,
    ], base=default_experiment())


def main() -> None:
    """Run every codec on the standard run and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-size", type=int, default=1000, help="training rows (stratified subset of AG News)")
    ap.add_argument("--eval-size", type=int, default=2000, help="test rows scored at the end")
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=0,
                    help="also score the model every N rounds and print the curve (default: only at the end)")
    ap.add_argument("--parallel-clients", type=int, default=1,
                    help="simulation.parallel_clients (batched local training; same for every codec)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help='change the standard run for every codec alike, e.g. --set train.optimizer=\'"sgd"\'')
    ap.add_argument("--codecs", default="", help='"up[/down];..." e.g. "none;int8+gzip/int8" (default: a set of 6)')
    ap.add_argument("--output", default="", help="keep the run folders here (default: a temporary folder)")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = ap.parse_args()

    pairs = parse_codecs(args.codecs) if args.codecs else DEFAULT_CODECS
    if pairs[0] != ("none", "none"):
        pairs.insert(0, ("none", "none"))  # the fp32 reference
    for up, down in pairs:  # fail on a bad spec before anything trains
        experiment(args, up, down, Path("."))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedtune-codecs-") as tmp:
        root = Path(args.output) if args.output else Path(tmp)
        for i, (up, down) in enumerate(pairs):
            t0 = time.perf_counter()
            result = run_experiment(experiment(args, up, down, root / f"{i:02d}"), quiet=True)
            rows.append({"codec_up": up, "codec_down": down,
                         "bytes_up": result.summary["bytes_up_total"], "bytes_down": result.summary["bytes_down_total"],
                         "accuracy": result.final_metrics["accuracy"], "seconds": time.perf_counter() - t0,
                         "curve": {h["round"]: h["eval_accuracy"] for h in result.history if "eval_accuracy" in h},
                         "uplink_error": mean([h["uplink_error"] for h in result.history if "uplink_error" in h])})
            print(f"[{i + 1}/{len(pairs)}] {up} / {down}: accuracy {rows[-1]['accuracy']:.4f}, "
                  f"{rows[-1]['seconds']:.0f}s", flush=True)
    ref = rows[0]
    for r in rows:
        r["ratio_up"] = ref["bytes_up"] / r["bytes_up"]
        r["ratio_down"] = ref["bytes_down"] / r["bytes_down"]
        r["delta_accuracy"] = r["accuracy"] - ref["accuracy"]
    print(f"\nworkload: AG News, {args.train_size} train rows over {args.clients} clients (Dirichlet 0.5), "
          f"{args.rounds} rounds FedAvg, MiniLM-L6 LoRA r=8; accuracy on {args.eval_size} test rows"
          + (f"; changed: {' '.join(args.set)}" if args.set else ""))
    print(format_table(rows))
    if args.eval_every:
        print("\naccuracy by round (change against fp32 in brackets)")
        print(format_curves(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def mean(values: list[float]) -> float | None:
    """Arithmetic mean (None for no values)."""
    return sum(values) / len(values) if values else None


def format_table(rows: list[dict]) -> str:
    """Fixed-width table: codecs, bytes and ratios each way, uplink error, accuracy and its change, seconds."""
    head = ["codec_up", "codec_down", "bytes_up", "up_x", "bytes_down", "down_x", "left_out", "accuracy", "d_acc",
            "seconds"]
    cells = [[r["codec_up"], r["codec_down"], str(r["bytes_up"]), f"{r['ratio_up']:.1f}", str(r["bytes_down"]),
              f"{r['ratio_down']:.1f}", "-" if r["uplink_error"] is None else f"{r['uplink_error']:.3f}",
              f"{r['accuracy']:.4f}", f"{r['delta_accuracy']:+.4f}", f"{r['seconds']:.0f}"]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def format_curves(rows: list[dict]) -> str:
    """One line per codec: accuracy at every scored round, with its change against the fp32 run's."""
    ref = rows[0]["curve"]
    width = max(len(f"{r['codec_up']} / {r['codec_down']}") for r in rows)
    lines = ["round".rjust(width) + "  " + "  ".join(f"{n:>16d}" for n in ref)]
    for r in rows:
        cells = [f"{a:.4f} ({a - ref[n]:+.4f})" if n in ref else f"{a:.4f}" for n, a in r["curve"].items()]
        lines.append(f"{r['codec_up']} / {r['codec_down']}".rjust(width) + "  " + "  ".join(c.rjust(16) for c in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
