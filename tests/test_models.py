"""Model loading, fine-tuning modes, trainable-tensor transfer."""

import pytest
import torch

from fedtune.config import ConfigError, LoraConfig, ModelConfig
from fedtune.models import (
    ModelLoadError,
    get_trainable,
    load_classifier,
    resolve_model_path,
    set_trainable,
    trainable_names,
)


def test_lora_trains_adapters_and_head_only(tiny_model_dir):
    m = load_classifier(ModelConfig(name=str(tiny_model_dir), mode="lora", lora=LoraConfig(r=2)), 3, False, 0)
    names = trainable_names(m)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any("classifier" in n for n in names)
    assert not any("embeddings" in n or "intermediate" in n for n in names)
    a = [p for n, p in m.named_parameters() if n.endswith("query.lora_A.default.weight")][0]
    assert a.shape == (2, 32)


def test_lora_target_modules(tiny_model_dir):
    cfg = ModelConfig(name=str(tiny_model_dir), mode="lora", lora=LoraConfig(r=2, target_modules=["key"]))
    names = trainable_names(load_classifier(cfg, 3, False, 0))
    assert any(".key.lora_A" in n for n in names) and not any(".query.lora_A" in n for n in names)


def test_lora_bad_target_module_is_clear(tiny_model_dir):
    cfg = ModelConfig(name=str(tiny_model_dir), mode="lora", lora=LoraConfig(target_modules=["nope_proj"]))
    with pytest.raises(ModelLoadError, match="LoRA could not be applied"):
        load_classifier(cfg, 3, False, 0)


def test_partial_trains_last_layers_and_head(tiny_model_dir):
    m = load_classifier(ModelConfig(name=str(tiny_model_dir), mode="partial", last_layers=1), 3, False, 0)
    names = trainable_names(m)
    assert any("encoder.layer.1." in n for n in names)
    assert not any("encoder.layer.0." in n for n in names)
    assert any(n.startswith("classifier") for n in names) and any("pooler" in n for n in names)
    assert not any("embeddings" in n for n in names)


def test_full_trains_everything(tiny_model_dir):
    m = load_classifier(ModelConfig(name=str(tiny_model_dir), mode="full"), 3, False, 0)
    assert len(trainable_names(m)) == len(list(m.parameters()))


@pytest.mark.parametrize("mode", ["lora", "partial", "full"])
def test_frozen_pooler_is_neither_trained_nor_sent(tiny_model_dir, mode):
    cfg = ModelConfig(name=str(tiny_model_dir), mode=mode, frozen_heads=["pooler"])
    names = trainable_names(load_classifier(cfg, 3, False, 0))
    assert not any("pooler" in n for n in names)
    assert any("classifier" in n for n in names)
    default = trainable_names(load_classifier(ModelConfig(name=str(tiny_model_dir), mode=mode), 3, False, 0))
    assert any("pooler" in n for n in default)


def test_freezing_the_new_output_layer_is_refused():
    with pytest.raises(ConfigError, match="model.frozen_heads: 'classifier' cannot be frozen"):
        ModelConfig(frozen_heads=["classifier"])


def test_regression_head(tiny_model_dir):
    m = load_classifier(ModelConfig(name=str(tiny_model_dir), mode="full"), 1, True, 0)
    assert m.config.problem_type == "regression" and m.config.num_labels == 1


def test_same_seed_same_head(tiny_model_dir):
    cfg = ModelConfig(name=str(tiny_model_dir))
    a, b = get_trainable(load_classifier(cfg, 3, False, 5)), get_trainable(load_classifier(cfg, 3, False, 5))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_set_trainable_round_trip_and_errors(tiny_model_dir):
    m = load_classifier(ModelConfig(name=str(tiny_model_dir)), 3, False, 0)
    params = {k: torch.randn_like(v) for k, v in get_trainable(m).items()}
    set_trainable(m, params)
    assert all(torch.equal(get_trainable(m)[k], params[k]) for k in params)
    name = next(iter(params))
    with pytest.raises(ValueError, match="shape"):
        set_trainable(m, {**params, name: torch.zeros(1)})
    with pytest.raises(KeyError, match="missing"):
        set_trainable(m, {k: v for k, v in params.items() if k != name})


