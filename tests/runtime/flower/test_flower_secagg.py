"""SecAgg+ (``runtime.secagg``) on real Flower processes: the masked aggregate is the plain one, up to quantization.

A SuperLink and three SuperNodes on localhost run one FedAvg round with Flower's SecAgg+ protocol
(``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the clients). The global adapter must
equal the in-process simulation's within the protocol's quantization error; the server only ever
gets one (masked, summed) update. A node killed after sending its masked vector's key shares
(stage 2) drops out: the others' mean is still unmasked (slow test).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flower_processes import LABELS, federation, flower_experiment, write_manifests  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedtune.config import ConfigError  # noqa: E402
from fedtune.config.checks import check_experiment  # noqa: E402
from fedtune.experiment import run_experiment  # noqa: E402

CLIP, LEVELS, MAX_WEIGHT = 8.0, 2**22, 100.0


def test_node_requiring_secagg_refuses_plain_rounds(tiny_experiment, tiny_csv, monkeypatch):
    """A node started with require-secagg=true raises instead of training on a plain train request."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.runtime.flower import messages
    from fedtune.runtime.flower.client_app import make_client_app
    from fedtune.runtime.flower.experiment_source import fixed
    from fedtune.types import LocalTrainConfig, RoundPlan

    exp = tiny_experiment(f"data.label_names={LABELS}", 'runtime.mode="flower"')
    app = make_client_app(fixed(exp))
    plan = RoundPlan(1, {"w": torch.zeros(2)}, LocalTrainConfig(1.0, 0, 0.1, 4))
    task = messages.TaskInfo(("money", "sports", "tech"))
    content = messages.encode_train_request(messages.TrainRequest("site", plan, task))
    node_config = {"client-id": "site", "train-file": str(tiny_csv[0]), "require-secagg": True}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a ClientApp process started by a SuperNode has
    monkeypatch.setattr(TaskIdentity, "_node_id", 7)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    with pytest.raises(PermissionError, match="require-secagg"):
        app(Message(content, dst_node_id=7, message_type=messages.TRAIN), context)


def _bound(sizes: list[int]) -> float:
    """Max |SecAgg+ mean - exact mean| for clients of ``sizes`` examples.

    Each client's delta * n_i / max_weight is shifted by CLIP and stochastically rounded (in float32) to a
    grid of step 2*CLIP/LEVELS: error < one step + one float32 ulp at 2*CLIP per client. The server divides
    the sum by sum_i n_i / max_weight. Plus 1e-6 for float32 training noise (the runtimes agree to 1e-6).
    """
    per_client = 2 * CLIP / LEVELS + float(np.spacing(np.float32(2 * CLIP)))
    return len(sizes) * per_client / (sum(sizes) / MAX_WEIGHT) + 1e-6


def test_secagg_needs_a_weighted_mean(tiny_experiment):
    """Rules that need each client's update (robust, adaptive, DP, lossy uplink) are refused by name."""
    flower = ['runtime.mode="flower"', "runtime.secagg=true"]
    check_experiment(tiny_experiment(*flower, 'strategy.name="fedprox"', "strategy.mu=0.1"))
    for extra, name in ((['strategy.name="median"'], "strategy.name = 'median'"),
                        (['strategy.name="fedadam"'], "strategy.name = 'fedadam'"),
                        (["privacy.enabled=true"], "privacy.enabled"),
                        (['federation.codec_up="int8"'], "federation.codec_up"),
                        (["federation.clients_per_round=1"], "fewer than 2 clients per round")):
        with pytest.raises(ConfigError, match=f"runtime.secagg.*{name}"):
            check_experiment(tiny_experiment(*flower, *extra))
    with pytest.raises(ConfigError, match="runtime.mode"):
        tiny_experiment("runtime.secagg=true")


