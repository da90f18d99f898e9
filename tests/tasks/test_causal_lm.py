"""Causal LM pieces on the tiny pretrained Llama (stories260K)."""

import pytest
from conftest import REPO

from fedtune.tasks.causal_lm import (
    IGNORE_INDEX,
    Instruction,
    collate_lm,
    encode_instructions,
    load_instructions,
    perplexity,
    score_candidates,
)

STORIES = REPO.parent / "shared" / "models" / "stories260K"


@pytest.fixture(scope="module")
def lm():
    if not STORIES.is_dir():
        pytest.skip("stories260K not present")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(STORIES).eval(), AutoTokenizer.from_pretrained(STORIES)


def test_loss_only_on_response(lm):
    _, tok = lm
    ex = Instruction("Say hi.", "", "Hi there.")
    enc = encode_instructions(tok, [ex], max_length=512)
    ids, labels = enc.input_ids[0], enc.labels[0]
    n_prompt = len(tok(ex.prompt(), add_special_tokens=False)["input_ids"]) + 1  # + bos
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    batch = collate_lm(enc, [0], pad_id=0)
    assert batch["labels"].shape == batch["input_ids"].shape


def test_truncation_and_padding_labels(lm):
    _, tok = lm
    exs = [Instruction("a", "", "b c d e f g"), Instruction("a much longer instruction here", "x", "y")]
    enc = encode_instructions(tok, exs, max_length=12)
    assert all(len(x) <= 12 for x in enc.input_ids)
    batch = collate_lm(enc, [0, 1], pad_id=0)
    short = min(range(2), key=lambda i: len(enc.input_ids[i]))
    assert (batch["labels"][short, len(enc.input_ids[short]):] == IGNORE_INDEX).all()


def test_likelihood_scoring_prefers_the_story(lm):
    model, tok = lm
    scores = score_candidates(model, tok, ["Once upon a time, there was a little"], [" girl", " spreadsheet"])
    assert scores.shape == (1, 2) and scores[0, 0] > scores[0, 1]


def test_perplexity_of_story_text_is_lower_than_of_noise(lm):
    model, tok = lm
    story = encode_instructions(tok, [Instruction("Tell a story.", "", "Once upon a time, there was a little girl named Lily.")], 512)
    noise = encode_instructions(tok, [Instruction("Tell a story.", "", "zq xv kk qq jj vv zz xx pp")], 512)
    assert perplexity(model, story, pad_id=0)["perplexity"] < perplexity(model, noise, pad_id=0)["perplexity"]


def test_code_alpaca_loads():
    path = REPO.parent / "shared" / "data" / "code_alpaca" / "code_alpaca_2k.json"
    if not path.is_file():
        pytest.skip("code alpaca not present")
    rows = load_instructions(path)
    assert len(rows) == 2017 and sum(1 for r in rows if r.input.strip()) == 1006
    assert rows[0].instruction.startswith("What are the distinct values")


def test_bad_instruction_file_names_row(tmp_path):
    p = tmp_path / "i.json"
    p.write_text('[{"instruction": "x", "output": "y"}, {"instruction": "x"}]')
    with pytest.raises(ValueError, match=r"i.json, row 2 lacks text field\(s\) \['output'\]"):
        load_instructions(p)


def test_overlong_instruction_is_cut_before_tokenizing_with_the_same_tokens(lm):
    from fedtune.tasks.causal_lm import Instruction, encode_instructions

    _, tok = lm
    long = " ".join(["once upon a time there was a little girl"] * 20_000)  # ~0.9 MB
    ex = [Instruction(long, "", long)]
    cut = encode_instructions(tok, ex, 32)
    whole = tok(ex[0].prompt(), add_special_tokens=False)["input_ids"]  # the ~1 MB prompt tokenized whole
    prompt = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + whole
    assert cut.input_ids[0] == prompt[:32] and cut.labels[0] == [-100] * 32


@pytest.mark.parametrize("candidates", [[[300], [301], [42]], [[300, 7], [301], [42, 9, 11]]])
def test_candidate_scores_equal_each_pairs_log_likelihood(lm, candidates):
    """One-token candidates (one forward per prompt) and longer ones (one per pair), prompts of mixed
    lengths batched by length: each score is the pair's mean log-likelihood, in the prompts' order."""
    import torch

    from fedtune.tasks.causal_lm import EncodedLM, score_candidate_ids, token_logprobs

    model, tok = lm
    prompts = [[1, 50, 60, 70, 80, 90], [1, 33], [1, 44, 55, 66], [1, 20, 21, 22, 23, 24, 25, 26, 27]]
    scores = score_candidate_ids(model, prompts, candidates, pad_id=0, batch_size=3)
    for i, p in enumerate(prompts):
        for j, c in enumerate(candidates):
            enc = EncodedLM([p + c], [[IGNORE_INDEX] * len(p) + c])
            lp, n = token_logprobs(model, collate_lm(enc, [0], pad_id=0))
            assert float(scores[i, j]) == pytest.approx(float(lp / n), abs=1e-5), (i, j)
    assert scores.shape == (4, 3) and torch.isfinite(scores).all()
