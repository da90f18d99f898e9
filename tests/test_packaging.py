"""What ``python -m build`` ships: the wheel and the sdist hold the package, its experiment files and the
Flower App template, a working ``fedtune --version`` and the py.typed marker, and no data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from fedtune.experiment_files import PACKAGED, packaged_experiments, resolve_experiment_file

DATA_SUFFIXES = {".csv", ".tsv", ".jsonl", ".parquet", ".safetensors", ".bin", ".gguf", ".pt", ".npz", ".arrow"}
SKIP = shutil.ignore_patterns(".git", "site", "runs", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache",
                              ".ruff_cache", ".pytest_cache", ".hypothesis", "sites")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The sdist and the wheel built from a copy of the repository (so the checkout gets no build folders)."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "fedtune"
    shutil.copytree(REPO, src, symlinks=True, ignore=SKIP)
    out = root / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return src, sdist, wheel


def test_wheel_holds_every_module_the_experiments_and_no_data(dist):
    src, _, wheel = dist
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(src / "src").as_posix() for p in (src / "src" / "fedtune").rglob("*.py")}
    assert modules <= names, sorted(modules - names)[:10]
    shipped = {n for n in names if n.startswith("fedtune/experiments/")}
    assert shipped == {f"fedtune/experiments/{n}" for n in packaged_experiments()}
    assert "fedtune/experiments/default.toml" in shipped and "fedtune/experiments/sweeps/noniid_study.toml" in shipped
    assert "fedtune/py.typed" in names
    assert not [n for n in names if Path(n).suffix in DATA_SUFFIXES or n.startswith(("tests/", "docs/", "benchmarks/"))]
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: Apache-2.0" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "fedtune = fedtune.cli:main" in zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()


def test_the_unpacked_wheel_runs_version_the_packaged_experiment_and_writes_the_flower_app(dist, tmp_path):
    _, _, wheel = dist
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import json, sys\n"
        "from fedtune.cli import main\n"
        "from fedtune.config import Experiment\n"
        "from fedtune.experiment_files import resolve_experiment_file\n"
        "from fedtune.runtime.flower.launch import write_app\n"
        "import fedtune\n"
        "exp = Experiment.from_toml(resolve_experiment_file('experiments/glue_sst2.toml'))\n"
        "app = write_app(sys.argv[1], exp)\n"
        "print(json.dumps({'file': fedtune.__file__, 'name': exp.name, 'files': sorted(p.name for p in app.iterdir())}))\n"
        "main(['--version'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "app")], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, version = proc.stdout.strip().splitlines()[-2:]
    info = json.loads(first)
    assert info["file"].startswith(str(site))  # the wheel's copy, not the checkout's
    assert info["name"] == "sst2-minilm-lora-fedprox"
    assert info["files"] == ["experiment.toml", "fedtune_app.py", "pyproject.toml"]
    assert version == "fedtune 0.1.0"


def test_sdist_holds_the_sources_license_and_experiments_and_no_data(dist):
    _, sdist, _ = dist
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "LICENSE", "src/fedtune/py.typed", "src/fedtune/experiments/default.toml",
            "src/fedtune/runtime/flower/launch.py"} <= names
    assert not [n for n in names if Path(n).suffix in DATA_SUFFIXES or n.startswith(("site/", "runs/"))]


def test_experiment_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: experiments/ does not exist here
    for name in ("experiments/glue_sst2.toml", "glue_sst2.toml", "glue_sst2"):
        assert resolve_experiment_file(name) == PACKAGED / "glue_sst2.toml"
    assert resolve_experiment_file("sweeps/lora_seeds") == PACKAGED / "sweeps" / "lora_seeds.toml"
    assert resolve_experiment_file("nope.toml") == Path("nope.toml")  # loading it then names the missing file
    assert resolve_experiment_file("../../etc/passwd") == Path("../../etc/passwd")  # never outside the folder
    (tmp_path / "glue_sst2.toml").write_text('name = "mine"\n')
    assert resolve_experiment_file("glue_sst2.toml") == Path("glue_sst2.toml")  # a file of yours comes first
