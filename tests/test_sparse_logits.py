"""fedtune.sparse_logits: the answer-only projection gives transformers' loss, gradients and log-likelihoods."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from fedtune.sparse_logits import causal_lm_loss, labelled_logits

STORIES = REPO.parent / "shared" / "models" / "stories260K"


@pytest.fixture
def lora_llama():
    if not (STORIES / "config.json").is_file():
        pytest.skip("stories260K not present")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (4, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 30:] = 0  # a right-padded row
    labels = ids.clone()
    labels[:, :20] = -100  # the prompt
    labels[0, 30:] = -100
    labels[2, 25:] = -100  # a shorter answer
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_loss_and_gradients_equal_the_full_forward(lora_llama):
    batch = _batch()
    ours = causal_lm_loss(lora_llama, batch)
    ours.backward()
    grads = {n: p.grad.clone() for n, p in lora_llama.named_parameters() if p.requires_grad}
    lora_llama.zero_grad()
    ref = lora_llama(**batch).loss
    ref.backward()
    assert float(ours) == pytest.approx(float(ref), rel=1e-6)
    for n, p in lora_llama.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-5), n


def test_only_labelled_positions_are_projected(lora_llama):
    batch = _batch()
    logits, targets, rows = labelled_logits(lora_llama, **batch)
    kept = int((batch["labels"][:, 1:] != -100).sum())
    assert logits.shape == (kept, lora_llama.config.vocab_size) and targets.shape == rows.shape == (kept,)
    assert rows.tolist() == sorted(rows.tolist()) and set(rows.tolist()) == {0, 1, 2, 3}


def test_log_likelihoods_equal_the_full_logits(lora_llama):
    from fedtune.tasks.causal_lm import token_logprobs

    batch = _batch()
    sums, counts = token_logprobs(lora_llama, batch)
    logp = torch.log_softmax(lora_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                             .logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    ref = (logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep).sum(-1)
    assert counts.tolist() == keep.sum(-1).tolist()
    assert torch.allclose(sums, ref.detach(), atol=1e-4)


def test_other_models_and_batches_take_their_own_forward(tiny_model_dir, lora_llama):
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    batch = _batch()
    ids = batch["input_ids"] % 100
    assert causal_lm_loss(classifier, {"input_ids": ids, "attention_mask": batch["attention_mask"],
                                       "labels": batch["labels"]}) is None  # not a causal LM: no LM head
    assert causal_lm_loss(lora_llama, {**batch, "labels": batch["labels"].float()}) is None  # not token ids
    assert causal_lm_loss(lora_llama, {**batch, "token_type_ids": torch.zeros_like(ids)}) is None
