"""fedtune merge (one-shot fusion of trained peft adapters) and model.init_adapter (warm start)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedtune.cli import main
from fedtune.lora_aggregation import delta_weights
from fedtune.lora_merge import MergeError, merge_adapters


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_csv):
    """Two trained adapters (different seeds, rank 4) and one with other target modules."""
    from fedtune.config import Experiment
    from fedtune.experiment import run_experiment

    train, evalf = tiny_csv
    root = tmp_path_factory.mktemp("adapters")

    def run(name, *extra):
        base = [f'model.name="{tiny_model_dir}"', 'data.dataset="files"', f'data.train_file="{train}"',
                f'data.eval_file="{evalf}"', 'data.text_column="text"', 'data.label_column="label"',
                "data.max_length=16", "partition.num_clients=2", "partition.min_examples=5", "federation.rounds=2",
                "train.batch_size=16", "train.lr=0.02", "train.epochs=6", "model.lora.r=4",
                f'output_dir="{root / name}"']
        return run_experiment(Experiment.from_overrides(base + list(extra)), quiet=True)

    a, b = run("a"), run("b", "seed=1")
    q = run("q", 'model.lora.target_modules=["query"]')
    return {"a": a.output_dir / "model", "b": b.output_dir / "model", "q": q.output_dir / "model",
            "acc_a": a.final_metrics["accuracy"]}


def _logits(tiny_model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tok(["the goal match today", "new chip in the cloud", "bank stock price", "a big report"],
                return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_merging_an_adapter_with_itself_at_full_rank_gives_the_same_predictions(trained, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(trained["a"]), str(trained["a"]), "--rule", "svd", "--rank", "4", "--out", str(out)]) == 0
    before, after = _logits(tiny_model_dir, trained["a"]), _logits(tiny_model_dir, out)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert before.abs().max() > 0.1  # a trained, non-trivial model
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["rule"] == "svd" and manifest["rank"] == 4 and manifest["weights"] == [0.5, 0.5]
    assert manifest["energy_kept"] == pytest.approx(1.0, abs=1e-6)
    assert manifest["inputs"] == [str(trained["a"])] * 2
    from fedtune.predict import Predictor  # the folder is usable like a run's model/

    rows = [{"text": "goal match team"}, {"text": "bank stock fund"}]
    merged, original = list(Predictor(str(out)).predict(rows)), list(Predictor(str(trained["a"])).predict(rows))
    assert [r["label"] for r in merged] == [r["label"] for r in original] == ["sports", "money"]
    for m, o in zip(merged, original, strict=True):
        assert m["scores"] == pytest.approx(o["scores"], abs=1e-5)


def test_flora_merge_of_two_adapters_is_exact_and_svd_at_low_rank_reports_the_cut(trained, tmp_path):
    a, b = (load_file(str(trained[k] / "adapter_model.safetensors")) for k in ("a", "b"))
    scale = json.loads((trained["a"] / "adapter_config.json").read_text())["lora_alpha"] / 4
    manifest = merge_adapters([trained["a"], trained["b"]], tmp_path / "f", rule="flora", weights=[1, 3])
    assert manifest["rank"] == 8
    merged = load_file(str(tmp_path / "f" / "adapter_model.safetensors"))
    da, db, dm = delta_weights(a, scale), delta_weights(b, scale), delta_weights(merged, 1.0)
    for k in dm:
        torch.testing.assert_close(dm[k], 0.25 * da[k] + 0.75 * db[k], rtol=0, atol=1e-5)
    low = merge_adapters([trained["a"], trained["b"]], tmp_path / "s", rule="svd", rank=2)
    assert 0 < low["energy_kept"] < 1


def test_manifests_weight_by_client_size(trained, tmp_path):
    parts = sorted((trained["a"].parent / "partition").glob("client_*.json"))
    sizes = [json.loads(p.read_text())["size"] for p in parts]
    assert main(["merge", str(trained["a"]), str(trained["b"]), "--rule", "fedit", "--manifests",
                 *map(str, parts), "--out", str(tmp_path / "m")]) == 0
    w = json.loads((tmp_path / "m" / "merge_manifest.json").read_text())["weights"]
    assert w == pytest.approx([s / sum(sizes) for s in sizes])


def test_mismatched_adapters_are_refused_with_the_adapter_named(trained, tmp_path, capsys):
    with pytest.raises(MergeError, match=rf"adapter {trained['q']} does not match .*target modules"):
        merge_adapters([trained["a"], trained["q"]], tmp_path / "x", rule="svd", rank=4)
    # same modules, a tampered head shape
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((trained["a"] / "adapter_config.json").read_text())
    tensors = load_file(str(trained["a"] / "adapter_model.safetensors"))
    head = next(k for k in tensors if k.endswith("classifier.weight"))
    tensors[head] = torch.zeros(5, tensors[head].shape[1])
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    assert main(["merge", str(trained["a"]), str(bad), "--rank", "4", "--out", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert f"adapter {bad} does not match" in err and head in err
    with pytest.raises(MergeError, match="fedex.*cannot be written as one adapter"):
        merge_adapters([trained["a"]], tmp_path / "z", rule="fedex")
    with pytest.raises(MergeError, match="svd needs --rank"):
        merge_adapters([trained["a"]], tmp_path / "z", rule="svd")


def test_warm_start_begins_round_one_from_the_trained_adapter(trained, tiny_experiment):
    from fedtune.experiment import run_experiment

    exp = tiny_experiment(f'model.init_adapter="{trained["a"]}"', "eval.initial=true", "federation.rounds=1",
                          "train.epochs=1")
    res = run_experiment(exp, quiet=True)
    assert res.history[0]["round"] == 0
    assert res.history[0]["eval_accuracy"] == pytest.approx(trained["acc_a"])
    assert res.history[0]["eval_accuracy"] > 0.5  # not the untrained model's chance level
    with pytest.raises(MergeError, match=r"model.init_adapter = .*shape .*check model.lora.r"):
        run_experiment(tiny_experiment(f'model.init_adapter="{trained["a"]}"', "model.lora.r=8"), quiet=True,
                       overwrite=True)
    with pytest.raises(MergeError, match=r"model.init_adapter = .*lacks"):
        run_experiment(tiny_experiment(f'model.init_adapter="{trained["q"]}"'), quiet=True, overwrite=True)
