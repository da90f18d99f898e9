"""Tiny tracked federations for the tracking tests (the tiny model and CSV data of conftest.py: seconds)."""

from __future__ import annotations

from pathlib import Path

from fedtune.config import Experiment


def tiny_tracked(model_dir: Path, csv: tuple[Path, Path], out: Path, *overrides: str) -> Experiment:
    """A 2-round, 3-client federation on the tiny model, writing to ``out``; ``overrides`` on top."""
    train, evalf = csv
    return Experiment.from_overrides([
        f'model.name="{model_dir}"', 'data.dataset="files"', f'data.train_file="{train}"', f'data.eval_file="{evalf}"',
        'data.text_column="text"', 'data.label_column="label"', "data.max_length=16", "partition.num_clients=3",
        'partition.method="iid"', "partition.min_examples=5", "federation.rounds=2", "train.batch_size=16",
        "train.lr=0.02", "train.epochs=1", "train.max_steps=2", "model.lora.r=4", "eval.initial=true", 'name="tracked"',
        f'output_dir="{out}"', *overrides,
    ])


def numeric_keys(records: list[dict]) -> set[str]:
    """The metrics.jsonl keys a tracker logs: int/float values (not bools), not the round itself."""
    return {k for r in records for k, v in r.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}
