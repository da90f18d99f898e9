"""Flower runtime pieces that need no SuperLink: message codec, node config, errors, Ray simulation."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from conftest import REPO  # noqa: E402
from flower_processes import free_port  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedtune.channel import Channel  # noqa: E402
from fedtune.config import Experiment  # noqa: E402
from fedtune.experiment import run_experiment  # noqa: E402
from fedtune.runtime.flower import messages  # noqa: E402
from fedtune.runtime.flower.launch import app_files, check_reachable  # noqa: E402
from fedtune.runtime.flower.node import NodeConfigError, NodeData  # noqa: E402
from fedtune.strategies.fedprox import ProxTerm  # noqa: E402
from fedtune.strategies.scaffold import ControlVariate  # noqa: E402
from fedtune.types import ClientUpdate, LocalTrainConfig, RoundPlan  # noqa: E402


@pytest.mark.parametrize("objective", [None, ProxTerm(0.25), ControlVariate({"w": torch.ones(2, 3)})])
def test_train_request_round_trip(objective):
    """RoundPlan, task and objective survive encoding bit for bit; tensors keep dtype and shape."""
    plan = RoundPlan(4, {"w": torch.randn(2, 3), "i": torch.arange(5)}, LocalTrainConfig(1.5, 7, 0.01, 8), objective)
    content = messages.encode_train_request(messages.TrainRequest("client_002", plan, messages.TaskInfo(("a", "b"))))
    back = messages.decode_train_request(content)
    assert back.client_id == "client_002" and back.task.label_names == ("a", "b")
    assert back.plan.round == 4 and back.plan.local == plan.local
    assert all(torch.equal(back.plan.params[k], plan.params[k]) for k in plan.params)
    assert back.plan.params["i"].dtype == torch.int64
    if isinstance(objective, ControlVariate):
        assert torch.equal(back.plan.objective.c["w"], objective.c["w"])
    else:
        assert back.plan.objective == objective
    assert messages.encoded_size(content) > plan.params["w"].numel() * 4


def test_shared_payloads_encode_each_view_once():
    """A round's messages share one encoding per distinct tensor view; each decodes as if encoded alone."""
    from fedtune.channel import client_view
    from fedtune.strategies.lora import LoraClient

    names = ("m.q.lora_A.default.weight", "m.q.lora_B.default.weight")
    params = {names[0]: torch.randn(4, 6), names[1]: torch.randn(5, 4), "head.weight": torch.randn(2, 5)}
    plan = RoundPlan(2, params, LocalTrainConfig(1, 1, 0.1, 4),
                     adapter=LoraClient(rule="fedit", rank=4, client_ranks={"small": 2}))
    task, channel = messages.TaskInfo(("a", "b")), Channel.from_specs(down="fp16")
    shared = messages.SharedPayloads(channel.down)
    contents = {cid: messages.encode_train_request(
        messages.TrainRequest(cid, client_view(plan, cid), task, channel), shared) for cid in ("a", "b", "small")}
    rec = "fedtune.tensor.params"
    assert contents["a"][rec] is contents["b"][rec]            # the same rank-4 view: encoded once
    assert contents["small"][rec] is not contents["a"][rec]    # rank 2 is another view
    assert len(shared) == 2
    for cid, content in contents.items():
        alone = messages.encode_train_request(messages.TrainRequest(cid, client_view(plan, cid), task, channel))
        assert messages.record_payload(content, rec) == messages.record_payload(alone, rec)
        back = messages.decode_train_request(content)
        assert back.client_id == cid and back.plan.params[names[0]].shape[0] == (2 if cid == "small" else 4)
    with pytest.raises(ValueError, match="another codec"):
        messages.encode_train_request(messages.TrainRequest("a", plan, task, Channel()), shared)


