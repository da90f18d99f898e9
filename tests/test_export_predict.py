"""Export round trips (merged, INT8, ONNX, ONNX INT8) and `fedtune predict` on every task type."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.cli import main


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tiny_csv, tmp_path_factory):
    """A LoRA classification run on the tiny model (two rounds, learns the keywords)."""
    from fedtune.config import Experiment
    from fedtune.experiment import run_experiment

    train, evalf = tiny_csv
    out = tmp_path_factory.mktemp("export_run")
    exp = Experiment.from_overrides([
        f'model.name="{tiny_model_dir}"', 'data.dataset="files"', f'data.train_file="{train}"',
        f'data.eval_file="{evalf}"', 'data.text_column="text"', 'data.label_column="label"', "data.max_length=16",
        "partition.num_clients=2", "federation.rounds=2", "train.epochs=6", "train.lr=0.02", "train.batch_size=16",
        "model.lora.r=4", f'output_dir="{out / "run"}"',
    ])
    result = run_experiment(exp, quiet=True)
    return result


def _final_global_model(run, initial=False):
    """The run's model rebuilt in memory: its config and seed, with the last checkpoint's global tensors.

    That is what the run saved to ``model/`` (``set_trainable(model, state.params)`` then ``save_model``).
    ``initial`` leaves the starting tensors in place instead.
    """
    from fedtune.checkpoint import read_checkpoint
    from fedtune.config import Experiment
    from fedtune.models import load_classifier, set_trainable

    exp = Experiment.from_toml(run / "config.toml")
    model = load_classifier(exp.model, 3, False, exp.seed)
    if not initial:
        set_trainable(model, read_checkpoint(run).state.params)
    return model.eval()


def test_every_export_matches_the_trained_model(trained_run):
    from fedtune.artifacts import load_for_inference
    from fedtune.export import FORMATS, evaluate_exports, export_run

    run = trained_run.output_dir
    written = export_run(run, list(FORMATS))
    assert set(written) == set(FORMATS)
    ref_model, tok, meta = load_for_inference(run)
    assert meta.task == "classification" and meta.label_names == ["money", "sports", "tech"]
    enc = tok(["goal match the", "bank stock a new", "robot code today"], padding=True, return_tensors="pt")
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        ref = ref_model(**batch).logits
        # The reloaded run model is the final global model that was saved, logit for logit.
        saved = _final_global_model(run)
        want = saved(**batch).logits
        assert torch.allclose(ref, want, atol=1e-5, rtol=0), (ref - want).abs().max()
        assert (want - _final_global_model(run, initial=True)(**batch).logits).abs().max() > 1e-2  # training moved it
        scale = float(ref.abs().max())  # INT8: within 10% of the largest logit, same predicted classes
        for fmt, tol in (("merged", 1e-5), ("onnx", 1e-4), ("int8", 0.1 * scale), ("onnx-int8", 0.1 * scale)):
            model, _, m = load_for_inference(written[fmt])
            assert m.format == fmt
            got = model(**batch).logits.float()
            assert torch.allclose(got, ref, atol=tol), (fmt, (got - ref).abs().max())
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
    rows = {r.format: r for r in evaluate_exports(run, written, latency_examples=5)}
    base = rows["pytorch"].metrics["accuracy"]
    assert base == pytest.approx(trained_run.final_metrics["accuracy"])
    assert rows["merged"].metrics["accuracy"] == pytest.approx(base)
    assert rows["onnx"].metrics["accuracy"] == pytest.approx(base)
    assert all(r.size_mb > 0 and r.latency_ms > 0 for r in rows.values())
    assert rows["onnx-int8"].size_mb < rows["onnx"].size_mb


def test_cli_export_writes_the_table(trained_run, tmp_path, capsys):
    code = main(["export", str(trained_run.output_dir), "--format", "merged", "--format", "onnx",
                 "--out", str(tmp_path / "exp"), "--latency-examples", "3"])
    assert code == 0
    table = (tmp_path / "exp" / "export_table.md").read_text()
    assert table.splitlines()[0].startswith("| format | size (MB) | accuracy |")
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["pytorch", "merged", "onnx"]


def test_predict_classification_from_run_and_onnx(trained_run, tmp_path, capsys):
    from fedtune.export import export_run

    onnx_dir = export_run(trained_run.output_dir, ["onnx"], tmp_path / "e")["onnx"]
    for model in (trained_run.output_dir, onnx_dir):
        assert main(["predict", str(model), "--text", "goal match team", "--text", "bank stock fund"]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [x["label"] for x in lines] == ["sports", "money"]
        assert abs(sum(lines[0]["scores"].values()) - 1.0) < 1e-5


def test_predict_bad_input_is_named(trained_run, tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "goal"}\n{"question": "where?"}\n')
    assert main(["predict", str(trained_run.output_dir), "--file", str(bad)]) == 1
    assert "input row 2: a classification model needs field(s) ['text']" in capsys.readouterr().err  # line 2
    assert main(["predict", str(tmp_path), "--text", "x"]) == 1
    assert "neither a fedtune model folder nor a run folder" in capsys.readouterr().err


def test_predict_qa_multilabel_and_causal_lm(tmp_path, tiny_model_dir, capsys):
    """Each task's model answers in its own shape (models trained for one round: shapes, not quality)."""
    from builders import multilabel_rows, squad_file

    from fedtune.config import Experiment
    from fedtune.experiment import run_experiment

    squad_file(tmp_path / "train.json", 2, 10, 1)
    common = [f'model.name="{tiny_model_dir}"', "partition.num_clients=1", "federation.rounds=1",
              "train.max_steps=2", "train.epochs=0", "partition.min_examples=1"]
    qa = run_experiment(Experiment.from_overrides(common + [
        'data.task="qa"', f'data.train_file="{tmp_path / "train.json"}"', f'data.eval_file="{tmp_path / "train.json"}"',
        "data.max_length=24", "data.doc_stride=4", f'output_dir="{tmp_path / "qa"}"']), quiet=True)
    assert main(["predict", str(qa.output_dir), "--question", "the coach", "--context", "today coach goal team"]) == 0
    answer = json.loads(capsys.readouterr().out)["answer"]
    assert answer in "today coach goal team"

    (tmp_path / "ml.jsonl").write_text("\n".join(json.dumps(r) for r in multilabel_rows(40, 1)) + "\n")
    ml = run_experiment(Experiment.from_overrides(common + [
        'data.task="multilabel"', f'data.train_file="{tmp_path / "ml.jsonl"}"',
        f'data.eval_file="{tmp_path / "ml.jsonl"}"', "data.max_length=16", f'output_dir="{tmp_path / "ml"}"']),
        quiet=True)
    assert main(["predict", str(ml.output_dir), "--text", "goal bank"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["scores"]) == {"money", "sports", "tech"} and set(out["labels"]) <= set(out["scores"])
    assert out["labels"] == [n for n, v in out["scores"].items() if v >= out["threshold"]]


def test_predict_causal_lm_generates(tmp_path, capsys):
    from conftest import REPO

    from fedtune.config import Experiment
    from fedtune.experiment import run_experiment

    stories = REPO.parent / "shared" / "models" / "stories260K"
    if not (stories / "config.json").is_file():
        pytest.skip("stories260K not present")
    rows = [{"instruction": f"Say {w}.", "input": "", "output": f"{w} {w}"} for w in ("cat", "dog", "sun", "moon")]
    (tmp_path / "inst.json").write_text(json.dumps(rows * 5))
    run = run_experiment(Experiment.from_overrides([
        f'model.name="{stories}"', 'data.task="causal_lm"', f'data.train_file="{tmp_path / "inst.json"}"',
        "data.eval_size=4", "partition.num_clients=1", "partition.min_examples=1", "federation.rounds=1",
        "train.max_steps=2", "train.epochs=0", "eval.samples=0", f'output_dir="{tmp_path / "lm"}"']), quiet=True)
    assert main(["predict", str(run.output_dir), "--prompt", "Once upon a time", "--max-new-tokens", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "Once upon a time" and isinstance(out["generation"], str) and out["generation"]
    # --instruction wraps the text in the training template: the same generation as that prompt given whole
    from fedtune.tasks.causal_lm import Instruction

    templated = Instruction("Say cat.", "", "").prompt()
    assert main(["predict", str(run.output_dir), "--instruction", "Say cat.", "--prompt", templated,
                 "--max-new-tokens", "5"]) == 0
    by_prompt, by_instruction = (json.loads(line) for line in capsys.readouterr().out.splitlines())  # prompts first
    assert by_instruction["instruction"] == "Say cat." and by_instruction["generation"] == by_prompt["generation"]


def test_predict_generative_classification(tmp_path, tiny_csv, capsys):
    from conftest import REPO

    from fedtune.config import Experiment
    from fedtune.experiment import run_experiment

    stories = REPO.parent / "shared" / "models" / "stories260K"
    if not (stories / "config.json").is_file():
        pytest.skip("stories260K not present")
    train, evalf = tiny_csv
    run = run_experiment(Experiment.from_overrides([
        f'model.name="{stories}"', 'data.task="generative_classification"', 'data.dataset="files"',
        f'data.train_file="{train}"', f'data.eval_file="{evalf}"', 'data.text_column="text"',
        'data.label_column="label"', "partition.num_clients=1", "federation.rounds=1", "train.max_steps=2",
        "train.epochs=0", f'output_dir="{tmp_path / "gen"}"']), quiet=True)
    assert main(["predict", str(run.output_dir), "--text", "goal match team"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["label"] in ("money", "sports", "tech")
    assert set(out["log_likelihoods"]) == {"money", "sports", "tech"}
    assert out["label"] == max(out["log_likelihoods"], key=out["log_likelihoods"].get)



def test_predict_generative_classification_as_chat_scores_as_the_run_did(tmp_path, tiny_csv, capsys):
    """A chat-format run: predict renders its rows with the model's chat template and the run's
    resolved template, so its choice is the run's constrained prediction."""
    from builders import stories_chat_model
    from conftest import REPO

    from fedtune.artifacts import ModelMeta, model_folder
    from fedtune.config import Experiment
    from fedtune.experiment import run_experiment
    from fedtune.tasks.label_prompts import CHAT_TEMPLATE

    stories = REPO.parent / "shared" / "models" / "stories260K"
    if not (stories / "config.json").is_file():
        pytest.skip("stories260K not present")
    folder = stories_chat_model(stories, tmp_path / "stories-chat")
    train, evalf = tiny_csv
    run = run_experiment(Experiment.from_overrides([
        f'model.name="{folder}"', 'data.task="generative_classification"', 'data.dataset="files"',
        f'data.train_file="{train}"', f'data.eval_file="{evalf}"', 'data.text_column="text"',
        'data.label_column="label"', "data.max_length=128", "partition.num_clients=1", "federation.rounds=1",
        "train.max_steps=2", "train.epochs=0", f'output_dir="{tmp_path / "gen"}"']), quiet=True)
    meta = ModelMeta.read(model_folder(run.output_dir))
    assert meta.prompt_format == "chat" and meta.prompt_template == CHAT_TEMPLATE  # resolved, not "auto" / ""
    texts = ["goal match team", "bank money loan"]
    assert main(["predict", str(run.output_dir), "--text", texts[0], "--text", texts[1]]) == 0
    outs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    from fedtune.artifacts import load_for_inference
    from fedtune.tasks.causal_lm import score_candidate_ids
    from fedtune.tasks.label_prompts import LabelPrompts

    model, tok, _ = load_for_inference(str(run.output_dir))
    lp = LabelPrompts(tok, meta.label_names, max_length=128)
    expected = score_candidate_ids(model, [lp.prompt_ids(t) for t in texts], lp.candidates, pad_id=tok.pad_token_id or 0)
    for out, row in zip(outs, expected, strict=True):
        assert [out["log_likelihoods"][n] for n in meta.label_names] == pytest.approx(row.tolist(), abs=1e-5)
