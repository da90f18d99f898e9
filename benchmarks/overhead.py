"""fedtune's simulation against a plain hand-written federated loop, same workload, one process.

Both sides: the embedded MiniLM with LoRA (r=8), AG News descriptions tokenized once, N clients
of M examples each, R rounds of one local epoch with AdamW, FedAvg by example count, no evaluation.
The plain loop is what one writes by hand: one peft model, per client load the global adapter,
train, take the delta, accumulate the weighted mean. Both sides use the same data order, so the
global models they produce must agree (checked), i.e. the timings compare equal work.

    FEDTUNE_DATA_DIR=../shared/data python benchmarks/overhead.py [--clients 6 --examples 64 --rounds 2 --repeats 2]

Prints each side's time and peak RSS growth, and ratio = fedtune / plain (target <= 1.10).
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch

from fedtune import tensors
from fedtune.batching import encode_texts, iterate_batches
from fedtune.config import DataConfig, ModelConfig
from fedtune.models import get_trainable, load_classifier, load_tokenizer, set_trainable
from fedtune.partition import client_ids, partition_indices
from fedtune.runtime.simulation import SimulationTransport, client_seed
from fedtune.server import run_rounds
from fedtune.strategies import FedAvg
from fedtune.tasks.data import load_task_data
from fedtune.types import LocalTrainConfig


class PeakRss:
    """Samples this process's RSS every 10 ms; reports the peak above the starting value."""

    def __init__(self) -> None:
        self.proc = psutil.Process()

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def plain_loop(model, client_data, initial, rounds, local, pad_id):
    """The hand-written baseline: no framework, just the loop."""
    global_params = tensors.clone(initial)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for rnd in range(1, rounds + 1):
        acc, total = None, 0
        for cid, data in client_data.items():
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(global_params[n])
            opt = torch.optim.AdamW(named.values(), lr=local.lr, weight_decay=local.weight_decay)
            gen = torch.Generator().manual_seed(client_seed(0, rnd, cid))
            torch.manual_seed(client_seed(0, rnd, cid))  # dropout masks, as fedtune seeds them
            model.train()
            for batch in iterate_batches(data, local.batch_size, pad_id, gen):
                loss = model(**batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(named.values(), local.grad_clip)
                opt.step()
            delta = {n: p.detach() - global_params[n] for n, p in named.items()}
            if acc is None:
                acc = {n: d * len(data) for n, d in delta.items()}
            else:
                for n, d in delta.items():
                    acc[n] += d * len(data)
            total += len(data)
        global_params = {n: global_params[n] + acc[n] / total for n in acc}
    return global_params


def fedtune_loop(model, client_data, initial, rounds, local, pad_id):
    """The same workload through fedtune's strategy, round loop and simulation transport."""
    strategy = FedAvg(local=local)
    transport = SimulationTransport(model, client_data, pad_id=pad_id, seed=0, device=torch.device("cpu"))
    state, _ = run_rounds(strategy, transport, list(client_data), strategy.init(initial),
                          rounds=rounds, per_round=len(client_data), seed=0)
    return state.params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--examples", type=int, default=64, help="examples per client")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats; the best time of each side counts")
    args = ap.parse_args()

    torch.manual_seed(0)
    task = load_task_data(DataConfig(dataset="ag_news", train_size=args.clients * args.examples), seed=0)
    tok = load_tokenizer("embedded")
    train = encode_texts(tok, task.train.texts, None, task.train.labels, 64, False)
    shards = partition_indices(list(task.train.labels), args.clients, "iid", seed=0, min_examples=1)
    client_data = {cid: train.subset(s) for cid, s in zip(client_ids(args.clients), shards, strict=True)}
    model = load_classifier(ModelConfig(), task.num_labels, False, seed=0)
    initial = get_trainable(model)
    local = LocalTrainConfig(epochs=1.0, max_steps=0, lr=1e-3, batch_size=16, grad_clip=1.0)
    pad_id = tok.pad_token_id

    times = {"plain": [], "fedtune": []}
    mem = {"plain": 0.0, "fedtune": 0.0}
    results = {}
    fns = {"plain": plain_loop, "fedtune": fedtune_loop}
    plain_loop(model, {k: v.subset(range(16)) for k, v in list(client_data.items())[:1]}, initial, 1, local, pad_id)
    for _ in range(args.repeats):
        for name in ("plain", "fedtune"):
            set_trainable(model, initial)
            with PeakRss() as rss:
                t0 = time.perf_counter()
                results[name] = fns[name](model, client_data, initial, args.rounds, local, pad_id)
                times[name].append(time.perf_counter() - t0)
            mem[name] = max(mem[name], rss.growth_mb)

    diff = max(float((results["plain"][k] - results["fedtune"][k]).abs().max()) for k in initial)
    examples = args.clients * args.examples * args.rounds
    print(f"workload: {args.clients} clients x {args.examples} examples x {args.rounds} rounds "
          f"= {examples} client-examples, LoRA r=8 MiniLM-L6, {torch.get_num_threads()} threads")
    print(f"{'side':8} {'best_s':>8} {'all_s':>20} {'ex/s':>7} {'peak_rss_growth_MB':>19}")
    for name in ("plain", "fedtune"):
        best = min(times[name])
        print(f"{name:8} {best:8.2f} {str([round(t, 2) for t in times[name]]):>20} {examples / best:7.1f} "
              f"{mem[name]:19.1f}")
    ratio = min(times["fedtune"]) / min(times["plain"])
    print(f"ratio (fedtune / plain): {ratio:.3f}   target <= 1.10: {'PASS' if ratio <= 1.10 else 'FAIL'}")
    print(f"max |global params difference| between the two sides: {diff:.2e} (same work when ~0)")


if __name__ == "__main__":
    main()
