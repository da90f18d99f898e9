"""Checkpoint every round and resume a killed run: bit-for-bit the uninterrupted run."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from equivalence import Killed, kill_and_resume, kill_at, metric_lines, untimed
from safetensors.torch import load_file

from fedtune import checkpoint
from fedtune.checkpoint import Checkpoint, CheckpointError, read_checkpoint, write_checkpoint
from fedtune.cli import main
from fedtune.config import ConfigError
from fedtune.experiment import run_experiment
from fedtune.types import ServerState

STATEFUL = {
    "fedavg": [],
    "fedadam": ["strategy.name=fedadam", "strategy.server_lr=0.05"],
    "scaffold_topk_ef": ["strategy.name=scaffold", 'federation.codec_up="topk:0.2+int8"', "partition.num_clients=4",
                         "federation.clients_per_round=3"],
    "lora_fedex": ["model.lora.aggregation=fedex"],  # base corrections in the buffers
    "lora_fedsa_ranks": ["model.lora.aggregation=fedsa", "model.lora.client_ranks=[1, 4]",
                         "federation.clients_per_round=2"],  # personal B in the client states
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_killed_run_resumes_bit_for_bit(tiny_experiment, tmp_path, monkeypatch, name):
    sets = ["federation.rounds=3", "eval.every=1", *STATEFUL[name]]
    straight, killed_dir, sa = kill_and_resume(tiny_experiment, tmp_path, monkeypatch, sets)
    if name not in ("fedavg", "lora_fedsa_ranks"):
        assert any(k[0] == "buffer" for k in sa)  # the strategy's own state went through the checkpoint
    if name == "lora_fedsa_ranks":
        assert any(k[0] == "client" and k[2] == "personal" and ".lora_B." in k[3] for k in sa)
    if name == "scaffold_topk_ef":
        purposes = {k[2] for k in sa if k[0] == "client"}
        assert {"scaffold_c", "codec_residual", "codec_residual:scaffold_delta_c"} <= purposes
    resumed = metric_lines(killed_dir)
    assert resumed[2]["wall_time"] >= resumed[1]["wall_time"]  # the clock continues too
    summary = json.loads((killed_dir / "summary.json").read_text())
    assert summary["bytes_up_total"] == straight.summary["bytes_up_total"]


def test_resume_can_extend_the_number_of_rounds(tiny_experiment, tmp_path):
    sets = ["eval.every=1", "strategy.name=fedavgm"]
    straight = run_experiment(tiny_experiment(*sets, "federation.rounds=3", f'output_dir="{tmp_path / "a"}"'),
                              quiet=True)
    short = run_experiment(tiny_experiment(*sets, "federation.rounds=2", f'output_dir="{tmp_path / "b"}"'), quiet=True)
    assert main(["run", "--resume", str(short.output_dir), "--set", "federation.rounds=3", "--quiet"]) == 0
    a = load_file(straight.output_dir / "model" / "adapter_model.safetensors")
    b = load_file(short.output_dir / "model" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert untimed(metric_lines(short.output_dir)) == untimed(metric_lines(straight.output_dir))
    # summary.json's wall time is the whole run's (rounds 1-2 in the first process, 3 in the second)
    wall = json.loads((short.output_dir / "summary.json").read_text())["wall_time"]
    assert wall >= metric_lines(short.output_dir)[-1]["wall_time"] > metric_lines(short.output_dir)[1]["wall_time"]


def test_resume_refuses_a_different_config(tiny_experiment, tmp_path, capsys):
    res = run_experiment(tiny_experiment("federation.rounds=1", f'output_dir="{tmp_path / "r"}"'), quiet=True)
    code = main(["run", "--resume", str(res.output_dir), "--set", "train.lr=0.5", "--set", "partition.num_clients=4"])
    err = capsys.readouterr().err
    assert code == 2 and "partition.num_clients" in err and "train.lr" in err and "checkpoint 0.02, now 0.5" in err
    assert "federation.codec_up" not in err  # only the keys that differ are named
    with pytest.raises(ConfigError, match="round 1, beyond federation.rounds = 0"):
        checkpoint.check_config(read_checkpoint(res.output_dir), _with_rounds(tiny_experiment, res.output_dir, 0))
    index = res.output_dir / "checkpoint" / "checkpoint.json"
    data = json.loads(index.read_text())
    del data["config"]["federation"]["error_feedback"]  # a checkpoint from before a key existed: its default
    index.write_text(json.dumps(data))
    checkpoint.check_config(read_checkpoint(res.output_dir),
                            tiny_experiment("federation.rounds=1", f'output_dir="{res.output_dir}"'))  # no error
    data["config"]["federation"]["codec_up"] = "int8"
    index.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"federation\.codec_up: checkpoint 'int8', now 'none'"):
        checkpoint.resume_experiment(res.output_dir, overrides=['federation.codec_up="none"'])


def _with_rounds(tiny_experiment, out, rounds):
    """The tiny experiment writing to ``out`` with federation.rounds bypassing validation (to test the check)."""
    exp = tiny_experiment("federation.rounds=1", f'output_dir="{out}"')
    exp.federation.rounds = rounds
    return exp


def test_resume_errors_are_clear(tiny_experiment, tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path / "nothing"), "--quiet"]) == 1
    assert "no checkpoint in" in capsys.readouterr().err
    res = run_experiment(tiny_experiment("federation.rounds=1", f'output_dir="{tmp_path / "r"}"'), quiet=True)
    with pytest.raises(ConfigError, match=r"differs from the checkpointed one in runtime\.mode"):
        run_experiment(tiny_experiment("federation.rounds=1", f'output_dir="{res.output_dir}"',
                                       'runtime.mode="flower"'), resume=True)
    with pytest.raises(ConfigError, match="local baseline"):
        run_experiment(tiny_experiment("mode=local", f'output_dir="{res.output_dir}"'), resume=True)
    index = res.output_dir / "checkpoint" / "checkpoint.json"
    tensor_file = res.output_dir / "checkpoint" / json.loads(index.read_text())["tensors"]
    data = tensor_file.read_bytes()
    tensor_file.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one flipped byte
    with pytest.raises(CheckpointError, match="SHA-256"):
        read_checkpoint(res.output_dir)


def test_run_killed_in_round_1_says_how_to_start_again(tiny_experiment, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    with monkeypatch.context() as m:
        kill_at(m, 1)
        with pytest.raises(Killed):
            run_experiment(tiny_experiment(f'output_dir="{out}"'), quiet=True)
    assert main(["run", "--resume", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    hint = f"`fedtune run {out / 'config.toml'} --overwrite`"
    assert err == (f"fedtune: error: {out} holds a run stopped before it finished round 1 (no checkpoint yet, "
                   f"nothing to continue): start it again with {hint}")
    assert main(["run", str(out / "config.toml"), "--overwrite", "--quiet"]) == 0  # the hint works as written
    assert [r["round"] for r in metric_lines(out)] == [1, 2]


def test_checkpoint_round_trip_keeps_everything(tmp_path):
    state = ServerState(
        round=7,
        params={"w": torch.randn(3, 4), "h": torch.randn(2).to(torch.bfloat16)},
        buffers={"m": {"w": torch.randn(3, 4), "h": torch.zeros(2)}, "empty": {}},
    )
    clients = {"client/odd id": {"scaffold_c": {"w": torch.ones(3, 4)}, "codec_residual": {"w": torch.randn(3, 4)}},
               "c2": {}}
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    rng = checkpoint.capture_rng()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    write_checkpoint(tmp_path, Checkpoint(state, {"seed": 1}, clients, rng, wall_time=12.5))
    write_checkpoint(tmp_path, Checkpoint(ServerState(8, state.params, state.buffers), {"seed": 1}, clients, rng, 13.0))
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["checkpoint.json", "round_0008.safetensors"]
    back = read_checkpoint(tmp_path)
    assert back.round == 8 and back.wall_time == 13.0 and back.config == {"seed": 1}
    assert all(torch.equal(back.state.params[k], v) and back.state.params[k].dtype == v.dtype
               for k, v in state.params.items())
    assert back.state.buffers.keys() == {"m", "empty"} and back.state.buffers["empty"] == {}
    assert torch.equal(back.state.buffers["m"]["w"], state.buffers["m"]["w"])
    assert back.client_states.keys() == clients.keys() and back.client_states["c2"] == {}
    assert torch.equal(back.client_states["client/odd id"]["codec_residual"]["w"],
                       clients["client/odd id"]["codec_residual"]["w"])
    random.random(), np.random.rand(), torch.rand(3)  # move every RNG on
    back.restore_rng()
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    with pytest.raises(CheckpointError, match="buffers"):
        back.check_layout(ServerState(0, {k: v.clone() for k, v in state.params.items()}, {}))
    with pytest.raises(CheckpointError, match="do not fit"):
        back.check_layout(ServerState(0, {"w": torch.zeros(4, 3), "h": torch.zeros(2).to(torch.bfloat16)},
                                      state.buffers))


def test_config_differences_lists_nested_keys():
    a = {"train": {"lr": 0.1, "epochs": 1}, "federation": {"rounds": 3}, "output_dir": "x", "name": "n"}
    b = {"train": {"lr": 0.2, "epochs": 1}, "federation": {"rounds": 5}, "output_dir": "y", "name": "n", "new": 1}
    assert checkpoint.config_differences(a, b) == ["new", "train.lr"]


def test_resume_refuses_changed_training_data_before_touching_the_partition(tiny_experiment, tmp_path, tiny_csv):
    """The checkpoint keeps a fingerprint of what the clients trained on; changed rows are refused by name."""
    train, evalf = tiny_csv
    copy = tmp_path / "train.csv"
    copy.write_text(train.read_text())
    exp = tiny_experiment("federation.rounds=1", f'data.train_file="{copy}"', f'output_dir="{tmp_path / "r"}"')
    res = run_experiment(exp, quiet=True)
    manifests = {p.name: p.read_bytes() for p in (res.output_dir / "partition").iterdir()}
    lines = copy.read_text().splitlines()
    text, label = lines[1].rsplit(",", 1)
    lines[1] = f"{text} extra,{label}"  # one row's text edited
    copy.write_text("\n".join(lines) + "\n")
    code = main(["run", "--resume", str(res.output_dir), "--set", "federation.rounds=2", "--quiet"])
    assert code == 1
    assert {p.name: p.read_bytes() for p in (res.output_dir / "partition").iterdir()} == manifests
    copy.write_text(train.read_text())  # the data back as it was: the resume goes through
    assert main(["run", "--resume", str(res.output_dir), "--set", "federation.rounds=2", "--quiet"]) == 0


def test_changed_data_message(tiny_experiment, tmp_path, tiny_csv, capsys):
    train, _ = tiny_csv
    copy = tmp_path / "train.csv"
    copy.write_text(train.read_text())
    res = run_experiment(tiny_experiment("federation.rounds=1", f'data.train_file="{copy}"',
                                         f'output_dir="{tmp_path / "r"}"'), quiet=True)
    lines = copy.read_text().splitlines()
    copy.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # one row fewer
    assert main(["run", "--resume", str(res.output_dir), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "the training data or its partition changed since the checkpoint of round 1" in err
