"""Batched multi-adapter training (runtime/parallel.py) gives the sequential updates; fallbacks; config."""

import logging

import pytest
import torch
from builders import CLIENT_SIZES, perturbed
from equivalence import CPU, assert_same_states, assert_same_updates, parallel, sequential

from fedtune import tensors
from fedtune.batching import EncodedDataset
from fedtune.client import local_train
from fedtune.config import ConfigError, Experiment, ModelConfig
from fedtune.models import get_trainable, load_classifier
from fedtune.payload import CommStats
from fedtune.runtime.parallel import ParallelSimulationTransport, parallel_support
from fedtune.runtime.simulation import SimulationTransport
from fedtune.strategies.fedprox import ProxTerm
from fedtune.strategies.scaffold import CONTROL_DELTA, SCAFFOLD_STATE, ControlVariate
from fedtune.types import LocalTrainConfig, RoundPlan


@pytest.mark.parametrize(
    "epochs,max_steps,objective",
    [(1.5, 0, ProxTerm(mu=0.5)), (2.0, 5, ProxTerm(mu=0.5)), (0.0, 4, None), (1.0, 0, ProxTerm(mu=0.0))],
    ids=["fractional-epochs-fedprox", "max-steps-fedprox", "max-steps-only", "mu0"],
)
def test_parallel_equals_sequential_adamw(lora_model, client_data, epochs, max_steps, objective):
    params = perturbed(get_trainable(lora_model))
    local = LocalTrainConfig(epochs=epochs, max_steps=max_steps, lr=0.01, batch_size=4, weight_decay=0.01,
                             grad_clip=0.5)
    plan = RoundPlan(3, params, local, objective)
    seq = sequential(lora_model, client_data, plan)
    par = parallel(lora_model, client_data, plan)
    steps = {cid: u.metrics["steps"] for cid, u in seq.items()}
    assert len(set(steps.values())) > 1 or max_steps  # clients really finish at different steps
    assert_same_updates(seq, par)


def test_parallel_equals_sequential_scaffold_sgd(lora_model, client_data):
    params = perturbed(get_trainable(lora_model))
    c = {k: 0.01 * torch.randn_like(v) for k, v in params.items()}
    local = LocalTrainConfig(epochs=1.0, max_steps=0, lr=0.05, batch_size=8, grad_clip=1.0, optimizer="sgd")
    plan = RoundPlan(1, params, local, ControlVariate(c))
    # one client already holds a control variate from an earlier round
    seq_states = {"c1": {SCAFFOLD_STATE: {k: 0.02 * torch.ones_like(v) for k, v in params.items()}}}
    par_states = {"c1": {SCAFFOLD_STATE: {k: 0.02 * torch.ones_like(v) for k, v in params.items()}}}
    seq = sequential(lora_model, client_data, plan, seq_states)
    par = parallel(lora_model, client_data, plan, par_states)
    assert all(CONTROL_DELTA in u.extras for u in par.values())
    assert_same_updates(seq, par)
    assert_same_states(seq_states, par_states, SCAFFOLD_STATE, params)


def test_parallel_equals_sequential_scaffold_adamw(lora_model, client_data):
    """Under AdamW both trainers keep c_i+ as the mean clipped gradient, per client."""
    params = perturbed(get_trainable(lora_model))
    c = {k: 0.01 * torch.randn_like(v) for k, v in params.items()}
    local = LocalTrainConfig(epochs=1.0, max_steps=0, lr=1e-3, batch_size=8, grad_clip=1.0, optimizer="adamw")
    plan = RoundPlan(1, params, local, ControlVariate(c))
    seq_states: dict = {}
    par_states: dict = {}
    assert_same_updates(sequential(lora_model, client_data, plan, seq_states),
                        parallel(lora_model, client_data, plan, par_states))
    assert_same_states(seq_states, par_states, SCAFFOLD_STATE, params)


def test_parallel_with_padding_options(lora_model, client_data):
    """pad_to and length bucketing go through the same batch drawing in both trainers."""
    params = perturbed(get_trainable(lora_model))
    local = LocalTrainConfig(epochs=1.0, max_steps=0, lr=0.01, batch_size=4, grad_clip=1.0, pad_to=20,
                             length_bucketing=True)
    plan = RoundPlan(2, params, local, ProxTerm(mu=0.1))
    assert_same_updates(sequential(lora_model, client_data, plan), parallel(lora_model, client_data, plan))


