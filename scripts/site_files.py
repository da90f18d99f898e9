"""Cut site files for the README's "One command per site" walk-through from the shared AG News rows.

    python scripts/site_files.py OUT_DIR [--rows 300]

Writes ``site_a.csv`` and ``site_b.csv`` (columns ``text,label``; disjoint, seeded shuffles of
``$FEDTUNE_DATA_DIR/ag_news/train_subset_alps_10k.tsv``) and two broken files a site might have:
``site_b_broken.csv`` (the text column is called ``body``) and ``site_b_labels.csv`` (one row labelled
``Science``, not one of the experiment's label names).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=300)
    args = ap.parse_args()
    src = Path(os.environ.get("FEDTUNE_DATA_DIR", "../shared/data")) / "ag_news" / "train_subset_alps_10k.tsv"
    rows = [line.rstrip("\n").split("\t") for line in src.read_text().splitlines()]
    rows = [r for r in rows if len(r) == 2]
    random.Random(0).shuffle(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.rows
    files = {"site_a.csv": (["text", "label"], rows[:n]), "site_b.csv": (["text", "label"], rows[n:2 * n]),
             "site_b_broken.csv": (["body", "label"], rows[n:n + 10]),
             "site_b_labels.csv": (["text", "label"], rows[n:n + 10] + [["a new planet was found", "Science"]])}
    for name, (header, body) in files.items():
        with open(out / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(body)
        print(f"{out / name}: {len(body)} rows")


if __name__ == "__main__":
    main()
