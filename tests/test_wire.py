"""fedtune.wire: every RoundPlan field and every registered client kind survive the generic schema."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from builders import LORA_A as A
from builders import LORA_B as B
from builders import full_plan
from equivalence import assert_same_plan

from fedtune.channel import Channel
from fedtune.client.kinds import ClientKind, register_kind
from fedtune.strategies.fedprox import ProxTerm
from fedtune.strategies.scaffold import ControlVariate
from fedtune.types import RoundPlan
from fedtune.wire import WireError, plan_config, plan_from_config, plan_tensors, with_tensors


@pytest.mark.parametrize("objective", [None, ProxTerm(0.25), ControlVariate({A: torch.ones(4, 6)})])
def test_every_plan_field_round_trips(objective):
    plan = full_plan(objective)
    tensors = plan_tensors(plan)
    assert set(tensors) >= {"params", "base_offset"} and ("objective.c" in tensors) == isinstance(objective, ControlVariate)
    back = plan_from_config(plan_config(plan), tensors)
    assert_same_plan(back, plan)


def test_every_round_plan_field_is_covered_by_the_schema():
    """A new RoundPlan field of an unknown type fails loudly instead of being dropped."""
    covered = {"int", "TensorDict", "LocalTrainConfig", "ClientKind | None", "frozenset[str]"}
    assert {str(f.type) for f in dataclasses.fields(RoundPlan)} <= covered

    @dataclasses.dataclass(frozen=True)
    class Odd(ClientKind):
        wire = "test-odd"
        values: list[int]

    register_kind(Odd)
    with pytest.raises(WireError, match="list\\[int\\] has no wire encoding"):
        plan_config(dataclasses.replace(full_plan(None), objective=Odd([1])))


def test_missing_key_and_unknown_kind_are_named():
    config = plan_config(full_plan(ProxTerm(0.5)))
    tensors = plan_tensors(full_plan(None))
    broken = {k: v for k, v in config.items() if k != "objective.mu"}
    with pytest.raises(WireError, match="objective.mu"):
        plan_from_config(broken, tensors)
    with pytest.raises(WireError, match="unknown client kind 'nope'"):
        plan_from_config({**config, "objective.kind": "nope"}, tensors)
    with pytest.raises(WireError, match="did not arrive"):
        plan_from_config(config, {"params": tensors["params"]})


def test_with_tensors_replaces_nested_fields():
    plan = full_plan(ControlVariate({A: torch.ones(4, 6)}))
    new = with_tensors(plan, {"objective.c": {A: torch.zeros(4, 6)}, "base_offset": {}})
    assert torch.count_nonzero(new.objective.c[A]) == 0 and new.base_offset == {} and new.params is plan.params


def test_channel_sends_every_tensor_field_and_cuts_the_adapter_to_the_client_rank():
    plan = full_plan(ControlVariate({A: torch.ones(4, 6), B: torch.ones(5, 4), "head.weight": torch.ones(3, 5)}))
    received, size = Channel.from_specs(down="fp16").send_plan(plan, "client_000")
    assert received.params[A].shape == (2, 6) and received.params[B].shape == (5, 2)  # rank 2
    assert set(received.base_offset) == set(plan.base_offset)
    torch.testing.assert_close(received.base_offset["m.base_layer.weight"], plan.base_offset["m.base_layer.weight"],
                               atol=1e-2, rtol=1e-2)
    codec = Channel.from_specs(down="fp16").down
    expected = sum(len(codec.encode(t)) for t in plan_tensors(received).values())
    assert size == expected
