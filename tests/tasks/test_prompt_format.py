"""fedtune.tasks.prompt_format: chat-template rendering with the loss on the assistant's tokens only."""

from __future__ import annotations

import json

import pytest
from builders import stories_tokenizers
from conftest import REPO

from fedtune.tasks.causal_lm import IGNORE_INDEX, Instruction, encode_instructions, load_instructions
from fedtune.tasks.prompt_format import PromptFormat, PromptFormatError

STORIES = REPO.parent / "shared" / "models" / "stories260K"


@pytest.fixture
def tokenizers():
    if not (STORIES / "tokenizer.json").is_file():
        pytest.skip("stories260K not present")
    return stories_tokenizers(STORIES)


def _answer_text(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def test_auto_picks_the_chat_template_when_there_is_one(tokenizers):
    base, chat = tokenizers
    assert PromptFormat(base).name == "alpaca" and PromptFormat(chat).name == "chat"
    assert PromptFormat(chat, "alpaca").name == "alpaca"
    with pytest.raises(PromptFormatError, match="'chat' needs a tokenizer with a chat template"):
        PromptFormat(base, "chat")


def test_chat_loss_is_on_the_assistant_reply_and_its_end_marker(tokenizers):
    _, tok = tokenizers
    ex = Instruction("Say hi.", "to Lily", "Hi there, Lily.")
    enc = PromptFormat(tok).encode([ex], max_length=512)
    ids, labels = enc.input_ids[0], enc.labels[0]
    # the reply and the template's end of turn (ChatML: "<|im_end|>" and its newline) carry the loss
    assert _answer_text(tok, ids, labels).replace(" ", "") == "Hithere,Lily.<|im_end|>\n"
    prompt = PromptFormat(tok).prompt_ids(ex)
    assert ids[: len(prompt)] == prompt and all(lab == IGNORE_INDEX for lab in labels[: len(prompt)])
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert "Say hi.\n\nto Lily" in tok.decode(prompt)  # the input follows the instruction after a blank line


def test_every_assistant_turn_carries_the_loss_and_no_user_turn_does(tokenizers):
    _, tok = tokenizers
    ex = Instruction("And now?", "", "Bye.", system="Be brief.", history=(("Hello.", "Hi."),))
    enc = PromptFormat(tok).encode([ex], max_length=512)
    answer = _answer_text(tok, enc.input_ids[0], enc.labels[0]).replace(" ", "")
    assert answer == "Hi.<|im_end|>\nBye.<|im_end|>\n"
    assert "Hello" not in answer and "brief" not in answer


def test_alpaca_format_is_the_alpaca_encoding_and_refuses_conversations(tokenizers):
    base, _ = tokenizers
    exs = [Instruction("Say hi.", "", "Hi there."), Instruction("Add.", "1 2", "3")]
    assert PromptFormat(base).encode(exs, 64) == encode_instructions(base, exs, 64)
    with pytest.raises(PromptFormatError, match="needs a chat template"):
        PromptFormat(base).encode([Instruction("x", "", "y", history=(("a", "b"),))], 64)


def test_truncated_chat_rows_keep_their_labels_aligned(tokenizers):
    _, tok = tokenizers
    ex = Instruction("Tell a story. " * 3, "", "Once upon a time " * 20)
    enc = PromptFormat(tok).encode([ex], max_length=24)
    assert len(enc.input_ids[0]) == len(enc.labels[0]) == 24


def test_instruction_files_in_both_shapes_json_and_jsonl(tmp_path):
    rows = [{"instruction": "Add.", "input": "1 2", "output": "3"},
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                          {"role": "assistant", "content": "A2"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_instructions(path)
    assert a == Instruction("Add.", "1 2", "3")
    assert b == Instruction("U2", "", "A2", system="S", history=(("U1", "A1"),))
    assert b.messages() == rows[1]["messages"]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert load_instructions(tmp_path / "d.json") == [a, b]


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "U"}], r"alternating .* got \['user'\]"),
    ([{"role": "user", "content": "U"}, {"role": "bot", "content": "A"}], r"line 1, message 2: expected"),
    ([{"role": "assistant", "content": "A"}, {"role": "user", "content": "U"}], r"got \['assistant', 'user'\]"),
    ("hello", r"'messages' must be a non-empty list"),
])
def test_bad_chat_rows_name_the_line_and_message(tmp_path, messages, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl, line 1.*{match}" if "line 1" not in match else match):
        load_instructions(path)


def test_rows_whose_answer_is_cut_off_are_left_out_and_counted(tokenizers, tmp_path, caplog):
    from fedtune.config import Experiment
    from fedtune.tasks.causal_lm_task import CausalLMTask
    from fedtune.tasks.data import DataError

    _, tok = tokenizers
    rows = [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "long " * 200, "output": "Yes."}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    exp = Experiment.from_overrides([f'data.train_file="{path}"', 'data.task="causal_lm"', "data.max_length=64",
                                     "data.eval_size=2"])
    task = CausalLMTask(exp.data, exp.eval, tok, exp.seed)
    assert len(task.train) + len(task.eval_inputs()) == 4  # the four long prompts fill the 64 tokens
    assert any("keep no answer token within data.max_length = 64" in m for m in caplog.messages)
    path.write_text("".join(json.dumps(rows[1]) + "\n" for _ in range(8)))
    with pytest.raises(DataError, match="no training instruction keeps any answer token within data.max_length = 64"):
        CausalLMTask(exp.data, exp.eval, tok, exp.seed)
