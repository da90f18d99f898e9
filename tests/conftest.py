"""Shared fixtures: tiny config-built models, a tiny learnable dataset, the shared data folder.

Shared helpers that are not fixtures live next to this file, in builders.py (data and plan builders) and
equivalence.py (checks that two ways of getting a result agree); pyproject.toml puts tests/ on the path
(``pythonpath = ["tests"]``) so every test folder imports them, and this file, by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Plain asserts in the shared helper modules get pytest's detailed failure messages, as in test modules.
pytest.register_assert_rewrite("builders", "equivalence", "flower_processes")

from builders import CLIENT_SIZES, FILLER, WORDS, make_data, make_rows  # noqa: E402

# train.precision = "auto" (the default) resolves to fp32 in tests, so their figures do not depend on whether
# this CPU has bf16 units; tests/test_precision.py covers the detection and the bf16 choice. (Inherited by the
# Flower processes the tests start.)
os.environ["FEDTUNE_NATIVE_BF16"] = "0"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDTUNE_DATA_DIR", REPO.parent / "shared" / "data")).resolve()  # (absolute:
# the Flower tests hand paths to a SuperLink that runs in another folder)


_FLOWER_MARKS = ("flower_processes", "flwr", "flower-simulation", "runtime.mode")


def _xdist_group(path: Path, cache: dict[Path, str]) -> str:
    """One group per test module; every module that starts Flower or Ray processes in the one group ``flower``."""
    if path not in cache:
        text = path.read_text(encoding="utf-8", errors="replace")
        flower = "runtime/flower/" in path.as_posix() or any(mark in text for mark in _FLOWER_MARKS)
        cache[path] = "flower" if flower else path.relative_to(REPO).as_posix()
    return cache[path]


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n 2 --dist loadgroup``): a module's tests share one worker (and its module
    fixtures), and the modules running Flower or Ray share one worker, so no two federations compete."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    cache: dict[Path, str] = {}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_xdist_group(Path(str(item.fspath)), cache)))


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count (e.g. to compare with 1-thread workers) leaves it as it found it:
    the tests after it would otherwise all run on one thread."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (hidden 32) with a word-level tokenizer, saved as an HF folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast
    from transformers.utils import logging as hf_logging

    d = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + [w for ws in WORDS.values() for w in ws]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf_logging.disable_progress_bar()
    BertModel(cfg).save_pretrained(d)
    hf_logging.enable_progress_bar()
    return d


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> tuple[Path, Path]:
    """train.csv (240 rows) and eval.csv (60 rows) with columns text,label."""
    d = tmp_path_factory.mktemp("tiny_data")
    for name, n, seed in (("train.csv", 240, 1), ("eval.csv", 60, 2)):
        lines = ["text,label"] + [f"{t},{lab}" for t, lab in make_rows(n, seed)]
        (d / name).write_text("\n".join(lines) + "\n")
    return d / "train.csv", d / "eval.csv"


@pytest.fixture
def tiny_experiment(tiny_model_dir, tiny_csv, tmp_path):
    """An Experiment on the tiny model and tiny CSV data (fast: seconds)."""
    from fedtune.config import Experiment

    train, evalf = tiny_csv

    def make(*overrides: str) -> Experiment:
        base = [
            f'model.name="{tiny_model_dir}"', "data.dataset=\"files\"", f'data.train_file="{train}"',
            f'data.eval_file="{evalf}"', 'data.text_column="text"', 'data.label_column="label"',
            "data.max_length=16", "partition.num_clients=3", "partition.method=\"iid\"",
            "partition.min_examples=5", "federation.rounds=2", "train.batch_size=16", "train.lr=0.02", "train.epochs=6",
            "model.lora.r=4", f'output_dir="{tmp_path / "run"}"',
        ]
        return Experiment.from_overrides(base + list(overrides))

    return make


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """The tiny model with LoRA adapters and a 3-label head, one per test module."""
    from fedtune.config import ModelConfig
    from fedtune.models import load_classifier

    return load_classifier(ModelConfig(name=str(tiny_model_dir), mode="lora"), 3, False, seed=0)


@pytest.fixture(scope="module")
def client_data():
    """Random encoded data for four clients of mixed sizes (``builders.CLIENT_SIZES``)."""
    return {cid: make_data(n, seed=i) for i, (cid, n) in enumerate(CLIENT_SIZES.items())}


def shared_data_or_skip() -> Path:
    """The shared data folder, or skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA
