"""FlowerTransport's round rules that need no SuperLink: offline clients, the min_clients quorum, SecAgg+ limits.

A node restarting mid-round (its plan sent again) and one offline client named in the round's record run on
real processes in test_flower_chaos.py."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402

from fedtune.config import Experiment  # noqa: E402
from fedtune.payload import CommStats  # noqa: E402
from fedtune.runtime.flower.transport import FederationError, FlowerTransport  # noqa: E402
from fedtune.types import LocalTrainConfig, RoundPlan  # noqa: E402


class _Grid:
    """The SuperLink's view of which nodes are online; sending anything is a test failure."""

    def __init__(self, online: set[int]) -> None:
        self.online = online

    def get_node_ids(self) -> set[int]:
        return self.online

    def push_messages(self, messages):  # pragma: no cover - must not be reached
        raise AssertionError("nothing should be sent")


def _transport(online: set[int], *overrides: str) -> FlowerTransport:
    runtime = Experiment.from_overrides(['runtime.mode="flower"', *overrides]).runtime
    t = FlowerTransport(_Grid(online), runtime, expected_clients=3)
    t.nodes = {"a": 1, "b": 2, "c": 3}
    t.sizes = {"a": 50, "b": 60, "c": 70}
    t.seen = {1, 2, 3}  # (identified at the start, as connect() would)
    return t


PLAN = RoundPlan(1, {"w": torch.zeros(2)}, LocalTrainConfig(1.0, 0, 0.1, 4))


def test_quorum_follows_min_clients():
    """min(runtime.min_clients, sampled) answers, or 1 when min_clients = 0."""
    assert _transport({1, 2, 3}).quorum(3) == 1
    assert _transport({1, 2, 3}, "runtime.min_clients=2").quorum(3) == 2
    assert _transport({1, 2, 3}, "runtime.min_clients=5").quorum(3) == 3


def test_offline_clients_are_left_out_or_stop_the_round():
    """Clients the SuperLink lists as offline are failures; too few online is an error naming min_clients."""
    t = _transport({1}, "runtime.min_clients=2")
    with pytest.raises(FederationError, match=r"round 1: only 1 of 3 sampled clients are online "
                                              r"\(offline: \['b', 'c'\]\); runtime.min_clients = 2 needs 2"):
        list(t.run_round(PLAN, ["a", "b", "c"], CommStats()))
    assert _transport({1, 3}, "runtime.min_clients=2")._online(1, ["a", "b", "c"], 2) == ["a", "c"]


def test_secagg_refuses_clients_above_max_weight_and_single_clients():
    """SecAgg+ weights by num_examples / max_weight: a larger client is an error naming the key."""
    t = _transport({1, 2, 3}, "runtime.secagg=true", "runtime.secagg_max_weight=60")
    with pytest.raises(FederationError, match=r"'c': 70.*runtime.secagg_max_weight = 60"):
        list(t.run_round(PLAN, ["a", "b", "c"], CommStats()))
    with pytest.raises(FederationError, match="at least 2 clients"):
        list(_transport({1, 2, 3}, "runtime.secagg=true").run_round(PLAN, ["a"], CommStats()))


def test_client_errors_are_one_line_type_and_message():
    """Flower's ``<class 'X'>:<'message'>`` reasons become ``X: message`` (what failures and quorum errors print)."""
    from types import SimpleNamespace

    from flwr.app import Error

    from fedtune.runtime.flower.transport import error_text

    def reply(reason: str):  # (a reply Message needs a running ClientApp's identity; only .error is read)
        return SimpleNamespace(error=Error(code=0, reason=reason))

    assert error_text(reply("<class 'PermissionError'>:<'client a trains only\n in SecAgg+ rounds'>")) == \
        "PermissionError: client a trains only in SecAgg+ rounds"
    assert error_text(reply("<class 'fedtune.tasks.data.DataError'>:<'x.csv: no such file'>")) == \
        "DataError: x.csv: no such file"
    assert error_text(reply("Node Unavailable")) == "Node Unavailable"


def test_secagg_rounding_is_seeded():
    """Flower's stochastic rounding reproduces after seed_rounding with the same seed (and differs with another)."""
    import numpy as np
    from flwr.common.secure_aggregation.quantization import quantize

    from fedtune.runtime.flower.secagg import seed_rounding

    arr = [np.random.default_rng(0).normal(size=1000).astype(np.float32)]

    def q(seed: int) -> np.ndarray:
        seed_rounding(seed)
        return quantize(arr, 8.0, 2**10)[0]

    assert np.array_equal(q(3), q(3)) and not np.array_equal(q(3), q(4))



def test_exchange_times_a_plan_sent_again_to_a_client_first_offline():
    """A key first pushed by ``resend`` (its client was offline at the start and came back while the round
    waited) gets its round trip from that push, and the reply's phase timings are kept."""
    from types import SimpleNamespace

    from flwr.app import RecordDict

    from fedtune.runtime.flower import messages

    class _Slow(_Grid):
        """Answers nothing on the first pull, then every message pushed so far."""

        def __init__(self):
            super().__init__({1, 2})
            self.ids, self.pulls = [], 0

        def push_messages(self, msgs):
            new = [f"m{len(self.ids) + i}" for i in range(len(msgs))]
            self.ids += new
            return new

        def pull_messages(self, ids):
            self.pulls += 1
            content = messages.with_timing(RecordDict(), {"train": 1.0})
            return [] if self.pulls == 1 else [
                SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), content=content,
                                has_error=lambda: False) for i in ids]

    t = FlowerTransport(_Slow(), Experiment.from_overrides(['runtime.mode="flower"']).runtime, expected_clients=2)
    resent = iter([[(object(), 7)]])
    got = dict(t._exchange([object()], deadline=1e18, keys=[0], what="round 1", resend=lambda: next(resent, [])))
    assert sorted(got) == [0, 7] and sorted(t._round_trips) == [0, 7]
    t._note_timing("train", 1, "client_007", 7, got[7])
    assert t.timings == [{"kind": "train", "round": 1, "client": "client_007",
                          "round_trip": round(t._round_trips[7], 3), "phases": {"train": 1.0}}]
