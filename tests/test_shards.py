"""fedtune.shards: client rows cut on demand."""

import pytest
import torch

from fedtune.batching import EncodedDataset
from fedtune.shards import ClientRows
from fedtune.token_rows import TokenRows


def _train(n: int) -> EncodedDataset:
    return EncodedDataset(input_ids=TokenRows.from_rows([[i, i + 1][: 1 + i % 2] for i in range(n)]),
                          token_type_ids=None, labels=torch.arange(n) % 3)


def test_client_rows_equal_the_eager_subsets_and_replace_only_known_clients():
    train = _train(10)
    ids, shards = ["client_000", "client_001", "client_002"], [[0, 3], [5], [9, 1, 2]]
    rows = ClientRows(train, ids, shards)
    assert list(rows) == ids and len(rows) == 3
    for cid, shard in zip(ids, shards, strict=True):
        eager = train.subset(shard)
        assert rows[cid].input_ids == eager.input_ids and torch.equal(rows[cid].labels, eager.labels)
    poisoned = train.subset([4])
    rows.replace({"client_001": poisoned})
    assert rows["client_001"] is poisoned and rows["client_000"].input_ids == train.subset([0, 3]).input_ids
    with pytest.raises(KeyError, match="client_007"):
        rows.replace({"client_007": poisoned})
    with pytest.raises(KeyError):
        rows["client_007"]
    with pytest.raises(ValueError, match="2 client ids for 3 shards"):
        ClientRows(train, ids[:2], shards)


def test_row_sources_name_the_training_set_and_replaced_rows_without_cutting():
    from fedtune.shards import row_sources

    train = _train(6)
    ids = ["client_000", "client_001"]
    rows = ClientRows(train, ids, [[0, 1], [2]])
    assert [d is train for d in row_sources(rows, ids)] == [True]
    poisoned = train.subset([5])
    rows.replace({"client_001": poisoned})
    assert row_sources(rows, ["client_001"]) == [poisoned]
    assert [d is train for d in row_sources(rows, ids)] == [False, True]
    eager = {c: rows[c] for c in ids}
    assert row_sources(eager, ids) == [eager["client_000"], eager["client_001"]]
