"""encode_cache: tokenized rows stored on disk under a content key, read back identical, never stale."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from fedtune import encode_cache

STORIES = REPO.parent / "shared" / "models" / "stories260K"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))


class _Tok:
    """Enough of a tokenizer for a fingerprint."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab
        self.chat_template, self.special_tokens_map = None, {}
        self.bos_token_id = self.eos_token_id = self.pad_token_id = None

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def _counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value

    return compute, calls


def test_a_hit_reads_back_what_was_computed_and_skips_the_work():
    value = {"input_ids": [[1, 2, 3], [], [7]], "token_type_ids": None}
    compute, calls = _counting(value)
    tok = _Tok({"a": 0})
    with encode_cache.enabled():
        first = encode_cache.cached_token_lists("x", tok, {"max_length": 8}, encode_cache.inputs_digest(["t"]), compute)
        second = encode_cache.cached_token_lists("x", tok, {"max_length": 8}, encode_cache.inputs_digest(["t"]), compute)
    assert first == second == value and len(calls) == 1
    assert len(list(encode_cache.cache_folder().glob("*.safetensors"))) == 1


def test_the_key_follows_inputs_tokenizer_options_and_encoder():
    tok = _Tok({"a": 0})
    base = encode_cache.cache_key("x", tok, {"max_length": 8}, encode_cache.inputs_digest(["t"], [0]))
    assert base == encode_cache.cache_key("x", _Tok({"a": 0}), {"max_length": 8}, encode_cache.inputs_digest(["t"], [0]))
    assert base != encode_cache.cache_key("x", tok, {"max_length": 8}, encode_cache.inputs_digest(["t"], [1]))
    assert base != encode_cache.cache_key("x", tok, {"max_length": 8}, encode_cache.inputs_digest(["u"], [0]))
    assert base != encode_cache.cache_key("x", _Tok({"a": 1}), {"max_length": 8}, encode_cache.inputs_digest(["t"], [0]))
    assert base != encode_cache.cache_key("x", tok, {"max_length": 9}, encode_cache.inputs_digest(["t"], [0]))
    assert base != encode_cache.cache_key("y", tok, {"max_length": 8}, encode_cache.inputs_digest(["t"], [0]))
    # column boundaries count: ("ab",) + ("c",) is not ("a",) + ("bc",)
    assert encode_cache.inputs_digest(["ab"], ["c"]) != encode_cache.inputs_digest(["a"], ["bc"])


def test_an_unreadable_entry_is_recomputed_and_rewritten(caplog):
    tok = _Tok({"a": 0})
    compute, calls = _counting({"input_ids": [[5, 6]]})
    with encode_cache.enabled():
        encode_cache.cached_token_lists("x", tok, {}, "d", compute)
        (entry,) = encode_cache.cache_folder().glob("*.safetensors")
        entry.write_bytes(b"torn write")
        assert encode_cache.cached_token_lists("x", tok, {}, "d", compute) == {"input_ids": [[5, 6]]}
        assert encode_cache.cached_token_lists("x", tok, {}, "d", compute) == {"input_ids": [[5, 6]]}
    assert len(calls) == 2 and "unreadable" in caplog.text


def test_outside_enabled_nothing_is_read_or_written():
    compute, calls = _counting({"input_ids": [[1]]})
    encode_cache.cached_token_lists("x", _Tok({}), {}, "d", compute)
    encode_cache.cached_token_lists("x", _Tok({}), {}, "d", compute)
    assert len(calls) == 2 and not encode_cache.cache_folder().exists()


def _same_rows(a, b) -> None:
    assert a.input_ids == b.input_ids and a.token_type_ids == b.token_type_ids
    assert a.token_labels == b.token_labels and torch.equal(a.labels, b.labels) and a.labels.dtype == b.labels.dtype


def test_classification_rows_from_the_cache_equal_fresh_ones(tiny_experiment):
    from fedtune.models import load_tokenizer
    from fedtune.tasks.registry import build_task

    exp = tiny_experiment()
    tok = load_tokenizer(exp.model.name)
    fresh = build_task(exp, tok).train
    with encode_cache.enabled():
        stored = build_task(exp, tok).train
        read = build_task(exp, tok).train
    _same_rows(fresh, stored)
    _same_rows(fresh, read)
    assert len(list(encode_cache.cache_folder().glob("*.safetensors"))) == 2  # train and eval split


@pytest.mark.parametrize("kind", ["generative_classification", "causal_lm"])
def test_instruction_rows_from_the_cache_equal_fresh_ones(kind, tiny_csv, monkeypatch):
    if not (STORIES / "config.json").is_file():
        pytest.skip("stories260K not present")
    from fedtune.config import Experiment
    from fedtune.models import load_tokenizer
    from fedtune.tasks.registry import build_task

    if kind == "causal_lm":
        from conftest import shared_data_or_skip

        monkeypatch.setenv("FEDTUNE_DATA_DIR", str(shared_data_or_skip()))
        sets = ['data.dataset="code_alpaca"', "data.train_size=40", "data.eval_size=8", "data.max_length=64"]
    else:
        train, evalf = tiny_csv
        sets = ['data.task="generative_classification"', 'data.dataset="files"', f'data.train_file="{train}"',
                f'data.eval_file="{evalf}"', 'data.text_column="text"', 'data.label_column="label"',
                "data.max_length=48"]
    exp = Experiment.from_overrides([f'model.name="{STORIES}"', *sets])
    tok = load_tokenizer(str(STORIES))
    fresh = build_task(exp, tok).train
    with encode_cache.enabled():
        build_task(exp, tok)
        read = build_task(exp, tok).train
    _same_rows(fresh, read)
    assert list(encode_cache.cache_folder().glob("*.safetensors"))
