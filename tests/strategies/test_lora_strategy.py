"""LoRA-aware aggregation in the round loop: a tiny BERT, mixed client ranks, exactness per round, bytes."""

import math

import pytest
import torch

from fedtune.batching import EncodedDataset
from fedtune.config import ConfigError, LoraConfig, ModelConfig
from fedtune.lora_aggregation import lora_modules, other_names
from fedtune.models import get_trainable, load_classifier
from fedtune.payload import CommStats, payload_bytes
from fedtune.personalization import PERSONAL_STATE_KEY
from fedtune.runtime.simulation import SimulationTransport
from fedtune.server.run import apply_state
from fedtune.strategies.lora import LoraAggregation
from fedtune.types import BASE_OFFSET, LocalTrainConfig

CPU = torch.device("cpu")
SIZES = {"c0": 12, "c1": 20, "c2": 9}
RANKS = {"c0": 1, "c1": 2, "c2": 4}
R, ALPHA = 8, 16.0
SCALING = ALPHA / R


def make_data(n: int, seed: int) -> EncodedDataset:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 10, (n,), generator=g).tolist()
    ids = [[2] + torch.randint(5, 27, (m,), generator=g).tolist() + [3] for m in lengths]
    return EncodedDataset(ids, None, torch.randint(0, 3, (n,), generator=g))


def setup(tiny_model_dir, rule, ranks=RANKS, weight_decay=0.0):
    model = load_classifier(ModelConfig(name=str(tiny_model_dir), mode="lora", lora=LoraConfig(r=R, alpha=ALPHA)),
                            3, False, seed=0)
    data = {cid: make_data(n, seed=i) for i, (cid, n) in enumerate(SIZES.items())}
    transport = SimulationTransport(model, data, pad_id=0, seed=0, device=CPU)  # no wrapper: the plan says it all
    local = LocalTrainConfig(epochs=2.0, max_steps=0, lr=0.05, batch_size=4, weight_decay=weight_decay)
    strategy = LoraAggregation(rule, local, scaling=SCALING, rank=R, client_ranks=ranks, seed=3)
    return model, transport, strategy


def run_round(strategy, transport, state, rnd):
    stats = CommStats()
    plan = strategy.configure(rnd, state, list(SIZES))
    updates = list(transport.run_round(plan, list(SIZES), stats))
    new_state, metrics = strategy.aggregate(rnd, state, updates)
    return new_state, metrics, updates, stats


def client_mean_update(state, updates, ranks):
    """Independently: the example-weighted mean of the clients' s * B_i @ A_i, each at its own rank."""
    mods = lora_modules(state.params)
    total = sum(u.num_examples for u in updates)
    out = {}
    for m in mods:
        acc = torch.zeros_like(state.params[m.b].double() @ state.params[m.a].double())
        for u in updates:
            r = ranks.get(u.client_id, R)
            a = (state.params[m.a] + u.delta[m.a])[:r].double()
            b = (state.params[m.b] + u.delta[m.b])[:, :r].double()
            acc += u.num_examples * SCALING * (b @ a)
        out[m.name] = acc / total
    return out


def merged_update(old, new):
    """What the server's new global model applies: s * B'A' plus the change of the base correction."""
    out = {}
    for m in lora_modules(new.params):
        d = SCALING * (new.params[m.b].double() @ new.params[m.a].double())
        off_new = new.buffers.get(BASE_OFFSET, {}).get(m.base)
        off_old = old.buffers.get(BASE_OFFSET, {}).get(m.base)
        if off_new is not None:
            d = d + off_new.double() - (off_old.double() if off_old is not None else 0)
        out[m.name] = d
    return out


@pytest.mark.parametrize("rule", ["svd", "ffa", "fedex", "flora", "fedit"])
def test_each_round_is_exact_on_a_real_model_with_mixed_ranks(tiny_model_dir, rule):
    model, transport, strategy = setup(tiny_model_dir, rule)
    state = strategy.init(get_trainable(model))
    for rnd in (1, 2):  # round 2 starts from non-zero adapters (and base corrections)
        new, metrics, updates, _ = run_round(strategy, transport, state, rnd)
        ref, got = client_mean_update(state, updates, RANKS), merged_update(state, new)
        err = max(float((got[k] - ref[k]).abs().max()) for k in ref)
        scale = max(float(v.abs().max()) for v in ref.values())
        assert scale > 1e-3  # the clients did move
        if rule == "fedit":
            assert err > 1e-3 * scale and metrics["lora_gap"] > 1e-3
        else:
            assert err < 1e-5, (rule, rnd, err)
            assert metrics["lora_gap"] < 1e-5
        state = new
    if rule == "svd":  # global rank 8 >= 1 + 2 + 4: nothing is cut
        assert metrics["lora_energy_kept"] == pytest.approx(1.0, abs=1e-6)


