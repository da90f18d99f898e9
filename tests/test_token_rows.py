"""TokenRows: compact ragged token ids that behave as the list of lists they replace."""

import numpy as np
import pytest

from fedtune.batching import EncodedDataset, collate, encode_texts
from fedtune.token_rows import TokenRows, TokenRowsBuilder, row_lengths, take_rows

ROWS = [[101, 7, 8, 102], [101, 102], [], [101, 30000, 29999, 5, 6, 102]]


def test_rows_read_back_as_lists_and_compare_equal():
    rows = TokenRows.from_rows(ROWS)
    assert len(rows) == 4
    assert [rows[i] for i in range(4)] == ROWS
    assert rows[-1] == ROWS[-1] and isinstance(rows[0], list) and isinstance(rows[0][0], int)
    assert list(rows) == ROWS
    assert rows == ROWS and rows != ROWS[:3] and rows != [[1]] * 4
    assert rows.lengths().tolist() == [4, 2, 0, 6] == row_lengths(rows) == row_lengths(ROWS)
    assert rows.flat.dtype == np.int32 and rows.nbytes == 12 * 4 + 5 * 8
    with pytest.raises(IndexError):
        rows[4]


def test_take_and_slice_copy_just_those_rows():
    rows = TokenRows.from_rows(ROWS)
    picked = rows.take([3, 0, 3, 2])
    assert isinstance(picked, TokenRows)
    assert picked == [ROWS[3], ROWS[0], ROWS[3], ROWS[2]]
    assert len(picked.flat) == 16  # a copy of the kept rows, not a view of all of them
    assert rows[1:3] == ROWS[1:3] and rows.take([]) == []
    assert take_rows(ROWS, [1, 0]) == [ROWS[1], ROWS[0]] and isinstance(take_rows(ROWS, [1]), list)
    with pytest.raises(IndexError):
        rows.take([0, 9])


def test_builder_packs_chunks_in_order():
    b = TokenRowsBuilder()
    b.extend(ROWS[:2])
    b.extend(TokenRows.from_rows(ROWS[2:]))
    assert b.build() == ROWS
    assert TokenRowsBuilder().build() == []


def test_bad_offsets_are_refused():
    with pytest.raises(ValueError, match="offsets must run from 0 to 3"):
        TokenRows(np.zeros(3, dtype=np.int32), np.array([0, 2], dtype=np.int64))


class _Tok:
    """A tokenizer stub: one id per word plus [CLS]/[SEP]; counts its calls."""

    calls: list[int] = []

    def __call__(self, texts, pairs=None, truncation=True, max_length=8, padding=False, add_special_tokens=True):
        if isinstance(texts, str):
            return {"input_ids": [len(w) for w in texts.split()]}
        self.calls.append(len(texts))
        ids = [[101] + [len(w) for w in t.split()][: max_length - 2] + [102] for t in texts]
        return {"input_ids": ids, "token_type_ids": [[0] * len(r) for r in ids]}


def test_encode_texts_tokenizes_in_chunks_into_compact_rows(monkeypatch):
    import fedtune.batching as batching

    monkeypatch.setattr(batching, "ENCODE_CHUNK", 3)
    tok = _Tok()
    tok.calls.clear()
    texts = ["a bb ccc", "dddd", "e", "ff gg", "hhh i j k l m n o p"]
    enc = encode_texts(tok, texts, None, [0, 1, 0, 1, 0], max_length=8, regression=False)
    assert tok.calls == [3, 2]
    assert isinstance(enc.input_ids, TokenRows) and isinstance(enc.token_type_ids, TokenRows)
    assert enc.input_ids == [[101, 1, 2, 3, 102], [101, 4, 102], [101, 1, 102], [101, 2, 2, 102],
                             [101, 3, 1, 1, 1, 1, 1, 102]]
    sub = enc.subset([4, 1])
    assert isinstance(sub.input_ids, TokenRows) and sub.input_ids == [enc.input_ids[4], enc.input_ids[1]]
    assert sub.labels.tolist() == [0, 1]
    batch = collate(sub, [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[101, 3, 1, 1, 1, 1, 1, 102], [101, 4, 102, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].sum().item() == 11


def test_a_list_dataset_and_a_compact_one_collate_alike():
    import torch

    labels = torch.tensor([0, 1, 1, 0])
    a = EncodedDataset(ROWS, None, labels)
    b = EncodedDataset(TokenRows.from_rows(ROWS), None, labels)
    for key, value in collate(a, [3, 1, 0], pad_id=0).items():
        assert torch.equal(value, collate(b, [3, 1, 0], pad_id=0)[key])
