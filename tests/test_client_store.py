"""The clients' state store: bounded cache, files written once per generation, commit / collect / restore."""

from __future__ import annotations

import pytest
import torch
from equivalence import all_state_tensors, kill_and_resume
from safetensors.torch import load_file

from fedtune.checkpoint import CheckpointError, read_checkpoint
from fedtune.client_store import STORE_DIR, ClientStateStore
from fedtune.config import ConfigError, Experiment
from fedtune.experiment import run_experiment


def _state(value: float) -> dict:
    return {"scaffold_c": {"w": torch.full((2, 3), value)}, "codec_residual": {"w": torch.full((3,), -value)}}


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_cache_is_bounded_and_states_come_back_from_disk(tmp_path):
    store = ClientStateStore(tmp_path / "s", cache_size=2)
    for i in range(5):
        store[f"c{i}"] = _state(i)
    assert store.in_memory == 2 and len(store) == 5 and store.writes == 3
    assert torch.equal(store["c0"]["scaffold_c"]["w"], torch.full((2, 3), 0.0)) and store.reads == 1
    assert store.in_memory == 2  # reading c0 pushed another one out


def test_in_place_changes_survive_eviction(tmp_path):
    store = ClientStateStore(tmp_path / "s", cache_size=1)
    state = store.setdefault("a", {})
    state["scaffold_c"] = {"w": torch.ones(2)}  # what a trainer does with the state it was handed
    store.setdefault("b", {})  # evicts a
    store["a"]["scaffold_c"]["w"] += 1
    store.setdefault("b", {})  # evicts a again, changed (b, empty, reads as absent)
    assert torch.equal(store["a"]["scaffold_c"]["w"], torch.full((2,), 2.0))


def test_empty_states_write_no_file(tmp_path):
    store = ClientStateStore(tmp_path / "s", cache_size=1)
    for i in range(10):
        store.setdefault(f"c{i}", {})  # FedAvg's clients: nothing to keep
    assert store.commit() == {} and _files(tmp_path / "s") == [] and store.writes == 0


def test_files_are_never_overwritten_until_the_next_commit(tmp_path):
    folder = tmp_path / "s"
    store = ClientStateStore(folder, cache_size=1)
    store["x/odd id"] = _state(1)
    store["y"] = _state(2)
    index = store.commit()
    store.collect(index)  # the checkpoint names these now
    committed = _files(folder)
    assert len(committed) == 2 and all(n.endswith(".safetensors") for n in committed)
    store["x/odd id"]["scaffold_c"]["w"] += 10  # the next round changes x ...
    store["y"]  # ... and x leaves the cache: a new generation, the committed file kept
    assert set(committed) < set(_files(folder))
    # a kill now: a fresh store restored from the checkpoint's index sees the committed state
    back = ClientStateStore(folder, cache_size=1)
    back.restore(index)
    assert torch.equal(back["x/odd id"]["scaffold_c"]["w"], torch.full((2, 3), 1.0))
    assert _files(folder) == committed  # the unfinished round's file was removed
    # the resumed run's next commit supersedes the old generation, and collect deletes it
    back["x/odd id"]["scaffold_c"]["w"] += 10
    index2 = back.commit()
    back.collect(index2)
    assert index2["x/odd id"] > index["x/odd id"] and index2["y"] == index["y"] and len(_files(folder)) == 2
    newest = folder / [n for n in _files(folder) if n.startswith("x")][0]
    assert torch.equal(load_file(newest)['["scaffold_c", "w"]'], torch.full((2, 3), 11.0))


def test_missing_or_damaged_files_are_named(tmp_path):
    folder = tmp_path / "s"
    store = ClientStateStore(folder, cache_size=1)
    store["a"], store["b"] = _state(1), _state(2)
    index = store.commit()
    (folder / _files(folder)[0]).unlink()
    with pytest.raises(CheckpointError, match="client 'a'.*missing"):
        ClientStateStore(folder).restore(index)
    (folder / _files(folder)[0]).write_bytes(b"not safetensors")
    fresh = ClientStateStore(folder)
    fresh._on_disk = {"b": index["b"]}  # (as restored, the file damaged afterwards)
    with pytest.raises(CheckpointError, match="client 'b'.*cannot be read"):
        fresh["b"]


def test_state_cache_below_parallel_clients_is_refused():
    with pytest.raises(ConfigError, match="simulation.state_cache = 2 must be >= simulation.parallel_clients = 4"):
        Experiment.from_overrides(["simulation.parallel_clients=4", "simulation.state_cache=2"])


SCAFFOLD = ["strategy.name=scaffold", 'federation.codec_up="topk:0.2+int8"', "partition.num_clients=4",
            "federation.clients_per_round=3", "federation.rounds=3", "eval.every=1"]


def test_scaffold_run_is_the_same_with_a_cache_of_one(tiny_experiment, tmp_path):
    big = run_experiment(tiny_experiment(*SCAFFOLD, "simulation.state_cache=1000", f'output_dir="{tmp_path / "a"}"'),
                         quiet=True)
    one = run_experiment(tiny_experiment(*SCAFFOLD, "simulation.state_cache=1", f'output_dir="{tmp_path / "b"}"'),
                         quiet=True)
    sa, sb = all_state_tensors(big.output_dir), all_state_tensors(one.output_dir)
    assert any(k[0] == "client" for k in sa) and sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert big.final_metrics == one.final_metrics
    ckpt = read_checkpoint(one.output_dir)
    trained = {k[1] for k in sb if k[0] == "client"}
    assert ckpt.client_states == {} and set(ckpt.client_store) == trained  # every client's state is a file
    assert len(_files(one.output_dir / STORE_DIR)) == len(trained)  # one generation each: older ones collected


def test_killed_run_with_evicted_states_resumes_bit_for_bit(tiny_experiment, tmp_path, monkeypatch):
    kill_and_resume(tiny_experiment, tmp_path, monkeypatch, [*SCAFFOLD, "simulation.state_cache=1"])


def test_resume_may_change_the_cache(tiny_experiment, tmp_path):
    from fedtune.cli import main

    exp = tiny_experiment(*SCAFFOLD, "simulation.state_cache=1", "federation.rounds=2", f'output_dir="{tmp_path / "r"}"')
    run_experiment(exp, quiet=True)
    assert main(["run", "--resume", str(exp.resolved_output_dir), "--set", "federation.rounds=3",
                 "--set", "simulation.state_cache=64", "--quiet"]) == 0
    assert read_checkpoint(exp.resolved_output_dir).round == 3
