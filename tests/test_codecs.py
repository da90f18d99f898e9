"""Communication codecs: error bounds, exact byte counts, error feedback, composition, bad specs, transports."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.channel import RESIDUAL, UPLINK_ERROR, Channel, residual_key
from fedtune.codecs import Codec, CodecError, encode_with_feedback, parse_codec
from fedtune.config import ConfigError, Experiment
from fedtune.payload import CommStats, encode_tensors
from fedtune.strategies.scaffold import CONTROL_DELTA, ControlVariate
from fedtune.types import ClientUpdate, LocalTrainConfig, RoundPlan


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(6, 50, generator=g) * torch.logspace(-3, 1, 6).unsqueeze(1)  # rows of very different scales
    return {
        "layer.lora_A.weight": torch.randn(8, 40, generator=g) * 0.02,
        "layer.lora_B.weight": rows,
        "head.bias": torch.randn(5, generator=g),
        "scalar": torch.tensor(3.5),
        "step": torch.arange(4),  # not floating: must travel unchanged under every codec
    }


ALL = ["none", "gzip", "zstd", "gzip:1", "zstd:10", "fp16", "bf16", "int8", "int8:channel", "int16",
       "int16:channel", "topk:0.1", "topk:0.3+int8", "topk:0.05+fp16+gzip", "topk:0.01+int8+zstd", "int8+gzip"]


@pytest.mark.parametrize("spec", ALL)
def test_round_trip_keeps_names_shapes_dtypes_and_spec(spec):
    t = _tensors()
    codec = parse_codec(spec)
    assert str(parse_codec(str(codec))) == str(codec)  # the canonical spec parses to itself
    back = codec.decode(codec.encode(t))
    assert set(back) == set(t)
    for k in t:
        assert back[k].shape == t[k].shape and back[k].dtype == t[k].dtype, k
    assert torch.equal(back["step"], t["step"])


@pytest.mark.parametrize("spec", ["none", "gzip", "zstd:19"])
def test_lossless_codecs_are_exact(spec):
    t = {**_tensors(), "half": torch.randn(3, 3).to(torch.bfloat16)}
    back = parse_codec(spec).decode(parse_codec(spec).encode(t))
    assert all(torch.equal(back[k], t[k]) for k in t)
    assert parse_codec(spec).is_lossless


def test_none_is_plain_safetensors_bytes():
    """The default codec sends exactly what fedtune.payload always sent (byte counts unchanged)."""
    t = _tensors()
    assert parse_codec("none").encode(t) == encode_tensors(t)


@pytest.mark.parametrize("spec,rel", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_float16_error_is_half_an_ulp(spec, rel):
    t = _tensors()
    back = parse_codec(spec).decode(parse_codec(spec).encode(t))
    for k, v in t.items():
        if v.is_floating_point():
            assert bool(((back[k] - v).abs() <= v.abs() * rel + 1e-7).all()), k


def _affine_bound(x: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    groups = x.reshape(x.shape[0], -1) if per_channel and x.dim() >= 2 else x.reshape(1, -1)
    half_step = (groups.max(1, keepdim=True).values - groups.min(1, keepdim=True).values) / (2**bits - 1) / 2
    return (half_step * (1 + 1e-4) + 1e-6 * groups.abs().max()).expand_as(groups).reshape(x.shape)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_affine_int_error_is_at_most_half_a_step(bits, per_channel):
    t = _tensors()
    spec = f"int{bits}" + (":channel" if per_channel else "")
    back = parse_codec(spec).decode(parse_codec(spec).encode(t))
    for k, v in t.items():
        if v.is_floating_point():
            err = (back[k] - v).abs()
            assert bool((err <= _affine_bound(v, bits, per_channel)).all()), (spec, k, float(err.max()))
            # the extremes of every group are representable: min exactly, max to float rounding
            assert float((back[k].min() - v.min()).abs()) <= 1e-6 * float(v.abs().max()) + 1e-12


def test_per_channel_beats_per_tensor_when_rows_differ_in_scale():
    x = _tensors()["layer.lora_B.weight"]
    err = {s: (parse_codec(s).decode(parse_codec(s).encode({"x": x}))["x"] - x).abs()[0].max()
           for s in ("int8", "int8:channel")}
    assert err["int8:channel"] < err["int8"] / 100  # row 0 is 1e4 times smaller than the largest row


def test_constant_tensor_quantizes_exactly():
    t = {"c": torch.full((4, 3), 0.25)}
    for spec in ("int8", "int16:channel"):
        assert torch.equal(parse_codec(spec).decode(parse_codec(spec).encode(t))["c"], t["c"])


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_exactly_the_largest_entries(fraction):
    t = {k: v for k, v in _tensors().items() if v.is_floating_point()}
    back = parse_codec(f"topk:{fraction}").decode(parse_codec(f"topk:{fraction}").encode(t))
    for k, v in t.items():
        k_expected = min(v.numel(), max(1, math.ceil(fraction * v.numel())))
        kept = back[k] != 0
        assert int(kept.sum()) == k_expected, k
        assert torch.equal(back[k][kept], v[kept])  # kept values travel exactly without a value stage
        if k_expected < v.numel():
            assert float(v[kept].abs().min()) >= float(v[~kept].abs().max())


@pytest.mark.parametrize("fraction", [0.003, 0.05, 1.0])
def test_global_topk_keeps_the_largest_entries_of_the_whole_payload(fraction):
    """``:global`` ranks all floating entries together: exactly ceil(F * total) survive, the largest overall."""
    g = torch.Generator().manual_seed(3)
    t = {"big": torch.randn(40, 50, generator=g), "small": torch.randn(30, generator=g) * 1e-3,
         "loud": torch.randn(6, 6, generator=g).sign() * (10 + torch.rand(6, 6, generator=g)), "ids": torch.arange(4)}
    codec = parse_codec(f"topk:{fraction}:global")
    back = codec.decode(codec.encode(t))
    assert torch.equal(back["ids"], t["ids"]) and back["small"].shape == (30,)
    floats = [k for k in t if t[k].is_floating_point()]
    total = sum(t[k].numel() for k in floats)
    kept = {k: back[k] != 0 for k in floats}
    assert sum(int(m.sum()) for m in kept.values()) == min(total, math.ceil(fraction * total))
    kept_values = torch.cat([t[k][kept[k]].abs() for k in floats])
    dropped = torch.cat([t[k][~kept[k]].abs() for k in floats])
    if dropped.numel():
        assert float(kept_values.min()) >= float(dropped.max())
    for k in floats:
        assert torch.equal(back[k][kept[k]], t[k][kept[k]])
    if fraction == 0.003:  # ceil(0.003 * 2066) = 7 entries: all from the loud tensor (|x| >= 10); the others keep none and decode to zeros
        assert int(kept["loud"].sum()) == 7 and not back["small"].any() and not back["big"].any()


def test_global_topk_composes_with_a_value_stage_and_error_feedback():
    g = torch.Generator().manual_seed(4)
    t = {"a": torch.randn(20, 20, generator=g), "b": torch.randn(10, generator=g) * 1e-4}
    codec = parse_codec("topk:0.05:global+int8+gzip")
    assert str(codec) == "topk:0.05:global+int8+gzip:6" and parse_codec(str(codec)) == codec
    data, decoded, residual = encode_with_feedback(codec, t, None)
    assert not decoded["b"].any()  # too small to make the budget: all of it stays in the residual
    assert torch.allclose(residual["b"], t["b"]) and int((decoded["a"] != 0).sum()) == 21  # ceil(0.05 * 410)
    for k in t:
        assert torch.allclose(decoded[k] + residual[k], t[k], atol=1e-6)


def test_composition_topk_int8_gzip():
    """Each stage does its own job: gzip changes no value, int8 bounds the kept values, top-k picks the support."""
    g = torch.Generator().manual_seed(5)
    t = {"a": torch.randn(64, 100, generator=g), "b": torch.randn(300, generator=g) * 1e-3}
    topk, quant, full = (parse_codec(s) for s in ("topk:0.2", "topk:0.2+int8", "topk:0.2+int8+gzip"))
    a, b, c = (codec.decode(codec.encode(t)) for codec in (topk, quant, full))
    for k in t:
        assert torch.equal(b[k], c[k])  # the lossless stage is lossless
        assert int(((b[k] != 0) & (a[k] == 0)).sum()) == 0  # nothing outside top-k's support
        kept = a[k][a[k] != 0]
        bound = (kept.max() - kept.min()) / 255 / 2 * (1 + 1e-4) + 1e-6 * kept.abs().max() if kept.numel() else 0
        assert float((a[k] - b[k]).abs().max()) <= float(bound)
    sizes = [len(codec.encode(t)) for codec in (parse_codec("none"), topk, quant)]
    assert sizes[0] > sizes[1] > sizes[2]


def test_lossless_stage_shrinks_compressible_payloads():
    t = {"w": torch.zeros(64, 64), "b": torch.ones(100)}
    for spec in ("gzip", "zstd", "int8+gzip"):
        assert len(parse_codec(spec).encode(t)) < len(parse_codec("none").encode(t)) / 10, spec


# --------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("spec", ["topk:0.05", "topk:0.1+int8+gzip", "int8", "fp16"])
def test_error_feedback_conserves_the_sum_of_updates(spec):
    """sum over rounds of what was sent + the final residual == sum of the true updates."""
    codec = parse_codec(spec)
    g = torch.Generator().manual_seed(1)
    residual, sent_sum, true_sum = None, None, None
    for _ in range(12):
        update = {"w": torch.randn(20, 30, generator=g) * 0.1, "b": torch.randn(7, generator=g)}
        data, decoded, residual = encode_with_feedback(codec, update, residual)
        assert torch.equal(decoded["w"], codec.decode(data)["w"])  # what the receiver gets
        sent_sum = decoded if sent_sum is None else {k: sent_sum[k] + decoded[k] for k in update}
        true_sum = update if true_sum is None else {k: true_sum[k] + update[k] for k in update}
    for k in true_sum:
        assert torch.allclose(sent_sum[k] + residual[k], true_sum[k], atol=1e-5), k
    if spec.startswith("topk"):  # the residual is what was not sent yet: nonzero, but bounded (no blow-up)
        assert float(residual["w"].abs().max()) > 0
        assert float(residual["w"].norm()) < float(true_sum["w"].norm())


def test_error_feedback_eventually_sends_small_coordinates():
    """Top-k alone never sends a coordinate that is always small; with error feedback its sum arrives."""
    codec = parse_codec("topk:0.5")
    update = {"w": torch.tensor([1.0, 0.1])}
    plain = sum(codec.decode(codec.encode(update))["w"][1] for _ in range(20))
    residual, fed = None, torch.zeros(2)
    for _ in range(20):
        _, decoded, residual = encode_with_feedback(codec, update, residual)
        fed += decoded["w"]
    assert float(plain) == 0.0
    assert abs(float(fed[1]) - 2.0) <= 0.1 + 1e-6  # 20 * 0.1, minus at most one round in flight


def test_channel_keeps_residuals_in_client_state_for_delta_and_extras():
    channel = Channel.from_specs(up="topk:0.1+int8")
    state: dict = {}
    delta = {"w": torch.randn(10, 10)}
    update = ClientUpdate("c1", delta, 5, {"train_loss": 1.0}, {CONTROL_DELTA: {"w": torch.randn(10, 10)}})
    encoded = channel.encode_update(update, state)
    assert set(state) == {RESIDUAL, residual_key(CONTROL_DELTA)}
    decoded = channel.decode_update(encoded)
    assert torch.allclose(decoded.delta["w"] + state[RESIDUAL]["w"], delta["w"], atol=1e-6)
    assert encoded.nbytes == len(encoded.delta) + len(encoded.extras[CONTROL_DELTA])
    left_out = state[RESIDUAL]["w"].norm() / delta["w"].norm()  # first round: no earlier residual
    assert encoded.metrics[UPLINK_ERROR] == pytest.approx(float(left_out), rel=1e-5) and 0.5 < left_out < 1
    assert encoded.metrics["train_loss"] == 1.0


@pytest.mark.parametrize("feedback", [True, False])
def test_uplink_error_is_the_share_of_the_update_left_out(feedback):
    """topk:0.5 on [3, 4, 0, 0] (+ residual [0, 0, 1, 0] with feedback): the metric is ||left out|| / ||x||."""
    channel = Channel.from_specs(up="topk:0.5", error_feedback=feedback)
    state = {RESIDUAL: {"w": torch.tensor([0.0, 0.0, 1.0, 0.0])}} if feedback else {}
    update = ClientUpdate("c1", {"w": torch.tensor([3.0, 4.0, 0.0, 0.0])}, 5, {})
    encoded = channel.encode_update(update, state)
    assert channel.decode_update(encoded).delta["w"].tolist() == [3.0, 4.0, 0.0, 0.0]
    assert encoded.metrics[UPLINK_ERROR] == pytest.approx((1 / 26) ** 0.5 if feedback else 0.0)
    no_ef: dict = {}
    Channel.from_specs(up="topk:0.1", error_feedback=False).encode_update(update, no_ef)
    assert no_ef == {}
    lossless: dict = {}
    Channel.from_specs(up="gzip").encode_update(update, lossless)
    assert lossless == {}  # nothing is dropped, nothing to feed back


def test_server_refuses_an_update_encoded_with_another_codec():
    update = ClientUpdate("c1", {"w": torch.randn(4)}, 5)
    encoded = Channel.from_specs(up="int8").encode_update(update, {})
    with pytest.raises(CodecError, match="int8"):
        Channel.from_specs(up="fp16").decode_update(encoded)
    with pytest.raises(CodecError, match="gzip"):
        parse_codec("int8+gzip").decode(parse_codec("int8").encode({"w": torch.randn(4)}))
    with pytest.raises(CodecError, match="encoded with codec 'int8'"):
        parse_codec("fp16").decode(parse_codec("int8").encode({"w": torch.randn(4)}))


# --------------------------------------------------------------------------- specs and config


@pytest.mark.parametrize("spec,fragment", [
    ("int7", "unknown stage 'int7'"),
    ("int8+fp16", "at most one value"),
    ("gzip+zstd", "at most one lossless"),
    ("gzip+int8", "'int8' in 'gzip+int8' is out of order"),
    ("int8+topk:0.1", "out of order"),
    ("topk", "topk needs a fraction"),
    ("topk:0", "(0, 1]"),
    ("topk:1.5", "(0, 1]"),
    ("int8:row", "'int8:row'"),
    ("fp16:channel", "takes no argument"),
    ("gzip:12", "1..9"),
    ("zstd:x", "integer"),
    ("int8++gzip", "empty stage"),
    ("none+gzip", "'none' cannot be combined"),
    ("topk:0.1+int8:channel", "per-channel"),
    ("topk:0.1:layer", "scope is :tensor or :global"),
])
def test_bad_specs_name_the_bad_part(spec, fragment):
    with pytest.raises(CodecError) as info:
        parse_codec(spec)
    assert fragment in str(info.value)


def test_topk_is_refused_on_the_downlink():
    with pytest.raises(CodecError, match="uplink"):
        parse_codec("topk:0.1+int8", downlink=True)
    assert parse_codec("int8+gzip", downlink=True) == Codec(quant="int8", lossless="gzip", level=6)


def test_config_validates_codec_keys():
    exp = Experiment.from_overrides(['federation.codec_up="topk:0.01+int8+gzip"', 'federation.codec_down="fp16"'])
    assert exp.federation.codec_up == "topk:0.01+int8+gzip" and exp.federation.error_feedback
    with pytest.raises(ConfigError, match=r"federation\.codec_up = 'int8\+lz4'.*unknown stage 'lz4'"):
        Experiment.from_overrides(['federation.codec_up="int8+lz4"'])
    with pytest.raises(ConfigError, match=r"federation\.codec_down.*top-k"):
        Experiment.from_overrides(['federation.codec_down="topk:0.1"'])
    with pytest.raises(ConfigError, match="federation.codec_up"):
        Experiment.from_overrides(["federation.codec_up=8"])


# --------------------------------------------------------------------------- transports


def _fake_train(monkeypatch, module: str, seen: list):
    """Replace local_train in ``module`` by a deterministic stand-in that records the plan it was given."""
    def fake(model, data, plan, cid, *, pad_id, seed, device, state=None):
        seen.append(plan)
        g = torch.Generator().manual_seed(seed)
        delta = {k: torch.randn(plan.params[k].shape, generator=g) for k in sorted(plan.params)}
        extras = {CONTROL_DELTA: {k: d * 0.5 for k, d in delta.items()}}
        return ClientUpdate(cid, delta, 10, {"train_loss": 1.0}, extras)
    monkeypatch.setattr(module + ".local_train", fake)


@pytest.mark.parametrize("up,down", [("none", "none"), ("int8+gzip", "fp16"), ("topk:0.1+int8", "int16:channel")])
def test_simulation_transport_trains_from_decoded_plan_and_aggregates_decoded_updates(monkeypatch, up, down):
    from fedtune.runtime.simulation import SimulationTransport, client_seed

    seen: list = []
    _fake_train(monkeypatch, "fedtune.runtime.simulation", seen)
    channel = Channel.from_specs(up, down)
    transport = SimulationTransport(None, {"a": [], "b": []}, pad_id=0, seed=3, device=torch.device("cpu"),
                                    channel=channel)
    params = {"w": torch.randn(12, 9), "b": torch.randn(9)}
    control = ControlVariate({k: v * 0.1 for k, v in params.items()})
    plan = RoundPlan(1, params, LocalTrainConfig(1.0, 0, 0.1, 4), control)
    stats = CommStats()
    updates = list(transport.run_round(plan, ["a", "b"], stats))
    codec_down, codec_up = parse_codec(down), parse_codec(up)
    expected_plan = codec_down.decode(codec_down.encode(params))
    assert all(torch.equal(p.params[k], expected_plan[k]) for p in seen for k in params)
    assert torch.equal(seen[0].objective.c["w"], codec_down.decode(codec_down.encode(plan.objective.c))["w"])
    per_client_down = len(codec_down.encode(params)) + len(codec_down.encode(plan.objective.c))
    assert stats.bytes_down == 2 * per_client_down
    up_bytes = 0
    for cid, u in zip(["a", "b"], updates, strict=True):
        g = torch.Generator().manual_seed(client_seed(3, 1, cid))
        true = {k: torch.randn(params[k].shape, generator=g) for k in sorted(params)}
        if codec_up.is_lossless:
            assert all(torch.equal(u.delta[k], true[k]) for k in true)
        else:  # first round: the residual starts at zero, so what arrives is exactly the codec's decoding of it
            assert all(torch.equal(u.delta[k], codec_up.decode(codec_up.encode(true))[k]) for k in true)
            assert not torch.equal(u.delta["w"], true["w"])
        up_bytes += len(codec_up.encode(true)) + len(codec_up.encode({k: d * 0.5 for k, d in true.items()}))
    assert stats.bytes_up == up_bytes
    assert (RESIDUAL in transport.client_states["a"]) == (not codec_up.is_lossless)


def test_parallel_transport_uses_the_channel(monkeypatch):
    """The batched path decodes the plan once for the group and encodes each client's update."""
    from fedtune.runtime import parallel

    seen: list = []

    def fake_group(model, datas, plan, client_ids, *, pad_id, seeds, group_seed, device, states):
        seen.append(plan)
        return [ClientUpdate(c, {k: torch.full(v.shape, 0.01 * (i + 1)) for k, v in plan.params.items()}, 5)
                for i, c in enumerate(client_ids)]

    monkeypatch.setattr(parallel, "train_group", fake_group)
    monkeypatch.setattr(parallel, "parallel_support", lambda model, plan, device, clients=(): "")
    monkeypatch.setattr(parallel, "_batchable", lambda data: True)
    channel = Channel.from_specs("int8+gzip", "bf16")
    transport = parallel.ParallelSimulationTransport(None, {"a": [], "b": []}, pad_id=0, seed=0,
                                                     device=torch.device("cpu"), parallel_clients=2, channel=channel)
    params = {"w": torch.randn(5, 5)}
    stats = CommStats()
    updates = list(transport.run_round(RoundPlan(1, params, LocalTrainConfig(1.0, 0, 0.1, 4)), ["a", "b"], stats))
    assert torch.equal(seen[0].params["w"], params["w"].to(torch.bfloat16).float())
    assert stats.bytes_down == 2 * len(channel.down.encode(params))
    assert stats.bytes_up == sum(len(channel.up.encode(u.delta)) for u in updates)  # constant deltas: exact
    assert set(transport.client_states) == {"a", "b"}


