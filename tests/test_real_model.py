"""Integration: the real embedded MiniLM-L6, federated LoRA on a small AG News slice."""

from conftest import shared_data_or_skip

from fedtune.config import Experiment, default_experiment
from fedtune.experiment import run_experiment


def test_minilm_federated_lora_beats_untrained_model(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_DATA_DIR", str(shared_data_or_skip()))
    exp = Experiment.from_overrides(
        [
            "data.train_size=320", "data.eval_size=400", "partition.num_clients=2", "partition.method=iid",
            "federation.rounds=1", "eval.initial=true", f'output_dir="{tmp_path}"',
        ],
        base=default_experiment(),
    )
    res = run_experiment(exp, quiet=True)
    untrained = res.history[0]
    trained = res.history[-1]
    assert untrained["round"] == 0 and trained["round"] == 1
    # Up and down carry the same tensors (LoRA factors + head), so the same encoded size.
    assert trained["bytes_up"] == trained["bytes_down"] > 2 * 800_000
    # 4 balanced classes: the untrained head is near chance; one round of LoRA must beat it clearly.
    assert trained["eval_accuracy"] > untrained["eval_accuracy"] + 0.15, (untrained, trained)
    assert trained["eval_accuracy"] > 0.5
