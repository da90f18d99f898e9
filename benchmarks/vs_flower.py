"""fedtune against Flower's simulation engine (Ray) on the same federated workload, in one run.

The workload on every side: AG News descriptions (length 64, dynamic padding), the embedded
MiniLM-L6 with LoRA r=8 on query/value plus the pooler/classifier head, N IID clients of M
examples, R rounds of one local epoch of AdamW (lr 1e-3, batch 16, grad clip 1.0), FedAvg by
example count, then the global model scored on the same 200 AG News test rows (fp32, batches of 64).

- ``flower``: a Flower 1.41 app written as Flower's own examples write one — a ``ClientApp``
  whose ``train`` loads the global arrays into a peft model, trains the hand-written loop and
  replies with the arrays and ``num-examples``; a ``ServerApp`` running Flower's ``FedAvg``
  strategy — under ``flwr.simulation.run_simulation`` (Ray), each virtual client on 1 CPU (so
  this 2-core machine runs 2 at once), each actor keeping its model and tokenized rows resident
  between messages (kinder to Flower than its examples, which rebuild them per message).
  ``--flower-precision bf16`` runs its loop under bf16 autocast.
- ``fedtune default``: ``fedtune run`` with the defaults (``train.precision = "auto"``: bf16 on a
  CPU with AVX-512 BF16 / AMX, fp32 elsewhere; one client after another).
- ``fedtune fast``: bf16, length bucketing and one worker process per core (``simulation.workers``,
  one thread each: the same layout as Ray's one virtual client per CPU).
- ``fedtune batched``: bf16, length bucketing and 4 clients batched in one process
  (``simulation.parallel_clients = 4``; the fast path before workers existed).
- ``fedtune both`` (on request, ``--sides``): workers and batched groups of 4 in each.

Each side runs in a fresh process; its wall time is end to end (imports, Ray's start, model load,
tokenization, rounds, scoring), and its memory is measured system-wide (the machine's used memory
above what it was before the side started, sampled every 50 ms), since Ray spreads over processes.

    FEDTUNE_DATA_DIR=../shared/data python benchmarks/vs_flower.py [--shapes 10x64x2,100x8x1]

Prints per shape and side: wall time, peak memory, accuracy; then Flower / fedtune ratios of time
(speed-up) and of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

EVAL_ROWS = 200
MAX_LENGTH = 64


# ---- the Flower side: a plain Flower app -------------------------------------------------------
def _flower_resident(spec: dict) -> dict:
    """Model, tokenized rows and shards of this Ray actor (built at its first message, then kept)."""
    import fedtune  # (state of an imported module outlives the ClientApp however Ray hands it to the actor)

    cache = fedtune.__dict__.setdefault("_vs_flower_cache", {})
    if not cache:
        import torch

        from fedtune.batching import encode_texts
        from fedtune.config import DataConfig, ModelConfig
        from fedtune.models import load_classifier, load_tokenizer
        from fedtune.partition import partition_indices
        from fedtune.tasks.data import load_task_data

        torch.set_num_threads(1)
        task = load_task_data(DataConfig(dataset="ag_news", train_size=spec["clients"] * spec["examples"],
                                         eval_size=EVAL_ROWS), seed=0)
        tok = load_tokenizer("embedded")
        train = encode_texts(tok, task.train.texts, None, task.train.labels, MAX_LENGTH, False)
        shards = partition_indices(list(task.train.labels), spec["clients"], "iid", seed=0, min_examples=1)
        model = load_classifier(ModelConfig(), task.num_labels, False, seed=0)
        cache.update(model=model, train=train, shards=shards, pad_id=tok.pad_token_id)
    return cache


def _flower_client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        from fedtune.batching import iterate_batches

        spec = json.loads(os.environ["VS_FLOWER_SPEC"])
        res = _flower_resident(spec)
        model, pid = res["model"], int(context.node_config["partition-id"])
        data = res["train"].subset(res["shards"][pid])
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        arrays = msg.content["arrays"].to_torch_state_dict()
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(arrays[n])
        opt = torch.optim.AdamW(named.values(), lr=1e-3, weight_decay=0.0)
        gen = torch.Generator().manual_seed(1000 * int(msg.content["config"]["server-round"]) + pid)
        model.train()
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if spec["flower_precision"] == "bf16"
                    else torch.autocast("cpu", enabled=False))
        total, steps = 0.0, 0
        for batch in iterate_batches(data, 16, res["pad_id"], gen):
            with autocast:
                loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(named.values(), 1.0)
            opt.step()
            total, steps = total + float(loss), steps + 1
        reply = RecordDict({"arrays": ArrayRecord(torch_state_dict={n: p.detach().clone() for n, p in named.items()}),
                            "metrics": MetricRecord({"num-examples": len(data), "train_loss": total / max(steps, 1)})})
        return Message(content=reply, reply_to=msg)

    return app


def _flower_server_app(spec: dict):
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        import torch

        from fedtune.config import ModelConfig
        from fedtune.models import get_trainable, load_classifier, set_trainable

        model = load_classifier(ModelConfig(), 4, False, seed=0)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=spec["clients"],
                          min_available_nodes=spec["clients"])
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_state_dict=get_trainable(model)),
                                num_rounds=spec["rounds"], train_config=ConfigRecord({"lr": 1e-3}))
        set_trainable(model, result.arrays.to_torch_state_dict())
        Path(spec["out"]).write_text(json.dumps({"accuracy": _accuracy(model, torch)}))

    return app


def _accuracy(model, torch) -> float:
    """Accuracy of ``model`` on the benchmark's eval rows (fp32, batches of 64: the same for every side)."""
    from fedtune.batching import collate, encode_texts
    from fedtune.config import DataConfig
    from fedtune.models import load_tokenizer
    from fedtune.tasks.data import load_task_data

    task = load_task_data(DataConfig(dataset="ag_news", train_size=8, eval_size=EVAL_ROWS), seed=0)
    tok = load_tokenizer("embedded")
    split = next(iter(task.evals.values()))  # (AG News has one: the test set)
    rows = encode_texts(tok, split.texts, None, split.labels, MAX_LENGTH, False)
    model.eval()
    right = 0
    with torch.inference_mode():
        for start in range(0, len(rows), 64):
            batch = collate(rows, range(start, min(start + 64, len(rows))), tok.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            right += int((logits.argmax(-1) == batch["labels"]).sum())
    return right / len(rows)


def flower_side(spec: dict) -> None:
    """Run the Flower app under Ray in this process."""
    from flwr.simulation import run_simulation

    os.environ["VS_FLOWER_SPEC"] = json.dumps(spec)  # (Ray's workers inherit the driver's environment)
    run_simulation(server_app=_flower_server_app(spec), client_app=_flower_client_app(),
                   num_supernodes=spec["clients"],
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count(), "logging_level": "ERROR",
                                                 "log_to_driver": False}})