def test_flower_messages_carry_codec_bytes():
    pytest.importorskip("flwr")
    from fedtune.runtime.flower import messages

    channel = Channel.from_specs("topk:0.2+int8+gzip", "int8:channel")
    params = {"w": torch.randn(6, 7)}
    plan = RoundPlan(2, params, LocalTrainConfig(1.0, 0, 0.1, 4), ControlVariate({"w": torch.ones(6, 7)}))
    content = messages.encode_train_request(messages.TrainRequest("c", plan, messages.TaskInfo(("x", "y")), channel))
    assert messages.record_payload(content, "fedtune.tensor.params") == channel.down.encode(params)
    back = messages.decode_train_request(content)
    assert back.channel == channel
    assert torch.equal(back.plan.params["w"], channel.down.decode(channel.down.encode(params))["w"])
    assert not torch.equal(back.plan.params["w"], params["w"])
    assert torch.equal(back.plan.objective.c["w"], torch.ones(6, 7))
    assert messages.encoded_size(content) >= len(channel.down.encode(params))
    state: dict = {}
    update = ClientUpdate("c", {"w": torch.randn(6, 7)}, 3, {"train_loss": 0.1})
    encoded = channel.encode_update(update, state)
    reply = messages.encode_update(encoded)
    got = channel.decode_update(messages.decode_update(reply))
    assert torch.equal(got.delta["w"], channel.up.decode(encoded.delta)["w"])
    assert messages.record_payload(reply, "fedtune.delta") == encoded.delta
    with pytest.raises(CodecError, match="expects codec_up"):
        Channel.from_specs("fp16").decode_update(messages.decode_update(reply))