def test_model_is_restored_after_parallel_training(lora_model, client_data):
    batch = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    lora_model.eval()
    before = lora_model(**batch).logits.detach().clone()
    before_params = get_trainable(lora_model)
    plan = RoundPlan(1, perturbed(before_params), LocalTrainConfig(1.0, 2, 0.01, 4))
    parallel(lora_model, client_data, plan)
    lora_model.eval()
    assert torch.equal(lora_model(**batch).logits, before)
    assert all(torch.equal(v, get_trainable(lora_model)[k]) for k, v in before_params.items())
    assert not any("forward" in vars(m) for m in lora_model.modules())


def test_transport_streams_same_updates_and_bytes(lora_model, client_data):
    params = perturbed(get_trainable(lora_model))
    plan = RoundPlan(1, params, LocalTrainConfig(1.0, 0, 0.01, 8, grad_clip=1.0), ProxTerm(mu=0.1))
    s_stats, p_stats = CommStats(), CommStats()
    seq = list(SimulationTransport(lora_model, client_data, pad_id=0, seed=0, device=CPU)
               .run_round(plan, list(client_data), s_stats))
    par = list(ParallelSimulationTransport(lora_model, client_data, pad_id=0, seed=0, device=CPU, parallel_clients=3)
               .run_round(plan, list(client_data), p_stats))  # groups of 3 and 1
    assert [u.client_id for u in par] == [u.client_id for u in seq]
    assert_same_updates({u.client_id: u for u in seq}, {u.client_id: u for u in par})
    assert (p_stats.bytes_up, p_stats.bytes_down) == (s_stats.bytes_up, s_stats.bytes_down)


@pytest.mark.parametrize("mode", ["full", "partial"])
def test_fallback_for_other_modes_logs_and_works(tiny_model_dir, client_data, mode, caplog):
    model = load_classifier(ModelConfig(name=str(tiny_model_dir), mode=mode, last_layers=1), 3, False, seed=0)
    params = get_trainable(model)
    plan = RoundPlan(1, params, LocalTrainConfig(0.0, 2, 0.01, 8))
    assert "not a peft LoRA" in parallel_support(model, plan, CPU)
    transport = ParallelSimulationTransport(model, client_data, pad_id=0, seed=0, device=CPU, parallel_clients=4)
    with caplog.at_level(logging.WARNING, logger="fedtune.runtime.parallel"):
        par = list(transport.run_round(plan, list(client_data), CommStats()))
        list(transport.run_round(plan, list(client_data), CommStats()))
    assert sum("one at a time" in r.getMessage() for r in caplog.records) == 1  # logged once, not per round
    seq = list(SimulationTransport(model, client_data, pad_id=0, seed=0, device=CPU)
               .run_round(plan, list(client_data), CommStats()))
    for a, b in zip(seq, par, strict=True):
        assert a.client_id == b.client_id
        assert all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)


def test_fp16_is_a_fallback(lora_model):
    plan = RoundPlan(1, get_trainable(lora_model), LocalTrainConfig(1.0, 0, 0.01, 8, precision="fp16"))
    assert "fp16" in parallel_support(lora_model, plan, CPU)


def test_bf16_parallel_trains_and_keeps_float32(lora_model, client_data):
    params = perturbed(get_trainable(lora_model))
    plan = RoundPlan(1, params, LocalTrainConfig(1.0, 0, 0.01, 8, precision="bf16"), ProxTerm(mu=0.1))
    par = parallel(lora_model, client_data, plan)
    seq = sequential(lora_model, client_data, plan)
    for cid, u in par.items():
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in u.delta.values())
        # bf16 rounding differs between the two paths; the updates still point the same way
        dot = sum(float((u.delta[k] * seq[cid].delta[k]).sum()) for k in u.delta)
        cos = dot / (tensors.norm(u.delta) * tensors.norm(seq[cid].delta))
        assert cos > 0.9