@pytest.mark.slow
def test_secagg_aggregate_equals_plain_mean(tiny_experiment, tmp_path, capfd):
    """3 SuperNodes, 1 round: SecAgg+'s global model = the simulation's within the quantization bound."""
    def exp(out, *extra):
        return flower_experiment(tiny_experiment, out, 3, 1, *extra)

    sim = run_experiment(exp(tmp_path / "sim"), quiet=True)
    manifests = tmp_path / "manifests"
    shutil.copytree(sim.output_dir / "partition", manifests)
    sizes = [len(json.loads((manifests / f"client_{i:03d}.json").read_text())["indices"]) for i in range(3)]
    with federation(tmp_path / "flower") as fed:
        fed.start_superlink()
        for i in range(3):  # the nodes' own guard: no plain train requests
            fed.start_supernode(f"node{i}", f'manifest="{manifests / f"client_{i:03d}.json"}" require-secagg=true')
        secure = exp(tmp_path / "secagg", 'runtime.mode="flower"', f'runtime.superlink="{fed.address}"',
                     "runtime.insecure=true", "runtime.connect_timeout=90", "runtime.round_timeout=120",
                     "runtime.secagg=true", "runtime.secagg_num_shares=3", "runtime.secagg_reconstruction_threshold=2",
                     f"runtime.secagg_clipping_range={CLIP}", f"runtime.secagg_quantization_range={LEVELS}",
                     f"runtime.secagg_max_weight={MAX_WEIGHT}")
        try:
            result = run_experiment(secure, quiet=True)
            # The same run again: the stochastic rounding is seeded from the experiment's seed, so it reproduces.
            again = run_experiment(dataclasses.replace(secure, output_dir=str(tmp_path / "secagg-again")), quiet=True)
        except Exception as exc:
            raise AssertionError(f"SecAgg+ run failed: {exc}\n{fed.tail()}") from exc
    log = capfd.readouterr().out
    assert "Secure aggregation completed" in log, log[-3000:]
    assert "SecAgg+ aggregated 3 clients (client_000, client_001, client_002)" in log, log[-3000:]
    assert "strategy sampled 3 clients (out of 3)" in log, log[-3000:]
    (record,) = result.history
    assert record["clients"] == 3 and record["clients_aggregated"] == 1  # one masked sum, never 3 updates
    assert record["bytes_up"] > 0 and record["train_loss"] == pytest.approx(sim.history[0]["train_loss"], rel=1e-5)

    bound = _bound(sizes)
    a = load_file(sim.output_dir / "model" / "adapter_model.safetensors")
    b = load_file(result.output_dir / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= bound, f"max |secagg - plain| = {diff:.3e} > bound {bound:.3e}"
    c = load_file(again.output_dir / "model" / "adapter_model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b), "two identical SecAgg+ runs gave different models"


@pytest.mark.slow
def test_secagg_survives_a_dropout(tiny_experiment, tmp_path, capfd):
    """A node killed in stage 2 (while training) leaves; the 2 others' mean = a 2-client simulation's."""
    def exp(out, n, *extra):
        return flower_experiment(tiny_experiment, out, n, 1, *extra)

    manifests = write_manifests(exp(tmp_path / "x", 3), tmp_path / "shards")
    survivors = tmp_path / "survivors"  # the same shards minus client_002, for the reference run
    survivors.mkdir()
    summary = json.loads((manifests[0].parent / "summary.json").read_text())
    summary.update(num_clients=2, sizes=summary["sizes"][:2])
    summary["label_histograms"].pop("client_002")
    (survivors / "summary.json").write_text(json.dumps(summary))
    for m in manifests[:2]:
        shutil.copy(m, survivors / m.name)
    plain = run_experiment(exp(tmp_path / "plain", 2, f'partition.manifest_dir="{survivors}"'), quiet=True)
    with federation(tmp_path / "flower") as fed:
        fed.start_superlink()
        nodes = [fed.start_supernode(f"node{i}", f'manifest="{manifests[i]}"') for i in range(3)]
        secure = exp(tmp_path / "secagg", 3, 'runtime.mode="flower"', f'runtime.superlink="{fed.address}"',
                     "runtime.insecure=true", "runtime.connect_timeout=90", "runtime.round_timeout=20",
                     "runtime.min_clients=2", "runtime.secagg=true", f"runtime.secagg_max_weight={MAX_WEIGHT}")
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(result=run_experiment(secure, quiet=True)),
                                  daemon=True)
        thread.start()
        log = fed.workdir / "node2.log"
        deadline = time.monotonic() + 180
        while not (log.exists() and log.read_text().count("Receiving: train message") >= 3):  # setup, keys, train
            assert time.monotonic() < deadline, fed.tail()
            time.sleep(0.2)
        fed.kill(nodes[2])
        thread.join(300)
        assert "result" in outcome, fed.tail()
    out = capfd.readouterr().out
    assert "SecAgg+ aggregated 2 clients (client_000, client_001)" in out, out[-3000:]
    assert "(1, 'client_002', 'left the SecAgg+ round')" in out, out[-3000:]
    a = load_file(plain.output_dir / "model" / "adapter_model.safetensors")
    b = load_file(outcome["result"].output_dir / "model" / "adapter_model.safetensors")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= _bound(summary["sizes"]), f"max |secagg - plain| = {diff:.3e}"