def test_clients_train_only_their_rank_and_upload_only_it(tiny_model_dir):
    model, transport, strategy = setup(tiny_model_dir, "svd")
    state = strategy.init(get_trainable(model))
    _, _, updates, stats = run_round(strategy, transport, state, 1)
    mods = lora_modules(state.params)
    heads = other_names(list(state.params), mods)
    expected_up = 0
    for u in updates:
        r = RANKS[u.client_id]
        for m in mods:
            assert torch.count_nonzero(u.delta[m.a][r:]) == 0 and torch.count_nonzero(u.delta[m.b][:, r:]) == 0
            assert torch.count_nonzero(u.delta[m.b][:, :r]) > 0  # B trained (from zero)
        payload = {n: torch.zeros_like(state.params[n]) for n in heads}
        payload.update({m.a: torch.zeros(r, state.params[m.a].shape[1]) for m in mods})
        payload.update({m.b: torch.zeros(state.params[m.b].shape[0], r) for m in mods})
        expected_up += payload_bytes(payload)
    assert stats.bytes_up == expected_up == stats.bytes_down  # svd sends head + A + B at each rank both ways
    assert stats.bytes_up < 3 * payload_bytes(state.params)


def test_svd_below_the_sum_of_ranks_reports_the_energy_cut(tiny_model_dir):
    model, transport, strategy = setup(tiny_model_dir, "svd", ranks={})  # every client at rank 8, server rank 8
    state = strategy.init(get_trainable(model))
    _, metrics, _, _ = run_round(strategy, transport, state, 1)
    assert 0.5 < metrics["lora_energy_kept_min"] <= metrics["lora_energy_kept"] < 1.0
    assert metrics["lora_gap"] > 1e-4


def test_ffa_never_moves_a_even_with_weight_decay_and_never_sends_it(tiny_model_dir):
    model, transport, strategy = setup(tiny_model_dir, "ffa", weight_decay=0.1)
    state = strategy.init(get_trainable(model))
    new, _, updates, stats = run_round(strategy, transport, state, 1)
    mods = lora_modules(state.params)
    for u in updates:
        assert all(torch.count_nonzero(u.delta[m.a]) == 0 for m in mods)
        assert any(torch.count_nonzero(u.delta[m.b]) > 0 for m in mods)
    assert all(torch.equal(new.params[m.a], state.params[m.a]) for m in mods)
    heads = other_names(list(state.params), mods)
    expected = 0
    for c in SIZES:  # head + B at the client's rank; A is regenerated from the shared seed, never sent
        payload = {n: state.params[n] for n in heads}
        payload.update({m.b: state.params[m.b][:, :RANKS[c]] for m in mods})
        expected += payload_bytes(payload)
    assert stats.bytes_up == expected == stats.bytes_down


def test_fedsa_keeps_b_on_each_client_and_reports_a_global_b(tiny_model_dir):
    model, transport, strategy = setup(tiny_model_dir, "fedsa", ranks={})
    state = strategy.init(get_trainable(model))
    mods = lora_modules(state.params)
    s1, _, ups1, stats1 = run_round(strategy, transport, state, 1)
    own = {c: transport.client_states[c][PERSONAL_STATE_KEY] for c in SIZES}
    total = sum(SIZES.values())
    for m in mods:  # the global B is the example-weighted mean of the clients' own B
        mean_b = sum(SIZES[c] * own[c][m.b] for c in SIZES) / total
        torch.testing.assert_close(s1.params[m.b], mean_b, rtol=0, atol=1e-6)
    s2, _, ups2, stats2 = run_round(strategy, transport, s1, 2)
    for u in ups2:  # round 2 trained from the client's own B, not the global one
        start = own[u.client_id]
        now = transport.client_states[u.client_id][PERSONAL_STATE_KEY]
        for m in mods:
            torch.testing.assert_close(u.delta[m.b], now[m.b] - s1.params[m.b])
            assert not torch.equal(now[m.b], start[m.b])
    # The global B still goes down every round: a server cannot know that a node kept its own B
    # (a restarted node has lost it), and the client ignores it when it has one.
    assert stats2.bytes_down == stats1.bytes_down


