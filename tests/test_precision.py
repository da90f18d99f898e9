"""train.precision = "auto": detection of native bf16, the choice a run logs and pins, resume and sweeps."""

from __future__ import annotations

import logging

import pytest
import torch

from fedtune import precision
from fedtune.config import ConfigError, Experiment
from fedtune.experiment import run_experiment
from fedtune.precision import native_bf16, resolve_precision

CPU = torch.device("cpu")


def test_default_experiment_asks_for_auto():
    assert Experiment().train.precision == "auto"


def test_environment_override_and_its_bad_values(monkeypatch):
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "1")
    assert native_bf16(CPU) == (True, "FEDTUNE_NATIVE_BF16=1")
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "0")
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"  # an explicit choice is never changed
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="FEDTUNE_NATIVE_BF16 = 'yes'"):
        resolve_precision("auto", CPU)


def test_cpu_detection_follows_torch_probes_then_cpuinfo(monkeypatch):
    monkeypatch.delenv(precision.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert native_bf16(CPU) == (True, "CPU with AVX-512 BF16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert native_bf16(CPU) == (False, "CPU without AVX-512 BF16 or AMX")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", None, raising=False)  # an older torch
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert native_bf16(CPU) == (True, "CPU with AMX")
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2"})
    assert native_bf16(CPU)[0] is False


def test_autocast_under_auto_is_what_auto_resolves_to(monkeypatch):
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "1")
    with precision.autocast("auto", CPU):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "0")
    with precision.autocast("auto", CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_run_pins_the_choice_in_its_log_config_and_resume(tiny_experiment, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "1")
    exp = tiny_experiment("federation.rounds=1", "train.epochs=1", f'output_dir="{tmp_path / "r"}"')
    with caplog.at_level(logging.INFO, logger="fedtune"):
        result = run_experiment(exp, quiet=True)
    assert "train.precision = 'auto' -> 'bf16' (FEDTUNE_NATIVE_BF16=1)" in caplog.text
    saved = Experiment.from_toml(result.output_dir / "config.toml")
    assert saved.train.precision == "bf16"
    # Resumed on a machine without bf16 units, "auto" keeps the checkpoint's bf16 (its rounds were trained in it).
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "0")
    caplog.clear()
    more = tiny_experiment("federation.rounds=2", "train.epochs=1", f'output_dir="{tmp_path / "r"}"')
    with caplog.at_level(logging.INFO, logger="fedtune"):
        run_experiment(more, quiet=True, resume=True)
    assert "train.precision = 'auto' -> 'bf16' (the checkpoint's precision)" in caplog.text
    assert Experiment.from_toml(result.output_dir / "config.toml").train.precision == "bf16"


def test_bf16_run_learns_and_scores_under_inference_mode(tiny_experiment, tmp_path, monkeypatch):
    monkeypatch.setenv(precision.NATIVE_BF16_ENV, "1")
    result = run_experiment(tiny_experiment(f'output_dir="{tmp_path / "b"}"'), quiet=True)
    fp32 = run_experiment(tiny_experiment(f'output_dir="{tmp_path / "f"}"', "train.precision=\"fp32\""), quiet=True)
    assert result.final_metrics["accuracy"] > 0.6  # the tiny task is learnable in bf16 too
    assert result.final_metrics["loss"] != fp32.final_metrics["loss"]  # and bf16 did run
