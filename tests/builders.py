"""Shared test data builders: keyword sentences, SQuAD files, multi-label rows, encoded client data, plans.

Not a test module (no ``test_`` prefix); importable from any test folder because pyproject.toml puts
tests/ on the path (``pythonpath = ["tests"]``).
"""

from __future__ import annotations

import json
import random

import torch

from fedtune.batching import EncodedDataset
from fedtune.strategies.lora import LoraClient
from fedtune.types import LocalTrainConfig, RoundPlan

# ----------------------------------------------------------------------------- keyword text (the tiny model's vocabulary)

WORDS = {
    "sports": ["goal", "match", "team", "score", "coach", "league"],
    "tech": ["chip", "software", "robot", "cloud", "code", "laptop"],
    "money": ["bank", "stock", "price", "market", "trade", "fund"],
}
FILLER = ["the", "a", "today", "new", "big", "report", "says", "after", "with", "on"]
NAMES = [w for ws in WORDS.values() for w in ws]
TOPICS = sorted(WORDS)


def make_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Keyword-labelled sentences: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    labels = sorted(WORDS)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.sample(WORDS[label], 2) + rng.sample(FILLER, 4)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def squad_file(path, n_articles: int, per_article: int, seed: int) -> None:
    """Contexts of filler words with one 'coach X' pair; the question asks for X (the word after 'coach')."""
    rng = random.Random(seed)
    data = []
    for a in range(n_articles):
        paras = []
        for q in range(per_article):
            answer = rng.choice([w for w in NAMES if w != "coach"])
            words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
            pos = rng.randint(0, len(words))
            words[pos:pos] = ["coach", answer]
            context = " ".join(words)
            start = context.index("coach " + answer) + len("coach ")
            paras.append({"context": context, "qas": [{"id": f"a{a}q{q}", "question": "the coach",
                                                        "answers": [{"text": answer, "answer_start": start}]}]})
        data.append({"title": f"article_{a}", "paragraphs": paras})
    path.write_text(json.dumps({"data": data, "version": "1.1"}))


def multilabel_rows(n: int, seed: int) -> list[dict]:
    """Each text mentions one to three topics' keywords; its labels are exactly those topics."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topics = rng.sample(TOPICS, rng.choice([1, 1, 2, 3]))
        words = [w for t in topics for w in rng.sample(WORDS[t], 2)] + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "labels": topics})
    return rows


# ----------------------------------------------------------------------------- encoded client data and plans

CLIENT_SIZES = {"c0": 13, "c1": 29, "c2": 40, "c3": 7}  # mixed sizes: clients finish at different steps


def make_data(n: int, seed: int, num_labels: int = 3) -> EncodedDataset:
    """``n`` random token sequences (ids 5..26 between [CLS]=2 and [SEP]=3) with random labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 14, (n,), generator=g).tolist()
    ids = [[2] + torch.randint(5, 27, (m,), generator=g).tolist() + [3] for m in lengths]
    return EncodedDataset(ids, None, torch.randint(0, num_labels, (n,), generator=g))


def perturbed(params, seed=1):
    """Start from non-zero LoRA B factors so every tensor has a gradient from step one."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in params.items()}


LORA_A = "m.lora_A.default.weight"
LORA_B = "m.lora_B.default.weight"


def full_plan(objective) -> RoundPlan:
    """A plan with every field away from its default."""
    params = {LORA_A: torch.randn(4, 6), LORA_B: torch.randn(5, 4), "head.weight": torch.randn(3, 5)}
    return RoundPlan(
        round=3, params=params,
        local=LocalTrainConfig(1.5, 7, 0.01, 8, weight_decay=0.1, grad_clip=1.0, precision="bf16", optimizer="sgd",
                               pad_to=64, length_bucketing=True, compile=True),
        objective=objective,
        adapter=LoraClient(rule="svd", rank=4, client_ranks={"client_000": 2, "client_001": 4}),
        personal=frozenset({"head.weight"}),
        base_offset={"m.base_layer.weight": torch.randn(5, 6)},
    )


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""The ChatML chat template (SmolLM2's shape, without its default system message), for tokenizers in tests."""


def stories_chat_model(stories, folder):
    """A copy of the tiny Llama ``stories`` in ``folder`` whose tokenizer has the :data:`CHATML` template."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(stories, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def stories_tokenizers(stories):
    """(base, chat) tokenizers of the tiny Llama: its own, and the same with the :data:`CHATML` template."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(stories)
    chat = AutoTokenizer.from_pretrained(stories)
    chat.chat_template = CHATML
    return base, chat
