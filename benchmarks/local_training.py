"""Local-training throughput: precision, padding and batched multi-adapter training, side by side.

The default workload: AG News descriptions (length 64), the embedded MiniLM-L6 with LoRA r=8 on
query/value plus the pooler/classifier head, AdamW lr 1e-3, grad clip 1.0, per-client batch 8,
one local epoch, N clients from a Dirichlet(0.5) split (mixed sizes, as in the default run).
Every configuration trains the same clients from the same global tensors through a fedtune
transport, in one process; the best of ``--repeats`` alternating passes counts.

    FEDTUNE_DATA_DIR=../shared/data python benchmarks/local_training.py [--clients 16 --examples 768 --repeats 2]

The ``compiled`` rows run the training forward through ``torch.compile`` (``train.compile``);
its one-time compile is timed apart and printed (a real run pays it once per process).

Prints client-examples per second, the peak RSS growth during the pass (psutil, sampled every
10 ms; memory freed by an earlier configuration can be reused, so read it as an upper bound on
what a configuration adds), and the ratio to the baseline (fp32, sequential, padded to max length).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import PeakRss  # noqa: E402  (same folder)

from fedtune.batching import encode_texts  # noqa: E402
from fedtune.config import DataConfig, ModelConfig  # noqa: E402
from fedtune.models import get_trainable, load_classifier, load_tokenizer  # noqa: E402
from fedtune.partition import client_ids, partition_indices  # noqa: E402
from fedtune.payload import CommStats  # noqa: E402
from fedtune.runtime.parallel import ParallelSimulationTransport  # noqa: E402
from fedtune.tasks.data import load_task_data  # noqa: E402
from fedtune.types import LocalTrainConfig, RoundPlan  # noqa: E402

MAX_LENGTH = 64

CONFIGS = [  # (label, precision, pad to max length, length bucketing, parallel clients, torch.compile)
    ("fp32 padded sequential (baseline)", "fp32", True, False, 1, False),
    ("bf16 padded", "bf16", True, False, 1, False),
    ("bf16 dynamic", "bf16", False, False, 1, False),
    ("bf16 dynamic K=4", "bf16", False, False, 4, False),
    ("bf16 dynamic K=16", "bf16", False, False, 16, False),
    ("bf16 dynamic+bucketing K=16", "bf16", False, True, 16, False),
    ("bf16 dynamic compiled", "bf16", False, False, 1, True),
    ("bf16 dynamic+bucketing compiled", "bf16", False, True, 1, True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--examples", type=int, default=768, help="training rows split over the clients")
    ap.add_argument("--batch-size", type=int, default=8, help="per-client batch size")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated config numbers (1-based) to run; baseline always")
    args = ap.parse_args()

    torch.manual_seed(0)
    task = load_task_data(DataConfig(dataset="ag_news", train_size=args.examples), seed=0)
    tok = load_tokenizer("embedded")
    train = encode_texts(tok, task.train.texts, None, task.train.labels, MAX_LENGTH, False)
    shards = partition_indices(list(task.train.labels), args.clients, "dirichlet", seed=0, alpha=0.5,
                               min_examples=args.batch_size)
    ids = client_ids(args.clients)
    client_data = {cid: train.subset(s) for cid, s in zip(ids, shards, strict=True)}
    model = load_classifier(ModelConfig(), task.num_labels, False, seed=0)
    initial = get_trainable(model)
    device = torch.device("cpu")
    configs = CONFIGS
    if args.only:
        keep = {0} | {int(x) - 1 for x in args.only.split(",")}
        configs = [c for i, c in enumerate(CONFIGS) if i in keep]

    def run(cfg) -> tuple[float, float]:
        _, precision, padded, bucketing, k, compiled = cfg
        local = LocalTrainConfig(epochs=1.0, max_steps=0, lr=1e-3, batch_size=args.batch_size, grad_clip=1.0,
                                 precision=precision, pad_to=MAX_LENGTH if padded else 0,
                                 length_bucketing=bucketing, compile=compiled)
        transport = ParallelSimulationTransport(model, client_data, pad_id=tok.pad_token_id, seed=0,
                                                device=device, parallel_clients=k)
        plan = RoundPlan(1, initial, local)
        with PeakRss() as rss:
            t0 = time.perf_counter()
            for _ in transport.run_round(plan, ids, CommStats()):
                pass
            elapsed = time.perf_counter() - t0
        return elapsed, rss.growth_mb

    # warm-up: first calls of each kernel/dtype path
    warm = {cid: client_data[cid] for cid in ids[:2]}
    for precision in ("fp32", "bf16"):
        t = ParallelSimulationTransport(model, warm, pad_id=tok.pad_token_id, seed=0, device=device,
                                        parallel_clients=2)
        for _ in t.run_round(RoundPlan(0, initial, LocalTrainConfig(0.0, 2, 1e-3, args.batch_size,
                                                                     precision=precision)), list(warm), CommStats()):
            pass

    compile_s = None
    if any(c[5] for c in configs):  # the one-time compile (torch.compile, dynamic shapes), timed apart
        t0 = time.perf_counter()
        t = ParallelSimulationTransport(model, warm, pad_id=tok.pad_token_id, seed=0, device=device,
                                        parallel_clients=1)
        for _ in t.run_round(RoundPlan(0, initial, LocalTrainConfig(0.0, 3, 1e-3, args.batch_size, precision="bf16",
                                                                     compile=True)), list(warm), CommStats()):
            pass
        compile_s = time.perf_counter() - t0
        print(f"  one-time torch.compile warm-up: {compile_s:.1f}s", file=sys.stderr, flush=True)

    times: dict[str, list[float]] = {c[0]: [] for c in configs}
    mems: dict[str, float] = {c[0]: 0.0 for c in configs}
    for _ in range(args.repeats):
        for cfg in configs:
            t, m = run(cfg)
            print(f"  {cfg[0]}: {t:.1f}s, {len(train) / t:.1f} ex/s, +{m:.0f} MB", file=sys.stderr, flush=True)
            times[cfg[0]].append(t)
            mems[cfg[0]] = max(mems[cfg[0]], m)

    sizes = sorted(len(d) for d in client_data.values())
    load = os.getloadavg()
    print(f"workload: {args.clients} clients (Dirichlet 0.5, sizes {sizes[0]}..{sizes[-1]}), {len(train)} "
          f"client-examples per pass, MiniLM-L6 LoRA r=8, length {MAX_LENGTH}, per-client batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} at the end")
    base = len(train) / min(times[configs[0][0]])
    print(f"{'configuration':<32} {'best_s':>7} {'all_s':>16} {'ex/s':>7} {'peak_rss_growth_MB':>19} {'ratio':>6}")
    for cfg in configs:
        label = cfg[0]
        best = min(times[label])
        rate = len(train) / best
        all_s = "[" + ", ".join(f"{t:.1f}" for t in times[label]) + "]"
        print(f"{label:<32} {best:>7.1f} {all_s:>16} {rate:>7.1f} {mems[label]:>19.1f} {rate / base:>5.2f}x")
    if compile_s is not None:
        print(f"one-time torch.compile warm-up (not in the passes above; paid once per process): {compile_s:.1f}s")
    best_label = max(configs, key=lambda c: len(train) / min(times[c[0]]))[0]
    best_ratio = (len(train) / min(times[best_label])) / base
    print(f"best: {best_label} at {best_ratio:.2f}x the baseline   target >= 2.0x: "
          f"{'PASS' if best_ratio >= 2.0 else 'FAIL'}")


if __name__ == "__main__":
    main()
