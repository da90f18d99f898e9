"""Parity on real processes for every task kind and every LoRA rule family.

One SuperLink and two SuperNodes run on localhost for the whole module (insecure, free ports);
node 0 reads ``manifests/client_000.json`` and node 1 its row of ``manifests_parquet/clients.parquet``
(``client-id = "client_001"``, the columnar manifest of large populations), which every case
overwrites with its own simulation's partition before submitting its Flower run. Each case trains a tiny config-built
model for 2 rounds with 2 clients through the in-process simulation and through Flower (``fedtune
run``'s Flower path, ``flwr run``), and the saved global model (adapter or full weights, and the
LoRA base corrections) must agree within 1e-6.

| case | task | fine-tuning / rule | also exercised |
|---|---|---|---|
| qa | extractive QA (stride windows on the nodes) | full fine-tuning | int16+gzip both ways, federated EM/F1 scored on the nodes |
| multilabel | multi-label | LoRA, fedit | per-client micro F1 scored on the nodes |
| causal_lm | causal LM (tiny Llama with a chat template; Alpaca and `messages` rows) | LoRA, svd with client ranks 2 and 4 | FedProx term, cosine learning rate across rounds |
| generative | generative classification as chat instructions (tiny Llama + ChatML), generated answers parsed | LoRA, ffa | federated eval, eval.metrics with eval.primary = macro_f1 |
| fedsa | classification | LoRA, fedsa (B kept on the nodes) | |
| fedper | classification | LoRA, FedPer (heads kept on the nodes) | federated evaluation, per-client evaluation, personalization report scored on the nodes, all by eval.primary = f1 of a positive label |
| fedex | classification | LoRA, fedex (base corrections) | |
| flora | classification | LoRA, flora (base corrections, fresh adapters) | |
| attack | classification | LoRA, median | byzantine client_001 (`[attack]` noise: drawn on its node with the simulation's seed) |
| dropout | classification (tiny BERT with attention and hidden dropout 0.1) | LoRA, fedit | `model.attention = "auto"`: eager attention while training on both sides, dropout masks drawn alike |
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from builders import stories_chat_model  # noqa: E402
from conftest import REPO, shared_data_or_skip  # noqa: E402
from flower_processes import LABELS, federation  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedtune.config import Experiment  # noqa: E402
from fedtune.experiment import run_experiment  # noqa: E402
from fedtune.manifests import PARQUET_FILE, write_manifests  # noqa: E402

STORIES = REPO.parent / "shared" / "models" / "stories260K"
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def shared_federation(tmp_path_factory):
    """A SuperLink and 2 SuperNodes for every case of this module: node 0 reads manifests/client_000.json,
    node 1 its row of manifests_parquet/clients.parquet."""
    root = tmp_path_factory.mktemp("flower_tasks")
    manifests = root / "manifests"
    manifests.mkdir()
    with federation(root / "flower") as fed:
        fed.start_superlink()
        fed.start_supernode("node0", f'manifest="{manifests / "client_000.json"}"')
        fed.start_supernode("node1", f'manifest="{root / "manifests_parquet" / PARQUET_FILE}" client-id="client_001"')
        yield fed, manifests


def _model_tensors(out: Path) -> dict:
    """Every tensor the run saved as its global model (adapter or full weights, base corrections)."""
    files = sorted((out / "model").glob("*.safetensors"))
    assert files, f"no model saved in {out}"
    tensors = {}
    for f in files:
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return tensors


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys())[:4])
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _qa(tmp_path, tiny_model_dir, tiny_csv) -> list[str]:
    from builders import squad_file

    squad_file(tmp_path / "train.json", 4, 12, 1)
    squad_file(tmp_path / "dev.json", 1, 12, 2)
    return [f'model.name="{tiny_model_dir}"', 'data.task="qa"', f'data.train_file="{tmp_path / "train.json"}"',
            f'data.eval_file="{tmp_path / "dev.json"}"', "data.max_length=24", "data.doc_stride=4",
            'partition.method="group"', 'model.mode="full"', "train.lr=0.01",
            'federation.codec_up="int16+gzip"', 'federation.codec_down="int16+gzip"', "eval.federated=true"]


def _multilabel(tmp_path, tiny_model_dir, tiny_csv) -> list[str]:
    import json

    from builders import multilabel_rows

    for name, n, seed in (("train.jsonl", 60, 1), ("dev.jsonl", 20, 2)):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in multilabel_rows(n, seed)) + "\n")
    return [f'model.name="{tiny_model_dir}"', 'data.task="multilabel"', f'data.train_file="{tmp_path / "train.jsonl"}"',
            f'data.eval_file="{tmp_path / "dev.jsonl"}"', "data.max_length=16", "train.lr=0.003",
            'model.lora.aggregation="fedit"', "eval.per_client=true"]


def _stories() -> Path:
    if not (STORIES / "config.json").is_file():
        pytest.skip("stories260K not present")
    return STORIES


def _chat_model(tmp_path) -> Path:
    """stories260K with a ChatML chat template, as a model folder of its own."""
    return stories_chat_model(_stories(), tmp_path / "stories-chat")


def _causal_lm(tmp_path, tiny_model_dir, tiny_csv) -> list[str]:
    import json

    alpaca = json.loads((shared_data_or_skip() / "code_alpaca" / "code_alpaca_2k.json").read_text())[:32]
    rows = [r if i % 2 else {"messages": [{"role": "system", "content": "Answer with code."},
                                          {"role": "user", "content": r["instruction"]},
                                          {"role": "assistant", "content": r["output"]}]}
            for i, r in enumerate(alpaca)]  # both shapes, rendered with the model's chat template
    data = tmp_path / "chat.jsonl"  # (a file path: the nodes need no env)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f'model.name="{_chat_model(tmp_path)}"', 'data.task="causal_lm"', f'data.train_file="{data}"',
            "eval.federated=true", "data.train_size=24", "data.eval_size=8", 'train.lr_schedule="cosine"',
            "train.lr_min=0.002",
            "data.max_length=192", "train.lr=0.01", "train.batch_size=8", 'model.lora.aggregation="svd"',
            "model.lora.r=4", "model.lora.client_ranks=[2, 4]", 'strategy.name="fedprox"', "strategy.mu=0.1",
            "eval.samples=0"]


def _generative(tmp_path, tiny_model_dir, tiny_csv) -> list[str]:
    train, evalf = tiny_csv  # as chat instructions, answers generated and parsed beside the constrained scores
    return [f'model.name="{_chat_model(tmp_path)}"', 'data.task="generative_classification"', 'data.dataset="files"',
            f'data.train_file="{train}"', f'data.eval_file="{evalf}"', 'data.text_column="text"',
            'data.label_column="label"', "data.max_length=128", "data.train_size=48", "data.eval_size=16",
            "eval.generative=true", "eval.max_new_tokens=6", "eval.federated=true",
            "train.lr=0.003", 'model.lora.aggregation="ffa"', f"data.label_names={LABELS}",
            'eval.metrics=["macro_f1", "matthews"]', 'eval.primary="macro_f1"']


def _classification(rule: str):
    def make(tmp_path, tiny_model_dir, tiny_csv) -> list[str]:
        train, evalf = tiny_csv
        return [f'model.name="{tiny_model_dir}"', 'data.dataset="files"', f'data.train_file="{train}"',
                f'data.eval_file="{evalf}"', 'data.text_column="text"', 'data.label_column="label"',
                "data.max_length=16", "data.train_size=80", f"data.label_names={LABELS}", "train.lr=0.02",
                "model.lora.r=4", f'model.lora.aggregation="{rule}"']

    return make


def _fedper(tmp_path, tiny_model_dir, tiny_csv) -> list[str]:
    options = [o for o in _classification("fedit")(tmp_path, tiny_model_dir, tiny_csv) if "aggregation" not in o]
    return [*options, 'personalization.method="fedper"', "personalization.holdout=0.25", "eval.federated=true",
            "eval.per_client=true", 'partition.method="label"', "partition.labels_per_client=2",
            'eval.metrics=["f1", "macro_f1"]', 'eval.positive_label="sports"', 'eval.primary="f1"']


def _attack(tmp_path, tiny_model_dir, tiny_csv) -> list[str]:
    options = [o for o in _classification("fedit")(tmp_path, tiny_model_dir, tiny_csv) if "aggregation" not in o]
    return [*options, 'strategy.name="median"', 'attack.kind="noise"', "attack.noise_std=0.01",
            'attack.clients=["client_001"]']


def _dropout(tmp_path, tiny_model_dir, tiny_csv) -> list[str]:
    model = tmp_path / "tiny-dropout"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1)
    (model / "config.json").write_text(json.dumps(config))
    options = [o for o in _classification("fedit")(tmp_path, tiny_model_dir, tiny_csv) if "model.name" not in o]
    return [*options, f'model.name="{model}"', 'model.attention="auto"']


CASES = {
    "qa": _qa, "attack": _attack, "multilabel": _multilabel, "causal_lm": _causal_lm, "generative": _generative,
    "fedsa": _classification("fedsa"), "fedper": _fedper, "fedex": _classification("fedex"), "flora": _classification("flora"),
    "dropout": _dropout,
}


@pytest.mark.parametrize("case", list(CASES))
def test_task_and_lora_rule_parity_on_real_processes(case, shared_federation, tmp_path, tiny_model_dir, tiny_csv):
    """2 rounds x 2 clients: Flower (SuperLink + 2 SuperNodes) gives the simulation's global model within 1e-6."""
    fed, manifests = shared_federation
    options = CASES[case](tmp_path, tiny_model_dir, tiny_csv)
    common = [*options, "partition.num_clients=2", "partition.min_examples=1", "federation.rounds=2",
              "train.epochs=1", "eval.every=2"]
    sim = run_experiment(Experiment.from_overrides([*common, f'output_dir="{tmp_path / "sim"}"']), quiet=True)
    parts = sorted((sim.output_dir / "partition").glob("client_*.json"))
    for f in parts:
        shutil.copy(f, manifests / f.name)
    write_manifests(manifests.with_name("manifests_parquet"), [json.loads(f.read_text())["indices"] for f in parts],
                    None, None, {}, "parquet")
    flower = Experiment.from_overrides([
        *common, f'output_dir="{tmp_path / "flower"}"', 'runtime.mode="flower"', f'runtime.superlink="{fed.address}"',
        "runtime.insecure=true", "runtime.connect_timeout=60", "runtime.round_timeout=120"])
    try:
        result = run_experiment(flower, quiet=True)
    except Exception as exc:
        raise AssertionError(f"{case} on Flower failed: {exc}\n{fed.tail()}") from exc
    assert [r["clients_aggregated"] for r in result.history] == [2, 2], fed.tail()
    diff = _max_diff(_model_tensors(sim.output_dir), _model_tensors(result.output_dir))
    assert diff <= TOLERANCE, f"{case}: max |flower - simulation| = {diff:.3e}"
    assert result.summary.get("attackers") == sim.summary.get("attackers")
    headline = sim.summary["headline_metric"]
    assert result.final_metrics[headline] == pytest.approx(sim.final_metrics[headline], rel=1e-6, abs=1e-6)
    assert result.final_metrics.keys() == sim.final_metrics.keys()
    assert result.summary.get("task_details") == sim.summary.get("task_details")  # per-class report, confusion matrix
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in result.history)
    # Client-side scores (computed on the nodes on Flower) and generated answers' scores agree too.
    scored = [k for k in sim.history[-1] if k.startswith(("eval_fed_", "eval_client_", "eval_gen_"))]
    assert scored == [k for k in result.history[-1] if k.startswith(("eval_fed_", "eval_client_", "eval_gen_"))]
    for k in scored:
        assert result.history[-1][k] == pytest.approx(sim.history[-1][k], rel=1e-6, abs=1e-6), k
    if "personalization" in sim.summary:
        a, b = sim.summary["personalization"]["per_client"], result.summary["personalization"]["per_client"]
        assert a.keys() == b.keys()
        for c in a:
            assert b[c] == pytest.approx(a[c], rel=1e-6, abs=1e-6), c
