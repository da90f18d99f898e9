"""fedtune.generation: batched, left-padded generation with the KV cache equals one prompt at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from fedtune.generation import generate_batches

STORIES = REPO.parent / "shared" / "models" / "stories260K"


def test_batched_greedy_equals_one_prompt_at_a_time():
    if not (STORIES / "config.json").is_file():
        pytest.skip("stories260K not present")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(STORIES).eval(), AutoTokenizer.from_pretrained(STORIES)
    texts = ["Once upon a time", "Lily had a", "The big dog ran to the park and", "Tom"]
    prompts = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    one = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=tok.eos_token_id)[0, len(p):].tolist()
        one.append(gen[: gen.index(tok.eos_token_id)] if tok.eos_token_id in gen else gen)
    assert generate_batches(model, tok, prompts, max_new_tokens=16, batch_size=3) == one
    sampled = generate_batches(model, tok, prompts, max_new_tokens=16, batch_size=4, temperature=1.0, seed=1)
    assert sampled == generate_batches(model, tok, prompts, max_new_tokens=16, batch_size=4, temperature=1.0, seed=1)
    assert sampled != one  # (sampling at temperature 1 leaves the greedy path somewhere in 64 tokens)


def test_stop_strings_end_rows_early_without_changing_what_comes_before():
    if not (STORIES / "config.json").is_file():
        pytest.skip("stories260K not present")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(STORIES).eval(), AutoTokenizer.from_pretrained(STORIES)
    prompts = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in ("Once upon a time", "Tom")]
    full = generate_batches(model, tok, prompts, max_new_tokens=48, batch_size=2)
    texts = [tok.decode(ids) for ids in full]
    stop = next(w for w in (" the ", " a ", " and ") if all(w in t for t in texts))  # a word both continuations use
    cut = generate_batches(model, tok, prompts, max_new_tokens=48, batch_size=2, stop_strings=[stop])
    for whole, short in zip(full, cut, strict=True):
        assert whole[: len(short)] == short and len(short) < len(whole)  # the same tokens, ended early
        assert stop in tok.decode(short) and stop not in tok.decode(short[:-1])