def test_embedded_model_resolves_to_installed_folder():
    from pathlib import Path

    path = Path(resolve_model_path("embedded"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_missing_local_folder_and_non_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("./no/such/model")
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_unreachable_hub_id_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ModelLoadError, match="some-org/some-model-that-is-not-cached.*hub"):
        load_classifier(ModelConfig(name="some-org/some-model-that-is-not-cached"), 2, False, 0)


@pytest.mark.parametrize("mode", ["lora", "partial", "full"])
def test_saved_model_reloads_with_the_same_logits(tiny_model_dir, tmp_path, mode):
    """save_model + fedtune.json, then load_for_inference: the same logits as the model that was saved."""
    from transformers import AutoTokenizer

    from fedtune.artifacts import ModelMeta, load_for_inference
    from fedtune.models import save_model

    cfg = ModelConfig(name=str(tiny_model_dir), mode=mode, lora=LoraConfig(r=2), last_layers=1)
    model = load_classifier(cfg, 3, False, 0)
    g = torch.Generator().manual_seed(1)
    trained = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in get_trainable(model).items()}
    set_trainable(model, trained)  # as if trained: every saved tensor (LoRA B too) is away from its init
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    save_model(model, tok, tmp_path / "model")
    ModelMeta(task="classification", base_model=str(tiny_model_dir), num_labels=3,
              problem_type="single_label_classification").write(tmp_path / "model")
    enc = tok(["goal match the", "bank stock a new", "robot code today chip", "the"], padding=True,
              return_tensors="pt")
    reloaded, _, meta = load_for_inference(tmp_path / "model")
    fresh = load_classifier(cfg, 3, False, 0).eval()
    with torch.no_grad():
        want = model.eval()(**enc).logits
        got = reloaded(**enc).logits
        untrained = fresh(**enc).logits
    assert meta.format == "pytorch" and got.shape == want.shape == (4, 3)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    # The comparison can tell models apart: the unsaved initial model is far from the saved one.
    assert (untrained - want).abs().max() > 1e-2


def test_quantized_base_is_refused_without_cuda_and_outside_lora(tiny_model_dir):
    from fedtune.config import Experiment
    from fedtune.models import load_model

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for CPU-only machines")
    with pytest.raises(ConfigError, match=r"model.quantization = '4bit' \(QLoRA\) needs a CUDA device and "
                                          r"bitsandbytes; this one is the CPU"):
        load_model(ModelConfig(name=str(tiny_model_dir), quantization="4bit"), "causal_lm", seed=0)
    with pytest.raises(ConfigError, match="model.quantization = '8bit' needs model.mode = 'lora'"):
        Experiment.from_overrides(['model.quantization="8bit"', 'model.mode="full"'])


def test_attention_auto_picks_eager_on_cpu_only_under_attention_dropout():
    from transformers import BertConfig, LlamaConfig

    from fedtune.models import attention_implementation

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_implementation("auto", BertConfig(), cpu) == "eager"  # (attention_probs_dropout_prob 0.1)
    assert attention_implementation("auto", BertConfig(), cuda) is None
    assert attention_implementation("auto", BertConfig(attention_probs_dropout_prob=0.0), cpu) is None
    assert attention_implementation("auto", LlamaConfig(), cpu) is None  # (attention_dropout 0.0)
    assert attention_implementation("auto", LlamaConfig(attention_dropout=0.1), cpu) == "eager"
    assert attention_implementation("sdpa", BertConfig(), cpu) == "sdpa"


def test_eager_and_sdpa_attention_train_alike(tmp_path):
    """model.attention changes the kernel, not the result: same loss and gradients under attention dropout."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3)).save_pretrained(tmp_path)
    ids = torch.randint(5, 50, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    runs = {}
    for choice in ("auto", "sdpa"):
        model = load_classifier(ModelConfig(name=str(tmp_path), mode="full", attention=choice), 3, False, seed=0)
        model.train()
        torch.manual_seed(1)
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 0])).loss
        assert model.config._attn_implementation == ("eager" if choice == "auto" else "sdpa")
        loss.backward()
        runs[choice] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
        with torch.no_grad():  # evaluation keeps the fused kernel (no dropout there)
            logits = model.eval()(input_ids=ids, attention_mask=mask).logits
        assert model.config._attn_implementation == "sdpa"
        runs[choice] += (logits,)
    assert torch.allclose(runs["auto"][0], runs["sdpa"][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(runs["auto"][1], runs["sdpa"][1], strict=True))
    assert torch.allclose(runs["auto"][2], runs["sdpa"][2], atol=1e-5)