def test_update_round_trip_and_schema_errors():
    """ClientUpdate (with extras) round-trips; a missing record or a foreign schema is a clear error."""
    u = ClientUpdate("client_001", {"w": torch.randn(3)}, 12, {"train_loss": 0.5}, {"scaffold_delta_c": {"w": torch.ones(3)}})
    channel = Channel()
    back = channel.decode_update(messages.decode_update(messages.encode_update(channel.encode_update(u, {}))))
    assert back.client_id == u.client_id and back.num_examples == 12 and back.metrics == {"train_loss": 0.5}
    assert torch.equal(back.delta["w"], u.delta["w"]) and torch.equal(back.extras["scaffold_delta_c"]["w"], torch.ones(3))
    content = messages.encode_update(channel.encode_update(u, {}))
    del content["fedtune.delta"]
    with pytest.raises(messages.MessageError, match="fedtune.delta"):
        messages.decode_update(content)
    content = messages.encode_update(channel.encode_update(u, {}))
    content["fedtune.update"]["schema"] = 99
    with pytest.raises(messages.MessageError, match="schema 99"):
        messages.decode_update(content)


def test_client_state_lives_in_context_state():
    """ClientState is stored as ArrayRecords in a RecordDict and read back; dropped purposes disappear."""
    from flwr.app import RecordDict

    store = RecordDict()
    messages.save_client_state({"c_i": {"w": torch.ones(2)}, "residual": {"w": torch.zeros(2)}}, store)
    assert set(messages.load_client_state(store)) == {"c_i", "residual"}
    messages.save_client_state({"c_i": {"w": torch.full((2,), 3.0)}}, store)
    state = messages.load_client_state(store)
    assert set(state) == {"c_i"} and torch.equal(state["c_i"]["w"], torch.full((2,), 3.0))


def test_node_config(tmp_path):
    """Client id and data source come from the node config; mistakes name the key."""
    manifest = tmp_path / "client_004.json"
    manifest.write_text('{"client_id": "client_004", "indices": [0, 1]}')
    assert NodeData.from_node_config({"manifest": str(manifest)}).client_id == "client_004"
    assert NodeData.from_node_config({"client-id": "a", "train-file": "x.csv"}).train_file == "x.csv"
    sim = NodeData.from_node_config({"partition-id": 1, "num-partitions": 3}, manifest_dir=tmp_path)
    assert sim.client_id == "client_001" and sim.manifest.endswith("client_001.json")
    with pytest.raises(NodeConfigError, match="client-id"):
        NodeData.from_node_config({"train-file": "x.csv"})
    with pytest.raises(NodeConfigError, match="exactly one data source"):
        NodeData.from_node_config({"client-id": "a"})
    with pytest.raises(NodeConfigError, match="unknown node-config"):
        NodeData.from_node_config({"client-id": "a", "trian-file": "x.csv"})
    assert NodeData.from_node_config({"manifest": str(manifest), "require-secagg": True}).require_secagg
    with pytest.raises(NodeConfigError, match="require-secagg: expected true or false"):
        NodeData.from_node_config({"manifest": str(manifest), "require-secagg": "yes"})
    assert NodeData.from_node_config({"manifest": str(manifest), "threads": 1}).threads == 1
    assert NodeData.from_node_config({"manifest": str(manifest)}).threads == 0  # torch's default
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(NodeConfigError, match="node-config threads: expected a whole number >= 0"):
            NodeData.from_node_config({"manifest": str(manifest), "threads": bad})


def test_unreachable_superlink_names_the_address():
    """Submitting to a SuperLink nobody runs fails fast with the address in the message."""
    port = free_port()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}", timeout=2)
    exp = Experiment.from_overrides(['runtime.mode="flower"', f'runtime.superlink="127.0.0.1:{port}"'])
    with pytest.raises(ConnectionError, match="runtime.superlink"):
        run_experiment(exp, quiet=True)


def test_shipped_app_folder_is_current():
    """flower_app/ (the README walk-through's app) is what write_app generates."""
    folder = REPO / "flower_app"
    for name, text in app_files().items():
        assert (folder / name).read_text() == text, f"flower_app/{name} is stale; regenerate with write_app"


