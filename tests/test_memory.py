"""fedtune.memory: the allocator bound, peak measurement, and gradient checkpointing in the client runtime."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fedtune import memory

linux = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")


def _in_child(code: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "FEDTUNE_ALLOCATOR")} | env
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True,
                          check=True).stdout.strip()



@linux
def test_allocator_bound_is_opt_in_and_respects_glibcs_own_setting():
    code = "from fedtune import memory; print(memory.configure_allocator(), memory.configure_allocator())"
    assert _in_child(code) == "False False"  # the default: glibc as it is
    assert _in_child(code, FEDTUNE_ALLOCATOR="default") == "False False"
    assert _in_child(code, FEDTUNE_ALLOCATOR="bounded") == "True True"
    assert _in_child(code, FEDTUNE_ALLOCATOR="bounded", MALLOC_MMAP_THRESHOLD_="1048576") == "False False"
    with pytest.raises(subprocess.CalledProcessError) as err:
        _in_child(code, FEDTUNE_ALLOCATOR="tight")
    assert "FEDTUNE_ALLOCATOR='tight': expected 'bounded' or 'default'" in err.value.stderr


def test_cli_names_a_bad_allocator_setting(monkeypatch, capsys):
    from fedtune.cli import main

    monkeypatch.setenv("FEDTUNE_ALLOCATOR", "tight")
    assert main(["config"]) == 2
    assert "FEDTUNE_ALLOCATOR='tight'" in capsys.readouterr().err


@linux
def test_bounded_allocator_returns_freed_mid_size_blocks_to_the_os():
    # Free many 1 MiB blocks after one 8 MiB block was freed: glibc's adaptive threshold has then
    # risen to 8 MiB, so the 1 MiB blocks come from the heap and stay resident; bounded, they are unmapped.
    code = """
import sys
from fedtune import memory
if sys.argv[1] == "bound":
    assert memory.bound_allocator()
import torch
big = torch.ones(1 << 21); del big                     # 8 MiB, freed: raises the adaptive threshold
before = memory.rss_bytes()
blocks = [torch.ones(1 << 18) for _ in range(400)]     # 400 x 1 MiB
del blocks[::2]                                        # free every other one: no heap top to trim
print((memory.rss_bytes() - before) / 2**20)
"""
    bounded = float(subprocess.run([sys.executable, "-c", code, "bound"], capture_output=True, text=True,
                                   check=True, env={**os.environ}).stdout)
    default = float(subprocess.run([sys.executable, "-c", code, "default"], capture_output=True, text=True,
                                   check=True, env={**os.environ, "FEDTUNE_ALLOCATOR": "default"}).stdout)
    assert bounded < 260 < default, (bounded, default)  # 200 MiB live; the default keeps the freed 200 too


@linux
def test_peak_is_per_phase_after_reset():
    memory.reset_peak()
    big = torch.ones(1 << 26)  # 256 MiB
    peak_with = memory.peak_rss_bytes()
    del big
    memory.release_memory()
    assert memory.reset_peak()
    assert memory.peak_rss_bytes() < peak_with - (200 << 20)


def _tiny_bert(dropout: float):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    return BertForQuestionAnswering(cfg)


def _grads(model, checkpointing: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    model.train()
    model.zero_grad()
    torch.manual_seed(7)  # same dropout masks in both runs; checkpointing replays the RNG state
    with memory.activation_checkpointing(model, checkpointing):
        assert model.is_activation_checkpointing == checkpointing
        out = model(input_ids=ids, start_positions=torch.tensor([1, 2, 3, 4]), end_positions=torch.tensor([2, 3, 4, 5]))
        out.loss.backward()
    assert not model.is_activation_checkpointing  # off again for evaluation and the next client
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_gives_the_same_gradients_with_dropout():
    model = _tiny_bert(0.1)
    plain, ckpt = _grads(model, False), _grads(model, True)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_with_lora_trains_the_adapter():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_bert(0.0), LoraConfig(r=2, target_modules=["query", "value"]))
    plain, ckpt = _grads(model, False), _grads(model, True)
    assert any("lora_A" in n for n in ckpt) and all("lora_" in n or "qa_outputs" in n for n in ckpt)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_model_without_checkpointing_is_a_one_line_error():
    with pytest.raises(ValueError, match="Linear does not support gradient checkpointing"):
        with memory.activation_checkpointing(torch.nn.Linear(2, 2), True):
            pass


def test_local_train_with_checkpointing_matches_without(tiny_experiment):
    from fedtune.experiment import run_experiment

    plain = run_experiment(tiny_experiment('model.mode="full"', "federation.rounds=1"), quiet=True)
    ckpt = run_experiment(tiny_experiment('model.mode="full"', "federation.rounds=1",
                                          "train.gradient_checkpointing=true",
                                          f'output_dir="{plain.output_dir}-ckpt"'), quiet=True)
    assert ckpt.final_metrics == pytest.approx(plain.final_metrics, abs=1e-6)
