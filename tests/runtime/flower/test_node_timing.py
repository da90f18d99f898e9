"""node_timing: a ClientApp message's phases, measured on the node and carried to the server in the reply."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("flwr")

import psutil  # noqa: E402
from flwr.app import ConfigRecord, RecordDict  # noqa: E402

from fedtune.runtime.flower import messages  # noqa: E402
from fedtune.runtime.flower.node_timing import MODULE_T0, PhaseClock, process_start_time  # noqa: E402


def test_process_start_time_is_the_kernels():
    """/proc's start time of this process agrees with psutil's and precedes the module's import."""
    start = process_start_time()
    assert start is not None
    assert abs(start - psutil.Process().create_time()) < 0.05
    assert start <= MODULE_T0 <= time.time()
    assert process_start_time(2**22 + 12345) is None  # no such process: unknown, not a guess


def test_phase_clock_adds_up_repeated_phases_in_order():
    clock = PhaseClock()
    for _ in range(2):
        with clock.phase("data"):
            time.sleep(0.01)
    with clock.phase("train"):
        pass
    assert list(clock.phases) == ["data", "train"]
    assert 0.02 <= clock.phases["data"] < 1.0
    assert clock.summary().startswith("data 0.0") and ", train 0.00 s" in clock.summary()


def test_phase_clock_records_a_phase_that_raises():
    clock = PhaseClock()
    with pytest.raises(ValueError), clock.phase("model"):
        raise ValueError("bad")
    assert "model" in clock.phases


def test_start_of_process_splits_launch_imports_and_flower():
    clock = PhaseClock()
    clock.start_of_process(MODULE_T0 + 2.0, MODULE_T0 + 2.5)
    assert clock.phases["imports"] == pytest.approx(2.0) and clock.phases["flower"] == pytest.approx(0.5)
    assert 0 <= clock.phases["launch"] < time.time() - psutil.Process().create_time() + 1


def test_timing_travels_in_the_reply_and_is_optional():
    content = RecordDict({"x": ConfigRecord({"a": 1})})
    assert messages.read_timing(content) == {}
    messages.with_timing(content, {"data": 1.5, "train": 2})
    assert messages.read_timing(content) == {"data": 1.5, "train": 2.0}
    bad = RecordDict({"fedtune.timing": ConfigRecord({"data": "x"})})
    with pytest.raises(messages.MessageError, match="fedtune.timing"):
        messages.read_timing(bad)