# ---- the fedtune sides -------------------------------------------------------------------------
def fedtune_side(spec: dict) -> None:
    """``fedtune run`` on the same workload (default, or the fast path), then the shared scoring."""
    import torch

    from fedtune.checkpoint import read_checkpoint
    from fedtune.config import Experiment, ModelConfig
    from fedtune.experiment import run_experiment
    from fedtune.models import load_classifier, set_trainable

    overrides = [
        'data.dataset="ag_news"', f"data.max_length={MAX_LENGTH}", f"data.train_size={spec['clients'] * spec['examples']}",
        f"data.eval_size={EVAL_ROWS}", 'model.mode="lora"', "model.lora.r=8", "model.lora.alpha=16.0",
        'partition.method="iid"', f"partition.num_clients={spec['clients']}", "partition.min_examples=1",
        f"federation.rounds={spec['rounds']}", f"eval.every={spec['rounds']}", "train.lr=1e-3",
        "train.batch_size=16", "train.grad_clip=1.0", f'output_dir="{Path(spec["out"]).with_suffix("")}"', "seed=0",
    ]
    if spec["side"] == "fedtune fast":
        overrides += ['train.precision="bf16"', "train.length_bucketing=true", f"simulation.workers={os.cpu_count()}"]
    elif spec["side"] == "fedtune batched":
        overrides += ['train.precision="bf16"', "train.length_bucketing=true", "simulation.parallel_clients=4"]
    elif spec["side"] == "fedtune both":
        overrides += ['train.precision="bf16"', "train.length_bucketing=true", "simulation.parallel_clients=4",
                      f"simulation.workers={os.cpu_count()}"]
    result = run_experiment(Experiment.from_overrides(overrides), quiet=True)
    model = load_classifier(ModelConfig(), 4, False, seed=0)  # scored exactly as the Flower side is scored
    set_trainable(model, read_checkpoint(result.output_dir).state.params)
    Path(spec["out"]).write_text(json.dumps({"accuracy": _accuracy(model, torch),
                                             "fedtune_accuracy": result.final_metrics.get("accuracy")}))