@pytest.mark.parametrize("rule", ["fedex", "flora"])
def test_base_corrections_reach_the_model_and_are_counted(tiny_model_dir, rule):
    model, transport, strategy = setup(tiny_model_dir, rule, ranks={})
    state = strategy.init(get_trainable(model))
    mods = lora_modules(state.params)
    pristine = model.get_parameter(mods[0].base).detach().clone()
    s1, m1, _, stats1 = run_round(strategy, transport, state, 1)
    offset = s1.buffers[BASE_OFFSET]
    assert set(offset) == {m.base for m in mods} and m1["lora_base_offset_norm"] > 0
    apply_state(model, s1)
    torch.testing.assert_close(model.get_parameter(mods[0].base), pristine + offset[mods[0].base])
    if rule == "flora":  # merged: fresh adapters (B = 0), a new seeded A
        assert all(torch.count_nonzero(s1.params[m.b]) == 0 for m in mods)
        assert not torch.equal(s1.params[mods[0].a], state.params[mods[0].a])
    _, _, _, stats2 = run_round(strategy, transport, s1, 2)
    assert stats2.bytes_down - stats1.bytes_down >= len(SIZES) * payload_bytes(offset) - 1000 * len(SIZES)
    apply_state(model, state)  # an empty correction restores the pristine base
    torch.testing.assert_close(model.get_parameter(mods[0].base), pristine)


# ---------------------------------------------------------------------------------- end to end

FAST = ["train.epochs=1", "federation.rounds=2", "eval.every=2", "model.lora.r=8"]


@pytest.mark.parametrize("rule", ["fedit", "svd", "ffa", "fedsa", "fedex", "flora"])
def test_every_rule_runs_end_to_end(tiny_experiment, rule):
    from fedtune.experiment import run_experiment

    extra = ['model.lora.client_ranks=[2, 4, 8]'] if rule in ("svd", "fedit") else []
    res = run_experiment(tiny_experiment(f"model.lora.aggregation={rule}", *FAST, *extra), quiet=True)
    assert [r["round"] for r in res.history] == [1, 2]
    assert all(r["clients_aggregated"] == 3 and math.isfinite(r["train_loss"]) for r in res.history)
    assert math.isfinite(res.final_metrics["accuracy"])
    gaps = [r["lora_gap"] for r in res.history]
    assert (max(gaps) > 1e-4) if rule in ("fedit", "fedsa", "svd") else max(gaps) < 1e-5
    if rule == "svd":
        assert all(0 < r["lora_energy_kept"] < 1 for r in res.history)  # 2+4+8 > 8: the SVD cuts
    assert (res.output_dir / "model" / "lora_base_offset.safetensors").is_file() == (rule in ("fedex", "flora"))


@pytest.mark.parametrize("rule", ["fedex", "flora"])
def test_base_changing_rules_learn_and_evaluation_sees_the_base_correction(tiny_experiment, rule):
    from fedtune.experiment import run_experiment

    # FLoRA's adapters restart at B = 0 every round: what it learned is in the base correction only.
    exp = tiny_experiment(f"model.lora.aggregation={rule}", "eval.initial=true", "federation.rounds=2")
    res = run_experiment(exp, quiet=True)
    assert res.history[-1]["eval_accuracy"] > res.history[0]["eval_accuracy"] + 0.2
    assert res.history[-1]["eval_accuracy"] > 0.8


def test_fedsa_scores_each_client_with_its_own_b(tiny_experiment):
    from fedtune.experiment import run_experiment

    res = run_experiment(tiny_experiment("model.lora.aggregation=fedsa", "personalization.method=fedper",
                                         "partition.method=label", "partition.labels_per_client=1",
                                         "federation.rounds=2"), quiet=True)
    rep = res.summary["personalization"]
    assert rep["personalized"]["mean"] > rep["global"]["mean"]  # own B and own head beat the global model


