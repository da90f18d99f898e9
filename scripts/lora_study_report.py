"""Table and plot of the LoRA rank x rule x bytes study (experiments/sweeps/lora_rank_study.toml).

    python scripts/lora_study_report.py runs/lora_rank_study --out docs/img

Reads every run's ``metrics.jsonl`` and ``summary.json`` (runs named ``r<rank>_<rule>``), prints a
Markdown table (accuracy after round 2, final and best accuracy, exact bytes per client per round each way, the mean
``lora_gap``, the SVD energy kept) and writes ``lora_accuracy_vs_bytes.png``: final accuracy against
the bytes a client uploads per round (left) and moves both ways (right), one line per rule,
points labelled by rank.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RULES = ["fedit", "svd", "ffa", "fedsa", "fedex", "flora"]


def load_runs(root: Path) -> list[dict]:
    """One record per finished run: rule, rank, accuracies, bytes per client per round, gaps, time."""
    out = []
    for d in sorted(root.iterdir()):
        m = re.fullmatch(r"r(\d+)_(\w+)", d.name)
        if not m or not (d / "summary.json").is_file():
            continue
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        summary = json.loads((d / "summary.json").read_text())
        accs = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
        clients = sum(r["clients_aggregated"] for r in rows)
        energy = [r["lora_energy_kept"] for r in rows if "lora_energy_kept" in r]
        out.append({
            "rank": int(m.group(1)), "rule": m.group(2), "final": accs[-1], "best": max(accs),
            "round2": next((r["eval_accuracy"] for r in rows if r["round"] == 2 and "eval_accuracy" in r), None),
            "last3": sum(accs[-3:]) / len(accs[-3:]),
            "up": sum(r["bytes_up"] for r in rows) / clients,
            "down": sum(r["bytes_down"] for r in rows) / clients,
            "gap": sum(r["lora_gap"] for r in rows) / len(rows),
            "energy": min(energy) if energy else None, "seconds": summary["wall_time"],
        })
    return out


def markdown(runs: list[dict]) -> str:
    """The long table (one row per run), ordered by rule then rank."""
    lines = ["| rule | rank | acc after round 2 | final acc | best acc | mean of last 3 | bytes up / client / round | "
             "bytes down / client / round | mean lora_gap | min energy kept | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (RULES.index(r["rule"]) if r["rule"] in RULES else 99, r["rank"])):
        energy = f"{r['energy']:.4f}" if r["energy"] is not None else "—"
        r2 = f"{r['round2']:.4f}" if r["round2"] is not None else "—"
        lines.append(f"| {r['rule']} | {r['rank']} | {r2} | {r['final']:.4f} | {r['best']:.4f} | {r['last3']:.4f} | "
                     f"{r['up']:,.0f} | {r['down']:,.0f} | {r['gap']:.2e} | {energy} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Final accuracy against bytes per client per round: uploaded (left), both ways (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, (key, xlabel) in zip(axes, [("up", "kB uploaded per client per round"),
                                        ("both", "kB up + down per client per round")], strict=True):
        for rule in RULES:
            pts = sorted((r for r in runs if r["rule"] == rule), key=lambda r: r["rank"])
            if not pts:
                continue
            xs = [(p["up"] if key == "up" else p["up"] + p["down"]) / 1e3 for p in pts]
            ax.plot(xs, [p["final"] for p in pts], marker="o", label=rule)
            for x, p in zip(xs, pts, strict=True):
                ax.annotate(f"r{p['rank']}", (x, p["final"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel + " (exact, float32 safetensors)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("final accuracy (SST-2 dev)")
    axes[0].legend()
    fig.suptitle("LoRA aggregation rules: accuracy vs bytes (MiniLM-L6, 8 Dirichlet(0.3) clients, 5 rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNG (default: root)")
    args = ap.parse_args()
    runs = load_runs(args.root)
    if not runs:
        raise SystemExit(f"no finished r<rank>_<rule> runs under {args.root}")
    print(markdown(runs))
    print(f"\n{len(runs)} runs, total wall time {sum(r['seconds'] for r in runs) / 60:.1f} min")
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / "lora_accuracy_vs_bytes.png")
    print(f"plot: {out / 'lora_accuracy_vs_bytes.png'}")


if __name__ == "__main__":
    main()