# ---- the driver --------------------------------------------------------------------------------
def _used_memory() -> int:
    import psutil

    vm = psutil.virtual_memory()
    return vm.total - vm.available


def run_side(spec: dict) -> dict:
    """One side in a fresh process: wall time, peak system-wide memory above the start, accuracy."""
    with tempfile.TemporaryDirectory(prefix="vs-flower-") as tmp:
        spec = {**spec, "out": str(Path(tmp) / "result.json")}
        base = peak = _used_memory()
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _used_memory())
                time.sleep(0.05)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--side", json.dumps(spec)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        stop.set()
        thread.join()
        if proc.returncode != 0 or not Path(spec["out"]).is_file():
            raise SystemExit(f"{spec['side']} failed:\n{proc.stderr[-4000:]}")
        out = json.loads(Path(spec["out"]).read_text())
    return {"wall_s": wall, "memory_mb": (peak - base) / 2**20, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="10x64x2,100x8x1", help="CLIENTSxEXAMPLESxROUNDS, comma-separated")
    ap.add_argument("--sides", default="flower,fedtune default,fedtune fast,fedtune batched")
    ap.add_argument("--flower-precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--side", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        spec = json.loads(args.side)
        (flower_side if spec["side"] == "flower" else fedtune_side)(spec)
        return

    import torch

    from fedtune.precision import default_device, native_bf16

    device = default_device()
    print(f"device: {device} ({native_bf16(device)[1]}), {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"Flower's loop in {args.flower_precision}", flush=True)
    sides = [s.strip() for s in args.sides.split(",")]
    print(f"{'shape':<10} {'side':<16} {'wall_s':>7} {'memory_MB':>10} {'accuracy':>9}", flush=True)
    table = {}
    for shape in args.shapes.split(","):
        clients, examples, rounds = (int(x) for x in shape.split("x"))
        for side in sides:
            r = run_side({"side": side, "clients": clients, "examples": examples, "rounds": rounds,
                          "flower_precision": args.flower_precision})
            table[shape, side] = r
            print(f"{shape:<10} {side:<16} {r['wall_s']:7.1f} {r['memory_mb']:10.0f} {r['accuracy']:9.3f}", flush=True)
    print()
    for shape in args.shapes.split(","):
        if (shape, "flower") not in table:
            continue
        fl = table[shape, "flower"]
        for side in sides:
            if side == "flower":
                continue
            r = table[shape, side]
            print(f"{shape}: {side}: {fl['wall_s'] / r['wall_s']:.2f}x faster than Flower, "
                  f"{r['memory_mb'] / fl['memory_mb']:.2f}x its memory")


if __name__ == "__main__":
    main()
