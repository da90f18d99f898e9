"""The imbalanced-task study of docs/guides/metrics.md: SMS Spam judged by accuracy and by F1 of spam.

    FEDTUNE_DATA_DIR=../shared/data python scripts/imbalanced_study.py [--rounds 3] [--train-size N] [--out runs/imbalanced]

Splits ``$FEDTUNE_DATA_DIR/sms_spam/SMSSpamCollection`` (5,574 messages, 747 spam) 80/20, stratified and
seeded, into ``runs/sms_spam_data/{train,eval}.tsv``; runs ``experiments/sms_spam_imbalanced.toml`` (MiniLM
LoRA, 4 Dirichlet clients) once as written and once with ``train.lr`` a tenth, the undertrained model that
accuracy flatters; writes ``fedtune report`` over both into ``--out`` and prints each run's accuracy beside
its F1 of spam.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from fedtune.config import Experiment
from fedtune.experiment import run_experiment
from fedtune.report import build_report
from fedtune.tasks.data import data_dir


def write_split(folder: Path, seed: int = 0) -> tuple[int, int, float]:
    """The stratified 80/20 split as TSV files with a header; (train rows, eval rows, spam share of eval)."""
    root = data_dir()
    if root is None or not (root / "sms_spam" / "SMSSpamCollection").is_file():
        raise SystemExit("set FEDTUNE_DATA_DIR to the folder holding sms_spam/SMSSpamCollection")
    lines = (root / "sms_spam" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()
    rows = [tuple(line.split("\t")) for line in lines if line]
    rng = random.Random(seed)
    train, evals = [], []
    for label in ("ham", "spam"):
        group = [(lab, text) for lab, text in rows if lab == label]
        rng.shuffle(group)
        cut = int(round(0.8 * len(group)))
        train += group[:cut]
        evals += group[cut:]
    rng.shuffle(train)
    rng.shuffle(evals)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.tsv", train), ("eval.tsv", evals)):
        (folder / name).write_text("label\ttext\n" + "".join(f"{lab}\t{text}\n" for lab, text in part),
                                   encoding="utf-8")
    return len(train), len(evals), sum(lab == "spam" for lab, _ in evals) / len(evals)


def main() -> None:
    """Split, run both configurations, report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=0, help="stratified subset of the training rows (0: all 4,460)")
    ap.add_argument("--out", default="runs/imbalanced")
    args = ap.parse_args()
    n_train, n_eval, share = write_split(Path("runs/sms_spam_data"))
    print(f"split: {n_train} train, {n_eval} eval rows, spam {share:.1%} of eval")
    out = Path(args.out)
    runs = []
    for name, extra in (("lr-1e-3", []), ("lr-1e-4", ["train.lr=1e-4"])):
        exp = Experiment.from_toml("experiments/sms_spam_imbalanced.toml", [
            f"federation.rounds={args.rounds}", f"data.train_size={args.train_size}", f'output_dir="{out / name}"',
            f'name="{name}"', *extra])
        result = run_experiment(exp, quiet=True, overwrite=True)
        runs.append(result.output_dir)
        f = result.final_metrics
        print(f"{name}: accuracy {f['accuracy']:.4f}  f1(spam) {f['f1']:.4f}  precision {f['precision']:.4f}  "
              f"recall {f['recall']:.4f}  macro_f1 {f['macro_f1']:.4f}  matthews {f['matthews']:.4f}  "
              f"auroc {f['auroc']:.4f}  wall {result.summary['wall_time']:.0f}s")
        print(json.dumps(result.summary["task_details"]["classes"]["eval"]["confusion_matrix"]))
    print("report:", build_report(runs, out))


if __name__ == "__main__":
    main()