def test_simulation_config_validation():
    assert Experiment().simulation.parallel_clients == 1
    assert Experiment.from_overrides(["simulation.parallel_clients=16"]).simulation.parallel_clients == 16
    with pytest.raises(ConfigError, match="parallel_clients must be >= 1"):
        Experiment.from_overrides(["simulation.parallel_clients=0"])
    with pytest.raises(ConfigError, match="simulation.parallel_clients"):
        Experiment.from_overrides(["simulation.parallel_clients=2.5"])
    with pytest.raises(ConfigError, match="unknown key"):
        Experiment.from_overrides(["simulation.processes=2"])
    e = Experiment.from_overrides(["data.pad_to_max_length=true", "train.length_bucketing=true"])
    assert e.data.pad_to_max_length and e.train.length_bucketing
    with pytest.raises(ConfigError, match="train.length_bucketing"):
        Experiment.from_overrides(["train.length_bucketing=1"])


def test_experiment_with_parallel_clients_matches_sequential(tiny_experiment):
    from fedtune.experiment import run_experiment

    seq = run_experiment(tiny_experiment("federation.rounds=1", "train.epochs=2"), quiet=True)
    par = run_experiment(tiny_experiment("federation.rounds=1", "train.epochs=2", "simulation.parallel_clients=3",
                                         'output_dir="' + str(seq.output_dir) + '_par"'), quiet=True)
    assert par.history[-1]["train_loss"] == pytest.approx(seq.history[-1]["train_loss"], rel=1e-4)
    assert par.final_metrics["accuracy"] == pytest.approx(seq.final_metrics["accuracy"], abs=0.02)


def test_bf16_sequential_keeps_float32_master_weights(lora_model, client_data):
    """bf16 autocasts the matmuls only: parameters, optimizer, deltas (and so aggregation) stay float32."""
    params = perturbed(get_trainable(lora_model))
    data = client_data["c2"]
    runs = {}
    for precision in ("fp32", "bf16"):
        plan = RoundPlan(1, params, LocalTrainConfig(3.0, 0, 0.01, 8, precision=precision))
        runs[precision] = local_train(lora_model, data, plan, "c2", pad_id=0, seed=3, device=CPU)
        assert all(p.dtype == torch.float32 for p in lora_model.parameters())
        assert all(v.dtype == torch.float32 for v in runs[precision].delta.values())
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert bf16.metrics["train_loss"] == pytest.approx(fp32.metrics["train_loss"], rel=0.05)
    rel = tensors.norm(tensors.sub(bf16.delta, fp32.delta)) / tensors.norm(fp32.delta)
    assert 0 < rel < 0.2  # bf16 rounding changes the update a little, not its direction


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama (hidden 32) from a config, with LoRA on q/v: the causal-LM path of the batched trainer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedtune.models import apply_finetuning_mode

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)
    return apply_finetuning_mode(LlamaForCausalLM(cfg), ModelConfig(name="tiny-llama", mode="lora"),
                                 task_type="CAUSAL_LM")


def make_lm_data(n: int, seed: int) -> EncodedDataset:
    """Prompt tokens (no loss) then response tokens, mixed lengths."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        p, r = torch.randint(2, 8, (2,), generator=g).tolist()
        row = [1] + torch.randint(3, 40, (p + r,), generator=g).tolist()
        ids.append(row)
        labels.append([-100] * (p + 1) + row[p + 1:])
    return EncodedDataset(ids, None, torch.zeros(n, dtype=torch.long), token_labels=labels)


def test_parallel_equals_sequential_causal_lm(tiny_llama):
    data = {cid: make_lm_data(n, seed=i) for i, (cid, n) in enumerate(CLIENT_SIZES.items())}
    params = perturbed(get_trainable(tiny_llama))
    local = LocalTrainConfig(epochs=1.5, max_steps=0, lr=0.01, batch_size=4, grad_clip=0.5)
    plan = RoundPlan(2, params, local, ProxTerm(mu=0.3))
    assert_same_updates(sequential(tiny_llama, data, plan), parallel(tiny_llama, data, plan))
    assert parallel_support(tiny_llama, plan, CPU) == ""
