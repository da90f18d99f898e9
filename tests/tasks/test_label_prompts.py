"""fedtune.tasks.label_prompts: classification rows as chat or plain prompts, fitted to max_length, answers parsed."""

from __future__ import annotations

import json

import pytest
from builders import stories_chat_model, stories_tokenizers
from conftest import REPO

from fedtune.tasks.causal_lm import IGNORE_INDEX
from fedtune.tasks.label_prompts import CHAT_TEMPLATE, PLAIN_TEMPLATE, LabelPrompts
from fedtune.tasks.prompt_format import PromptFormatError

STORIES = REPO.parent / "shared" / "models" / "stories260K"
LABELS = ["money", "sports", "tech"]


@pytest.fixture
def tokenizers():
    if not (STORIES / "tokenizer.json").is_file():
        pytest.skip("stories260K not present")
    return stories_tokenizers(STORIES)


def _answer(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def test_chat_rows_put_the_text_in_the_user_turn_and_the_label_in_the_assistant_turn(tokenizers):
    _, tok = tokenizers
    lp = LabelPrompts(tok, LABELS, max_length=128)
    assert lp.chat and lp.template == CHAT_TEMPLATE and lp.format_name == "chat"
    ids, labels = lp.row("the team won the cup", "", 1)
    text = tok.decode(ids)
    assert "<|im_start|>user\nthe team won the cup\n\nAnswer with one of: money, sports, tech.<|im_end|>" in text
    assert _answer(tok, ids, labels).replace(" ", "") == "sports<|im_end|>\n"
    prompt = lp.prompt_ids("the team won the cup")
    assert ids[: len(prompt)] == prompt and tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_plain_rows_continue_the_template_with_a_space_and_the_label(tokenizers):
    base, _ = tokenizers
    lp = LabelPrompts(base, LABELS, max_length=64)
    assert not lp.chat and lp.template == PLAIN_TEMPLATE and lp.format_name == "alpaca"
    ids, labels = lp.row("stocks fell", "", 0)
    assert ids[0] == base.bos_token_id and ids[-1] == base.eos_token_id
    assert base.decode(ids[: ids.index(base.eos_token_id)], skip_special_tokens=True).endswith("stocks fell\nLabel: money")
    assert [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX] == lp.candidates[0] + [base.eos_token_id]


def test_a_long_text_is_cut_but_never_the_instruction_or_the_answer(tokenizers):
    _, tok = tokenizers
    lp = LabelPrompts(tok, LABELS, template="Topic? {text}\nPick one of {labels}.", max_length=160)
    ids, labels = lp.row("the market rallied after the bank cut rates " * 40, "", 2)
    assert len(ids) <= 160 and len(ids) > 150
    text = tok.decode(ids)
    assert "Pick one of money, sports, tech." in text and "Topic? the market" in text
    assert _answer(tok, ids, labels).replace(" ", "") == "tech<|im_end|>\n"


def test_a_template_leaving_no_room_for_the_text_is_refused(tokenizers):
    base, _ = tokenizers
    with pytest.raises(PromptFormatError, match=r"data.prompt_template renders \d+ tokens.*data.max_length = 12"):
        LabelPrompts(base, LABELS, template="Read this carefully and say which topic it is: {text}", max_length=12)


@pytest.mark.parametrize("answer,label", [
    ("sports", 1), ("Sports.", 1), ("It is about TECH, not money", 2), ("money money", 0),
    ("esports", None), ("nothing here", None), ("", None),
])
def test_an_answer_is_parsed_to_the_label_it_names_first(tokenizers, answer, label):
    base, _ = tokenizers
    assert LabelPrompts(base, LABELS, max_length=64).parse(answer) == label


def test_at_one_position_the_longer_label_name_wins(tokenizers):
    base, _ = tokenizers
    lp = LabelPrompts(base, ["Sci", "Sci/Tech", "World"], max_length=64)
    assert lp.parse("sci/tech") == 1 and lp.parse("sci, maybe") == 0 and lp.parse("the world") == 2


def test_generated_answers_are_scored_beside_the_constrained_prediction(tmp_path, tiny_csv, tokenizers):
    """Chat-format training on the tiny Llama: both predictions learn the labels; gen_accuracy is what the
    written answers say it is."""
    from fedtune.config import Experiment
    from fedtune.experiment import run_experiment

    folder = stories_chat_model(STORIES, tmp_path / "stories-chat")
    train, evalf = tiny_csv
    exp = Experiment.from_overrides([
        f'model.name="{folder}"', 'data.task="generative_classification"', 'data.dataset="files"',
        f'data.train_file="{train}"', f'data.eval_file="{evalf}"', 'data.text_column="text"',
        'data.label_column="label"', "data.max_length=160", "partition.num_clients=2", "federation.rounds=3",
        "train.epochs=4", "train.lr=0.003", "train.batch_size=16", 'model.mode="full"', "eval.initial=true",
        "eval.generative=true", "eval.samples=60", "eval.max_new_tokens=8", f'output_dir="{tmp_path / "run"}"',
    ])
    # (lr 0.003: at 0.005, full fine-tuning of the tiny Llama fits the training rows but, with this
    # machine's kernels, ends at 0.67 on the 60 eval rows; 0.003 reaches 0.92 by round 2, 0.97 at round 3)
    result = run_experiment(exp, quiet=True)
    first, last = result.history[0], result.history[-1]
    # untrained, the tiny Llama answers with no label at all (all unparsed, counted wrong); trained, it names one
    assert first["eval_gen_unparsed"] > 0.9 and first["eval_gen_accuracy"] < 0.1, first
    assert last["eval_accuracy"] > 0.75 and last["eval_gen_accuracy"] > 0.75, last
    assert last["eval_gen_unparsed"] < 0.1
    answers = [json.loads(line) for line in (result.output_dir / "samples.jsonl").read_text().splitlines()]
    final = [a for a in answers if a["round"] == 3]
    assert len(final) == 60 and {a["round"] for a in answers} == {0, 1, 2, 3}
    assert sum(a["parsed"] == a["reference"] for a in final) / 60 == pytest.approx(last["eval_gen_accuracy"])
    assert sum(a["parsed"] is None for a in final) / 60 == pytest.approx(last["eval_gen_unparsed"])