# --------------------------------------------------------------------------- end to end on the tiny model


def _adapter(result):
    from safetensors.torch import load_file

    return load_file(result.output_dir / "model" / "adapter_model.safetensors")


def test_end_to_end_int8_gzip_and_lossless_gzip(tiny_experiment, tmp_path):
    """int8+gzip up / fp16 down: a third of the bytes, still learns, a different model; gzip alone: same model."""
    from fedtune.experiment import run_experiment

    common = ["federation.rounds=3"]
    plain = run_experiment(tiny_experiment(*common, f'output_dir="{tmp_path / "plain"}"'), quiet=True)
    lossy = run_experiment(tiny_experiment(*common, 'federation.codec_up="int8+gzip"', 'federation.codec_down="fp16"',
                                           f'output_dir="{tmp_path / "int8"}"'), quiet=True)
    gz = run_experiment(tiny_experiment(*common, 'federation.codec_up="gzip"', f'output_dir="{tmp_path / "gzip"}"'),
                        quiet=True)
    for p, q, g in zip(plain.history, lossy.history, gz.history, strict=True):
        assert q["bytes_up"] < 0.35 * p["bytes_up"] and q["bytes_down"] < 0.65 * p["bytes_down"]
        assert g["bytes_up"] < p["bytes_up"] and g["bytes_down"] == p["bytes_down"]
    assert lossy.final_metrics["accuracy"] >= 0.9 and plain.final_metrics["accuracy"] >= 0.9
    a, b, c = _adapter(plain), _adapter(lossy), _adapter(gz)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the server aggregated the decoded (lossy) updates
    assert all(torch.equal(a[k], c[k]) for k in a)  # lossless: bit for bit the uncompressed run
    assert lossy.summary["bytes_up_total"] == sum(r["bytes_up"] for r in lossy.history)
    assert all(0 < r["uplink_error"] < 0.05 for r in lossy.history)  # int8 leaves out a sliver of each update
    assert all("uplink_error" not in r for r in plain.history + gz.history)  # lossless: nothing to report