def test_flower_simulation_matches_simulation(tiny_experiment, tmp_path):
    """runtime.mode = "flower-simulation" (Ray) gives the in-process simulation's global model."""
    pytest.importorskip("ray")
    base = ["partition.num_clients=2", "federation.rounds=2", "train.epochs=2"]
    sim = run_experiment(tiny_experiment(*base, f'output_dir="{tmp_path / "sim"}"'), quiet=True)
    ray = run_experiment(tiny_experiment(*base, f'output_dir="{tmp_path / "ray"}"', 'runtime.mode="flower-simulation"',
                                         "runtime.cpus_per_client=1"), quiet=True)
    a = load_file(sim.output_dir / "model" / "adapter_model.safetensors")
    b = load_file(ray.output_dir / "model" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert [r["clients"] for r in ray.history] == [2, 2]


def test_node_config_attack(tmp_path):
    """A node can make itself byzantine; without `attack` it follows the experiment's [attack]."""
    from fedtune.attacks import Attack

    manifest = tmp_path / "client_001.json"
    manifest.write_text('{"client_id": "client_001", "indices": [0, 1]}')
    node = NodeData.from_node_config({"manifest": str(manifest), "attack": "sign_flip", "attack-scale": 4})
    assert node.attack == Attack("sign_flip", 4.0, 1.0)
    clean = Experiment.from_overrides(["partition.num_clients=2"])
    assert node.attack_in(clean) == node.attack  # its own, whatever the server says
    honest = NodeData.from_node_config({"manifest": str(manifest)})
    assert honest.attack_in(clean) is None
    listed = Experiment.from_overrides(["partition.num_clients=2", 'attack.kind="scale"', "attack.scale=3",
                                        'attack.clients=["client_001"]'])
    assert honest.attack_in(listed) == Attack("scale", 3.0, 1.0)
    for raw, message in (({"attack": "explode"}, "node-config attack: unknown attack 'explode'"),
                         ({"attack-scale": 2}, "attack-scale needs attack=<kind>"),
                         ({"attack": "noise", "attack-noise-std": "big"}, "attack-noise-std: expected a number"),
                         ({"attack": "noise", "attack-noise-std": -1}, "attack-noise-std must be >= 0")):
        with pytest.raises(NodeConfigError, match=message):
            NodeData.from_node_config({"manifest": str(manifest), **raw})


def test_nodes_draw_the_simulations_attackers():
    """With attack.fraction, each node decides alone and the nodes together pick the simulation's attackers."""
    from fedtune.attacks import experiment_attacker, malicious_clients
    from fedtune.partition import client_ids

    exp = Experiment.from_overrides(["partition.num_clients=10", 'attack.kind="sign_flip"', "attack.fraction=0.3"])
    ids = client_ids(10)
    by_nodes = [c for c in ids if experiment_attacker(exp.attack, c, 10, exp.seed) is not None]
    assert by_nodes == malicious_clients(ids, 0.3, [], exp.seed) and len(by_nodes) == 3


def test_label_flip_node_trains_on_flipped_labels(tiny_experiment, tmp_path):
    """A node with attack = label_flip poisons its own training rows (held-out rows stay clean)."""
    from fedtune.models import load_tokenizer
    from fedtune.runtime.flower.client_app import _resident
    from fedtune.shards import make_shards
    from fedtune.tasks.registry import build_task

    exp = tiny_experiment("partition.num_clients=2")
    task = build_task(exp, load_tokenizer(exp.model.name))
    make_shards(exp, task.units, task.name, tmp_path)
    manifest = next((tmp_path / "partition").glob("client_000.json"))
    info = messages.TaskInfo(tuple(task.units.label_names))
    honest = _resident(exp, NodeData.from_node_config({"manifest": str(manifest)}), info, torch.device("cpu"))
    labels = honest.rows.labels.clone()
    flipped = _resident(exp, NodeData.from_node_config({"manifest": str(manifest), "attack": "label_flip"}), info,
                        torch.device("cpu"))
    assert torch.equal(flipped.rows.labels, len(info.label_names) - 1 - labels)
    assert not torch.equal(flipped.rows.labels, labels)
