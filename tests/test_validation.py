"""Bad client updates are named and dropped, good ones pass."""

import torch

from fedtune.types import ClientUpdate
from fedtune.validation import accepted_updates, update_problem

REF = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}


def upd(cid="c1", n=5, **tensors):
    delta = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    delta.update(tensors)
    return ClientUpdate(client_id=cid, delta={k: v for k, v in delta.items() if v is not None}, num_examples=n)


def test_good_update_passes():
    assert update_problem(upd(), REF) is None


def test_each_problem_is_named():
    assert "NaN or Inf" in update_problem(upd(b=torch.tensor([1.0, float("nan"), 0, 0])), REF)
    assert "Inf" in update_problem(upd(b=torch.tensor([1.0, float("inf"), 0, 0])), REF)
    assert "shape (3, 2)" in update_problem(upd(a=torch.ones(3, 2)), REF)
    assert "missing tensors ['b']" in update_problem(upd(b=None), REF)
    assert "unexpected tensors ['c']" in update_problem(upd(c=torch.ones(1)), REF)
    assert "dtype torch.int64" in update_problem(upd(b=torch.ones(4, dtype=torch.long)), REF)
    assert "num_examples is 0" in update_problem(upd(n=0), REF)


def test_stream_drops_and_reports():
    rejected = []
    stream = [upd("c1"), upd("c2", a=torch.full((2, 3), float("nan"))), upd("c3")]
    kept = list(accepted_updates(stream, REF, lambda u, why: rejected.append((u.client_id, why))))
    assert [u.client_id for u in kept] == ["c1", "c3"]
    assert rejected == [("c2", "tensor a contains NaN or Inf")]
