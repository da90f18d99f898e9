"""Where extractive QA's memory goes, and what bounds it: peak RSS per phase, side by side.

One reduced QA federation (SQuAD from ``$FEDTUNE_DATA_DIR/squad``, the embedded MiniLM fully
fine-tuned with a span head, 2 clients, windows of 384 tokens, bf16, batches of 16) runs with
``fedtune.experiment.run_experiment`` in a fresh process per variant:

- ``glibc-default``: glibc's adaptive mmap threshold (fedtune's default; the heap is trimmed
  around every evaluation);
- ``bounded``: ``FEDTUNE_ALLOCATOR=bounded`` (:func:`fedtune.memory.bound_allocator`);
- ``ckpt``: ``train.gradient_checkpointing = true``; ``bounded+ckpt``: both;
- ``threshold-1MiB`` / ``threshold-4MiB``: glibc's ``MALLOC_MMAP_THRESHOLD_`` at a larger fixed size
  (fewer page faults, more heap), for comparison; pick with ``--variants``.

Each phase's own peak is read from ``VmHWM`` after resetting it at the phase's start
(``/proc/self/clear_refs``): load (task, tokenization, model), every evaluation, every round's
training. Prints peak RSS per phase and variant, the wall time of each, the ratio to the first
variant, and whether EM / F1 agree with it (they must: the allocator moves no arithmetic).

    FEDTUNE_DATA_DIR=../shared/data python benchmarks/qa_memory.py [--questions 200 --steps 6 --rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "glibc-default": ({"FEDTUNE_ALLOCATOR": "default"}, False),
    "bounded": ({"FEDTUNE_ALLOCATOR": "bounded"}, False),
    "ckpt": ({"FEDTUNE_ALLOCATOR": "default"}, True),
    "bounded+ckpt": ({"FEDTUNE_ALLOCATOR": "bounded"}, True),
    # glibc's own variable: a fixed threshold of the given size (not one of fedtune's defaults)
    "threshold-1MiB": ({"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}, False),
    "threshold-4MiB": ({"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}, False),
}


def child(args: argparse.Namespace) -> None:
    """Run the federation in this process and print one JSON line of phases and metrics."""
    from fedtune import memory
    from fedtune.config import Experiment
    from fedtune.experiment import run_experiment
    from fedtune.tasks.qa_task import QATask

    bounded = memory.configure_allocator()
    phases: list[dict] = []
    mark = {"name": "load", "t": time.perf_counter()}
    memory.reset_peak()

    def close(next_name: str) -> None:
        phases.append({"phase": mark["name"], "peak_gb": memory.peak_rss_bytes() / 1e9,
                       "seconds": time.perf_counter() - mark["t"]})
        memory.reset_peak()
        mark.update(name=next_name, t=time.perf_counter())

    evaluate = QATask.evaluate
    count = {"evals": 0, "round": 0}

    def timed_evaluate(self, model, ctx):
        close(f"eval {count['evals']}")
        result = evaluate(self, model, ctx)
        count["evals"] += 1
        count["round"] += 1
        close(f"train round {count['round']}")
        return result

    QATask.evaluate = timed_evaluate
    with tempfile.TemporaryDirectory() as out:
        exp = Experiment.from_overrides([
            'name = "qa-memory"', f'output_dir = "{out}/run"', 'data.dataset = "squad"',
            "data.max_length = 384", "data.doc_stride = 128", f"data.train_size = {args.questions}",
            f"data.eval_size = {args.eval_questions}", 'model.name = "embedded"', 'model.mode = "full"',
            'partition.method = "contiguous"', "partition.num_clients = 2", "partition.min_examples = 1",
            f"federation.rounds = {args.rounds}", f"train.max_steps = {args.steps}", "train.lr = 1e-4",
            "train.batch_size = 16", 'train.precision = "bf16"', "eval.initial = true", "eval.batch_size = 64",
            f"train.gradient_checkpointing = {'true' if args.ckpt else 'false'}",
        ])
        result = run_experiment(exp, quiet=True)
    print(json.dumps({"bounded": bounded, "phases": phases,
                      "metrics": result.final_metrics}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=200, help="training questions (both clients together)")
    ap.add_argument("--eval-questions", type=int, default=0, help="dev questions scored (0 = all)")
    ap.add_argument("--steps", type=int, default=6, help="local steps per client per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="glibc-default,bounded,ckpt,bounded+ckpt", help=", ".join(VARIANTS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    rows = {}
    for name in args.variants.split(","):
        env_extra, ckpt = VARIANTS[name]
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env_extra
        cmd = [sys.executable, __file__, "--child", "--questions", str(args.questions), "--eval-questions",
               str(args.eval_questions), "--steps", str(args.steps), "--rounds", str(args.rounds)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd + (["--ckpt"] if ckpt else []), env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1]) | {"wall": time.perf_counter() - t0}
        print(f"{name}: done in {rows[name]['wall']:.0f} s (allocator bounded: {rows[name]['bounded']})", flush=True)
    names = list(rows)
    ref = rows[names[0]]
    phase_names = [p["phase"] for p in ref["phases"]]
    print(f"\n{args.questions} training questions, {args.steps} steps x 2 clients x {args.rounds} rounds; "
          "peak RSS per phase in GB (seconds)")
    print("| phase | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for i, phase in enumerate(phase_names):
        cells = [f"{rows[n]['phases'][i]['peak_gb']:.2f} ({rows[n]['phases'][i]['seconds']:.0f} s)" for n in names]
        print(f"| {phase} | " + " | ".join(cells) + " |")
    peaks = {n: max(p["peak_gb"] for p in rows[n]["phases"]) for n in names}
    print("| **whole run peak** | " + " | ".join(f"**{peaks[n]:.2f}**" for n in names) + " |")
    print("| peak / " + names[0] + " | " + " | ".join(f"{peaks[n] / peaks[names[0]]:.2f}" for n in names) + " |")
    print("| wall time / " + names[0] + " | " + " | ".join(f"{rows[n]['wall'] / ref['wall']:.2f}" for n in names)
          + " |")
    for n in names[1:]:
        same = rows[n]["metrics"] == ref["metrics"]
        print(f"{n}: final metrics {'identical to' if same else 'DIFFER from'} {names[0]}: "
              f"{rows[n]['metrics']} vs {ref['metrics']}")


if __name__ == "__main__":
    main()