@pytest.mark.parametrize("parallel", [1, 3])
def test_end_to_end_topk_with_error_feedback(tiny_experiment, tmp_path, parallel):
    """topk:0.1+int8 with error feedback learns the tiny task; switching feedback off changes the model."""
    from fedtune.experiment import run_experiment

    common = ["federation.rounds=8", 'federation.codec_up="topk:0.1+int8"', f"simulation.parallel_clients={parallel}"]
    ef = run_experiment(tiny_experiment(*common, f'output_dir="{tmp_path / "ef"}"'), quiet=True)
    no_ef = run_experiment(tiny_experiment(*common, "federation.error_feedback=false",
                                           f'output_dir="{tmp_path / "no"}"'), quiet=True)
    assert ef.final_metrics["accuracy"] >= 0.9
    assert [r["bytes_up"] for r in ef.history] == [r["bytes_up"] for r in no_ef.history]  # top-k: fixed sizes
    a, b = _adapter(ef), _adapter(no_ef)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_flower_client_app_decodes_the_plan_and_encodes_its_update(tiny_experiment, tiny_csv):
    """The ClientApp's train handler, called as Flower calls it: lossy plan in, codec bytes out, residual kept."""
    pytest.importorskip("flwr")
    import time

    from flwr.app import Context, Message, Metadata, RecordDict

    from fedtune.experiment import local_train_config
    from fedtune.models import get_trainable, load_classifier
    from fedtune.runtime.flower import messages
    from fedtune.runtime.flower.client_app import make_client_app
    from fedtune.runtime.flower.experiment_source import fixed

    exp = tiny_experiment()
    app = make_client_app(fixed(exp))
    params = get_trainable(load_classifier(exp.model, 3, False, exp.seed))
    channel = Channel.from_specs("topk:0.2+int8+gzip", "int8")
    task = messages.TaskInfo(("money", "sports", "tech"))
    context = Context(run_id=1, node_id=7, node_config={"client-id": "site_a", "train-file": str(tiny_csv[0])},
                      state=RecordDict(), run_config={})
    sizes = []
    for rnd in (1, 2):
        plan = RoundPlan(rnd, params, local_train_config(exp))
        request = messages.encode_train_request(messages.TrainRequest("site_a", plan, task, channel))
        meta = Metadata(run_id=1, message_id=f"m{rnd}", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                        group_id=str(rnd), created_at=time.time(), ttl=600.0, message_type=messages.TRAIN)
        reply = app(Message(request, metadata=meta), context)
        encoded = messages.decode_update(reply.content)
        update = channel.decode_update(encoded)
        assert encoded.codec == str(channel.up) and update.client_id == "site_a"
        assert messages.record_payload(reply.content, "fedtune.delta") == encoded.delta
        kept = sum(int((v != 0).sum()) for v in update.delta.values())
        assert kept <= sum(math.ceil(0.2 * v.numel()) for v in params.values())
        sizes.append(encoded.nbytes)
        state = messages.load_client_state(context.state)
        assert RESIDUAL in state and set(state[RESIDUAL]) == set(params)
    assert sizes[0] < len(Codec().encode(params)) / 4