def test_config_rejects_bad_lora_settings(tiny_experiment):
    from fedtune.experiment import build_strategy

    with pytest.raises(ConfigError, match=r"model\.lora\.aggregation: 'avg' is not one of"):
        tiny_experiment("model.lora.aggregation=avg")
    with pytest.raises(ConfigError, match=r"model\.lora\.client_ranks: 16 is not in 1\.\.model\.lora\.r = 8"):
        tiny_experiment("model.lora.r=8", "model.lora.aggregation=svd", "model.lora.client_ranks=[2, 16]")
    with pytest.raises(ConfigError, match="client_ranks needs model.lora.aggregation"):
        tiny_experiment("model.lora.client_ranks=[2]")
    with pytest.raises(ConfigError, match="model.lora.aggregation needs model.mode = 'lora'"):
        tiny_experiment("model.mode=full", "model.lora.aggregation=svd")
    with pytest.raises(ConfigError, match="strategy.name = 'scaffold' is another aggregation rule"):
        build_strategy(tiny_experiment("model.lora.aggregation=svd", "strategy.name=scaffold"))
    with pytest.raises(ConfigError, match=r"central DP .* do not compose"):
        build_strategy(tiny_experiment("model.lora.aggregation=svd", "privacy.enabled=true"))
    # No longer refused: the batched trainer trains such clients one at a time, and codecs apply to the factors.
    assert build_strategy(tiny_experiment("model.lora.aggregation=ffa", "simulation.parallel_clients=2")).rule == "ffa"
    assert build_strategy(tiny_experiment("model.lora.aggregation=fedex", 'federation.codec_up="fp16"')).rule == "fedex"
    s = build_strategy(tiny_experiment("model.lora.aggregation=svd", "model.lora.r=8", "strategy.name=fedprox",
                                       "strategy.mu=0.1", "model.lora.client_ranks=[2, 4]"))
    assert s.client_ranks == {"client_000": 2, "client_001": 4, "client_002": 2} and s.objective().mu == 0.1


def test_uniform_rank_rules_keep_the_batched_trainer(tiny_experiment, tmp_path):
    from fedtune.experiment import run_experiment

    sets = ["model.lora.aggregation=fedex", "federation.rounds=2", "train.epochs=2"]
    seq = run_experiment(tiny_experiment(*sets), quiet=True).history
    par = run_experiment(tiny_experiment(*sets, "simulation.parallel_clients=3", f'output_dir="{tmp_path / "par"}"'),
                         quiet=True).history
    assert all(r["lora_gap"] < 1e-5 for r in par)
    assert [r["bytes_up"] for r in par] == [r["bytes_up"] for r in seq]
    assert par[-1]["eval_loss"] == pytest.approx(seq[-1]["eval_loss"], rel=1e-3)  # same updates up to float order


@pytest.mark.parametrize("rule", ["fedex", "flora"])
def test_saved_fedex_flora_model_loads_with_its_base_correction(tiny_experiment, rule, tmp_path):
    """load_for_inference (predict) and the merged export apply the saved base correction."""
    from fedtune.artifacts import BASE_OFFSET_FILE, load_for_inference
    from fedtune.experiment import run_experiment
    from fedtune.export import export_run
    from fedtune.tasks.data import load_task_data

    res = run_experiment(tiny_experiment(f"model.lora.aggregation={rule}", "federation.rounds=2"), quiet=True)
    ev = next(iter(load_task_data(tiny_experiment().data).evals.values()))

    def accuracy(model, tok) -> float:
        enc = tok(ev.texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            preds = model(**enc).logits.argmax(-1)
        return float((preds == torch.tensor(ev.labels)).float().mean())

    model, tok, _ = load_for_inference(res.output_dir)
    assert abs(accuracy(model, tok) - res.final_metrics["accuracy"]) < 1e-6
    merged = export_run(res.output_dir, ["merged"], tmp_path / "exports")["merged"]
    model_m, tok_m, _ = load_for_inference(merged)
    assert abs(accuracy(model_m, tok_m) - res.final_metrics["accuracy"]) < 1e-6

    # Without the correction the adapter alone is another model (flora: B restarts at 0 each round).
    (res.output_dir / "model" / BASE_OFFSET_FILE).rename(tmp_path / "offset.safetensors")
    bare, _, _ = load_for_inference(res.output_dir)
    enc = tok(ev.texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(bare(**enc).logits, model(**enc).logits, atol=1e-4)
