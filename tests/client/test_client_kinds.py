"""fedtune.client.kinds: the client-side kind contract as the one client runtime calls it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedtune.batching import EncodedDataset
from fedtune.client import PERSONAL_STATE_KEY, local_train
from fedtune.client.kinds import ClientHooks, ClientKind, kind_named, register_kind
from fedtune.config import ModelConfig
from fedtune.models import get_trainable, load_classifier
from fedtune.runtime.parallel import parallel_support
from fedtune.types import LocalTrainConfig, RoundPlan

CALLS: list[str] = []


class _Recorder(ClientHooks):
    def __init__(self, ctx) -> None:
        self.ctx = ctx

    def on_backward(self, params):
        CALLS.append("on_backward")
        assert all(p.grad is not None for p in params.values())

    def before_clip(self, params):
        CALLS.append("before_clip")

    def after_clip(self, params):
        CALLS.append("after_clip")
        norm = sum(float(p.grad.pow(2).sum()) for p in params.values()) ** 0.5
        assert norm <= self.ctx.local.grad_clip + 1e-4  # clipping happened between the two hooks

    def finish(self, result):
        CALLS.append("finish")
        result.metrics["recorded"] = float(result.steps)
        result.extras["echo"] = {k: v.clone() for k, v in result.delta.items()}
        self.ctx.state["seen"] = {"steps": torch.tensor([float(result.steps)])}


@register_kind
@dataclasses.dataclass(frozen=True)
class RecordingKind(ClientKind):
    """A test kind: records its hooks, starts clients from the plan tensors halved."""

    wire = "test-recording"
    scale: float = 0.5

    def prepare(self, params, client_id, model):
        CALLS.append("prepare")
        return {k: v * self.scale for k, v in params.items()}

    def start(self, ctx):
        CALLS.append("start")
        assert all(torch.equal(ctx.reference[k], v) for k, v in self._expected.items())
        return _Recorder(ctx)


@pytest.fixture
def setup(tiny_model_dir):
    model = load_classifier(ModelConfig(name=str(tiny_model_dir), mode="lora"), 3, False, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = [[2] + torch.randint(5, 20, (6,), generator=g).tolist() + [3] for _ in range(16)]
    return model, EncodedDataset(ids, None, torch.randint(0, 3, (16,), generator=g)), get_trainable(model)


def test_hooks_run_in_order_and_shape_the_update(setup):
    model, data, params = setup
    kind = RecordingKind()
    object.__setattr__(kind, "_expected", {k: v * 0.5 for k, v in params.items()})
    plan = RoundPlan(1, params, LocalTrainConfig(0, 3, 0.05, 8, grad_clip=0.01), objective=kind)
    state: dict = {}
    CALLS.clear()
    update = local_train(model, data, plan, "c0", pad_id=0, seed=1, device=torch.device("cpu"), state=state)
    assert CALLS == ["prepare", "start"] + ["on_backward", "before_clip", "after_clip"] * 3 + ["finish"]
    assert update.metrics["recorded"] == 3.0 and torch.equal(state["seen"]["steps"], torch.tensor([3.0]))
    assert all(torch.equal(update.extras["echo"][k], update.delta[k]) for k in params)
    trained = get_trainable(model)
    # the delta is measured from where the kind started the client (halved), not from the plan
    assert all(torch.allclose(trained[k], params[k] * 0.5 + update.delta[k], atol=1e-6) for k in params)


def test_personal_tensors_stay_on_the_client(setup):
    model, data, params = setup
    head = sorted(k for k in params if "classifier" in k)
    plan = RoundPlan(1, params, LocalTrainConfig(0, 2, 0.05, 8), personal=frozenset(head))
    state: dict = {}
    first = local_train(model, data, plan, "c0", pad_id=0, seed=1, device=torch.device("cpu"), state=state)
    assert all(torch.count_nonzero(first.delta[k]) == 0 for k in head)  # zero change sent
    kept = {k: v.clone() for k, v in state[PERSONAL_STATE_KEY].items()}
    assert any(not torch.equal(kept[k], params[k]) for k in head)
    local_train(model, data, plan, "c0", pad_id=0, seed=2, device=torch.device("cpu"), state=state)
    # round 2 trained from the kept copy, not from the plan's head
    assert any(not torch.equal(state[PERSONAL_STATE_KEY][k], kept[k]) for k in head)


def test_a_kind_without_a_batched_form_makes_the_batched_trainer_step_aside(setup):
    model, _, params = setup
    plan = RoundPlan(1, params, LocalTrainConfig(1.0, 0, 0.05, 8), objective=RecordingKind())
    assert "RecordingKind has no batched form" in parallel_support(model, plan, torch.device("cpu"), ["a", "b"])
    assert parallel_support(model, dataclasses.replace(plan, objective=None), torch.device("cpu"), ["a", "b"]) == ""


def test_registry_names_known_kinds_and_refuses_a_clash():
    import fedtune.wire  # noqa: F401  (registers the built-in kinds)

    assert kind_named("test-recording") is RecordingKind
    assert kind_named("prox").__name__ == "ProxTerm" and kind_named("lora").__name__ == "LoraClient"
    with pytest.raises(KeyError, match="unknown client kind 'nope'.*prox"):
        kind_named("nope")

    @dataclasses.dataclass(frozen=True)
    class Other(ClientKind):
        wire = "prox"

    with pytest.raises(TypeError, match="registered twice"):
        register_kind(Other)
    with pytest.raises(TypeError, match="wire must name"):
        register_kind(type("Nameless", (ClientKind,), {}))
