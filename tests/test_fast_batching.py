"""Padding to max length and length bucketing: valid batches, every example once per epoch, wired to local_train."""

import pytest
import torch

from fedtune.batching import BUCKET_BATCHES, EncodedDataset, epoch_batches, iterate_batches
from fedtune.client import local_train
from fedtune.config import ModelConfig
from fedtune.models import get_trainable, load_classifier
from fedtune.types import LocalTrainConfig, RoundPlan


def dataset(n: int, seed: int = 0, pairs: bool = False) -> EncodedDataset:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 30, (n,), generator=g).tolist()
    ids = [[2] + torch.randint(5, 27, (m - 2,), generator=g).tolist() + [3] for m in lengths]
    types = [[0] * (m // 2) + [1] * (m - m // 2) for m in lengths] if pairs else None
    return EncodedDataset(ids, types, torch.arange(n))  # label = row index, to trace rows through batches


@pytest.mark.parametrize("n,bs", [(1, 4), (37, 4), (200, 8), (8 * BUCKET_BATCHES * 2, 8), (301, 16)])
def test_bucketing_covers_every_example_once_per_epoch(n, bs):
    ds = dataset(n)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # several epochs from one generator
        batches = epoch_batches(ds, bs, g, bucketing=True)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        assert len(batches) == -(-n // bs)  # same number of steps as without bucketing
        assert all(1 <= len(b) <= bs for b in batches)
        assert sum(len(b) < bs for b in batches) <= 1


def test_bucketing_is_seeded_and_cuts_padding():
    ds = dataset(400)
    a = epoch_batches(ds, 8, torch.Generator().manual_seed(1), bucketing=True)
    b = epoch_batches(ds, 8, torch.Generator().manual_seed(1), bucketing=True)
    c = epoch_batches(ds, 8, torch.Generator().manual_seed(2), bucketing=True)
    assert a == b and a != c

    def padded_tokens(batches):
        return sum(len(bt) * max(len(ds.input_ids[i]) for i in bt) for bt in batches)

    plain = epoch_batches(ds, 8, torch.Generator().manual_seed(1))
    assert padded_tokens(a) < 0.8 * padded_tokens(plain)
    # batch order is shuffled, not sorted by length
    widths = [max(len(ds.input_ids[i]) for i in bt) for bt in a]
    assert widths != sorted(widths)


def test_no_bucketing_keeps_the_old_order():
    ds = dataset(50)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(4)).tolist()
    assert epoch_batches(ds, 8, torch.Generator().manual_seed(4)) == [order[i : i + 8] for i in range(0, 50, 8)]


@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("bucketing", [False, True])
def test_batches_are_valid(pairs, bucketing):
    ds = dataset(45, pairs=pairs)
    seen = []
    for pad_to in (0, 32):
        for batch in iterate_batches(ds, 8, 0, torch.Generator().manual_seed(0), pad_to=pad_to, bucketing=bucketing):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            width = ids.shape[1]
            lengths = [len(ds.input_ids[int(i)]) for i in batch["labels"]]
            assert width == (pad_to if pad_to else max(lengths))
            assert mask.sum(1).tolist() == lengths
            for row, (r, n) in enumerate(zip(batch["labels"].tolist(), lengths, strict=True)):
                assert ids[row, :n].tolist() == ds.input_ids[r]
                assert (ids[row, n:] == 0).all() and (mask[row, n:] == 0).all()
                if pairs:
                    assert batch["token_type_ids"][row, :n].tolist() == ds.token_type_ids[r]
            if pad_to == 0:
                seen.extend(batch["labels"].tolist())
    assert sorted(seen) == list(range(45))


def test_local_train_pad_to_max_length_and_bucketing(tiny_model_dir):
    """Padding to max length changes no result (masked positions); bucketing trains on a new order."""
    model = load_classifier(ModelConfig(name=str(tiny_model_dir), mode="lora"), 3, False, seed=0)
    params = get_trainable(model)
    ds = dataset(30)
    ds = EncodedDataset(ds.input_ids, None, ds.labels % 3)

    def run(**kw):
        plan = RoundPlan(1, params, LocalTrainConfig(epochs=1.0, max_steps=0, lr=0.01, batch_size=8, **kw))
        return local_train(model, ds, plan, "c", pad_id=0, seed=1, device=torch.device("cpu"))

    dynamic, padded, bucketed = run(), run(pad_to=40), run(length_bucketing=True)
    for k in params:
        torch.testing.assert_close(padded.delta[k], dynamic.delta[k], atol=2e-5, rtol=1e-4)
    assert dynamic.metrics["steps"] == padded.metrics["steps"] == bucketed.metrics["steps"] == 4
    assert any(not torch.allclose(bucketed.delta[k], dynamic.delta[k]) for k in params)


def test_experiment_wires_padding_options():
    from fedtune.config import Experiment
    from fedtune.experiment import local_train_config

    assert local_train_config(Experiment()).pad_to == 0
    exp = Experiment.from_overrides(
        ["data.pad_to_max_length=true", "data.max_length=48", "train.length_bucketing=true"])
    local = local_train_config(exp)
    assert local.pad_to == 48 and local.length_bucketing


def test_an_overlong_text_is_cut_before_tokenizing_with_the_same_tokens(tiny_model_dir):
    """A huge cell costs memory by the configured length, not its own: the same ids, from a short prefix."""
    from transformers import AutoTokenizer

    from fedtune.batching import CHARS_PER_TOKEN, bounded_text, encode_texts

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = "goal match team score coach league the a today new".split()
    huge = " ".join(words[i % len(words)] for i in range(200_000))  # ~1 MB of text
    head = bounded_text(tok, huge, 16)
    assert len(head) <= 16 * CHARS_PER_TOKEN < len(huge)
    full = tok([huge], truncation=True, max_length=16)["input_ids"][0]
    assert encode_texts(tok, [huge], None, [0], 16, False).input_ids[0] == full
    short = "goal match"
    assert bounded_text(tok, short, 16) == short
    unbroken = "x" * (16 * CHARS_PER_TOKEN + 50)  # one [UNK] word: a cut would hold too few tokens to be exact
    assert bounded_text(tok, unbroken, 16) == unbroken


def test_overlong_text_pairs_are_cut_with_the_same_tokens(tiny_model_dir):
    """Both halves of a pair are bounded; longest-first truncation gives the ids of the whole pair, except the
    one tie-break documented in encode_texts when both halves are beyond the bound."""
    import random

    from transformers import AutoTokenizer

    from fedtune.batching import CHARS_PER_TOKEN, encode_texts

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    words = "goal match team score coach league the a today new".split()
    rng = random.Random(3)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    # words: short, near the limit, beyond the bound (max_length * CHARS_PER_TOKEN characters: cut first). The
    # whole pairs are the reference; a tokenizer keeps the overflow of both halves of a pair, so far longer texts
    # would cost it gigabytes here (the cost encode_texts avoids).
    lengths = [3, 7, 15, 40, 18 * CHARS_PER_TOKEN // 4, 30 * CHARS_PER_TOKEN // 4]
    firsts = [text(a) for a in lengths for _ in lengths]
    seconds = [text(b) for _ in lengths for b in lengths]
    beyond = [len(a) > 17 * CHARS_PER_TOKEN and len(b) > 17 * CHARS_PER_TOKEN for a, b in zip(firsts, seconds, strict=True)]
    assert sum(beyond) == 4
    for max_length in (16, 17):
        whole = tok(firsts, seconds, truncation=True, max_length=max_length)
        enc = encode_texts(tok, firsts, seconds, [0] * len(firsts), max_length, False)
        for i, (got, want) in enumerate(zip(enc.input_ids, whole["input_ids"], strict=True)):
            if not beyond[i]:
                assert got == want and enc.token_type_ids[i] == whole["token_type_ids"][i], i
                continue
            assert len(got) == len(want) == max_length  # both halves long: the same budget, split within one token
            halves = [[t for t, k in zip(ids, kinds, strict=True) if k == side][1 - side:-1]  # (without [CLS] and [SEP])
                      for ids, kinds in ((got, enc.token_type_ids[i]), (want, whole["token_type_ids"][i]))
                      for side in (0, 1)]
            for mine, theirs in ((halves[0], halves[2]), (halves[1], halves[3])):
                short, long = sorted((mine, theirs), key=len)
                assert long[: len(short)] == short and len(long) - len(short) <= 1, i


def test_pad_multiple_rounds_the_width_up_and_masks_the_padding():
    from fedtune.batching import collate
    from fedtune.config import ConfigError, Experiment
    from fedtune.strategies.from_config import local_train_config

    ds = EncodedDataset([[5] * 9, [6] * 3], None, torch.tensor([0, 1]))
    batch = collate(ds, [0, 1], pad_id=0, pad_multiple=8)
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"].sum(1).tolist() == [9, 3]
    assert collate(ds, [1], pad_id=0, pad_multiple=8)["input_ids"].shape == (1, 8)
    assert collate(ds, [0], pad_id=0)["input_ids"].shape == (1, 9)  # 1: the longest row
    assert collate(ds, [1], pad_id=0, pad_to=20, pad_multiple=8)["input_ids"].shape == (1, 20)
    assert collate(ds, [0], pad_id=0, pad_to=9, pad_multiple=8)["input_ids"].shape == (1, 9)  # pad_to: fixed
    assert collate(ds, [0], pad_id=0, pad_multiple=8, pad_limit=10)["input_ids"].shape == (1, 10)  # max_length
    assert collate(ds, [1], pad_id=0, pad_multiple=8, pad_limit=10)["input_ids"].shape == (1, 8)
    cfg = local_train_config(Experiment.from_overrides(["data.max_length=100"]))
    assert cfg.pad_multiple == 8 and cfg.pad_limit == 100
    with pytest.raises(ConfigError, match="train.pad_multiple must be >= 1"):
        Experiment.from_overrides(["train.pad_multiple=0"])