@pytest.mark.parametrize("fraction, n, kept", [(0.07, 100, 7), (0.29, 100, 29), (0.57, 100, 57), (0.1, 30, 3)])
def test_topk_count_is_the_exact_decimal_ceiling(fraction, n, kept):
    """0.07 * 100 is 7.000000000000001 in binary floating point: math.ceil would keep 8."""
    from fedtune.codecs import exact_ceil

    assert exact_ceil(fraction, n) == kept
    x = torch.arange(1, n + 1, dtype=torch.float32)
    for spec in (f"topk:{fraction}", f"topk:{fraction}:global"):
        back = parse_codec(spec).decode(parse_codec(spec).encode({"w": x}))["w"]
        assert int((back != 0).sum()) == kept, spec
    assert math.ceil(0.07 * 100) == 8  # the float pitfall the exact ceiling avoids


@pytest.mark.parametrize("spec", ["none", "int8", "int16:channel+gzip", "topk:0.1+int8+zstd", "topk:0.2:global+gzip"])
def test_encoded_bytes_are_deterministic(spec):
    """The same tensors give the same bytes every time (safetensors' header order is made canonical)."""
    t = _tensors()
    codec = parse_codec(spec)
    assert len({codec.encode(t) for _ in range(30)}) == 1
    assert len({encode_tensors(t) for _ in range(30)}) == 1
    back = codec.decode(codec.encode(t))
    assert set(back) == set(t)
