"""The experiment files shipped inside the package (``fedtune/experiments/``), found by name.

A repository checkout has them at ``experiments/`` (a link to ``src/fedtune/experiments``); an installed
wheel has them inside the package, so ``fedtune run experiments/glue_sst2.toml`` (or ``fedtune run
glue_sst2``) works from any folder: a path that does not exist is looked up among the shipped files.
"""

from __future__ import annotations

from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "experiments"
"""The folder of the shipped experiment files (and ``sweeps/``)."""


def packaged_experiments() -> list[str]:
    """Names of the shipped experiment and sweep files, relative to :data:`PACKAGED` (e.g. ``sweeps/lora_seeds.toml``)."""
    return sorted(p.relative_to(PACKAGED).as_posix() for p in PACKAGED.rglob("*.toml"))


def resolve_experiment_file(name: str | Path) -> Path:
    """``name`` itself when it exists; else the shipped file it names; else ``name`` (whose loading then fails).

    ``experiments/glue_sst2.toml``, ``glue_sst2.toml`` and ``glue_sst2`` all name the shipped
    ``glue_sst2.toml``; ``sweeps/lora_seeds`` a shipped sweep.
    """
    path = Path(name)
    if path.exists():
        return path
    rel = path.as_posix()
    if rel.startswith("experiments/"):
        rel = rel[len("experiments/"):]
    for candidate in (PACKAGED / rel, PACKAGED / f"{rel}.toml"):
        if candidate.is_file() and PACKAGED in candidate.resolve().parents:
            return candidate
    return path
