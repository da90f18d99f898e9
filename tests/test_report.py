"""Reports: run/sweep folder discovery, the Markdown table, plots, partial and local-baseline records."""

from __future__ import annotations

import json

import pytest
import tomli_w

from fedtune import sweep as sw
from fedtune.cli import main
from fedtune.report import ReportError, build_report, find_runs, load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_kb: int = 15):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_kb * 1024, f"{path} is only {len(data)} bytes"


def fake_run(folder, config: dict, records: list[dict], summary: dict):
    """A run folder as run_experiment writes it (config.toml, metrics.jsonl, summary.json)."""
    folder.mkdir(parents=True)
    base = {"name": folder.name, "output_dir": str(folder), "seed": 0,
            "strategy": {"name": "fedavg", "mu": 0.0}, "partition": {"method": "iid", "alpha": 0.5}}
    for k, v in config.items():
        section, key = k.split(".")
        base[section][key] = v
    (folder / "config.toml").write_text(tomli_w.dumps(base))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps({"headline_metric": "accuracy", "rounds": 3, **summary}))
    return folder


def rounds(acc: dict[int, float], loss: list[float], div: list[float] | None = None, **extra):
    """Records for rounds 1..len(loss); eval keys only on the rounds in ``acc`` (0 = initial eval)."""
    out = []
    if 0 in acc:
        out.append({"round": 0, "clients": 0, "eval_accuracy": acc[0], **extra})
    for i, lo in enumerate(loss, 1):
        r = {"round": i, "clients": 3, "train_loss": lo, "bytes_up": 1000, "bytes_down": 2000, **extra}
        if i in acc:
            r["eval_accuracy"] = acc[i]
        if div is not None:
            r["divergence"] = div[i - 1]
        out.append(r)
    return out


@pytest.fixture
def sweep_dir(tmp_path):
    """A sweep folder with two federated runs (one with divergence) and one half-finished folder."""
    d = tmp_path / "sweep"
    fake_run(d / "fedavg_iid", {}, rounds({0: 0.3, 2: 0.7, 3: 0.65}, [1.0, 0.8, 0.6]),
             {"final_metrics": {"accuracy": 0.65, "loss": 0.9}, "best_accuracy": 0.7, "wall_time": 12.5,
              "bytes_up_total": 3000, "bytes_down_total": 6000})
    prox = {"strategy.name": "fedprox", "strategy.mu": 0.01, "partition.method": "dirichlet"}
    fake_run(d / "fedprox_dirichlet", prox,
             rounds({2: 0.5, 3: 0.6}, [1.1, 0.9, 0.7], div=[0.3, 0.2, 0.1]),
             {"final_metrics": {"accuracy": 0.6}, "best_accuracy": 0.6, "wall_time": 300.0,
              "bytes_up_total": 3_000_000, "bytes_down_total": 6_000_000})
    (d / "half").mkdir()
    (d / "half" / "config.toml").write_text("name = 'half'\n")
    return d


def test_table_shows_differing_keys_and_summary_values(sweep_dir):
    report = build_report([sweep_dir])
    assert report == sweep_dir / "report.md"
    text = report.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| run"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:4] == ["run", "strategy.name", "strategy.mu", "partition.method"]
    assert "name" not in cols and "output_dir" not in cols and "seed" not in cols and "partition.alpha" not in cols
    assert cols[4:] == ["final accuracy", "best accuracy", "rounds", "bytes up", "bytes down", "wall time",
                        "final divergence"]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")]
            for r in text.splitlines() if r.startswith("| fed")}
    assert rows["fedavg_iid"] == ["fedavg_iid", "fedavg", "0", "iid", "0.6500", "0.7000", "3",
                                  "3.0 kB", "6.0 kB", "12.5 s", "-"]
    assert rows["fedprox_dirichlet"] == ["fedprox_dirichlet", "fedprox", "0.01", "dirichlet", "0.6000", "0.6000",
                                         "3", "3.00 MB", "6.00 MB", "5.0 min", "0.1"]
    assert "`" + str(sweep_dir / "half") + "`" in text  # the unfinished folder is named, not reported
    for png in ("metric.png", "loss.png", "divergence.png"):
        assert f"]({png})" in text
        assert_png(sweep_dir / png)


def test_uplink_error_is_plotted_when_a_run_has_it(tmp_path):
    plain = fake_run(tmp_path / "plain", {}, rounds({2: 0.5}, [1.0, 0.9]),
                     {"final_metrics": {"accuracy": 0.5}, "best_accuracy": 0.5})
    topk = fake_run(tmp_path / "topk", {"strategy.mu": 0.1}, rounds({2: 0.45}, [1.0, 0.95], uplink_error=0.98),
                    {"final_metrics": {"accuracy": 0.45}, "best_accuracy": 0.45})
    text = build_report([plain, topk], out=tmp_path / "out").read_text()
    assert "## Uplink codec error by round" in text and "](uplink_error.png)" in text
    assert_png(tmp_path / "out" / "uplink_error.png")


def test_series_keep_only_rounds_with_the_key(sweep_dir):
    run = load_run(sweep_dir / "fedavg_iid")
    assert run.series("eval_accuracy") == ([0, 2, 3], [0.3, 0.7, 0.65])
    assert run.series("train_loss") == ([1, 2, 3], [1.0, 0.8, 0.6])
    assert run.series("divergence") == ([], [])
    assert run.final_divergence() is None
    assert load_run(sweep_dir / "fedprox_dirichlet").final_divergence() == 0.1


def test_no_divergence_no_divergence_plot_or_column(tmp_path):
    a = fake_run(tmp_path / "a", {}, rounds({1: 0.4, 2: 0.5}, [1.0, 0.9]),
                 {"final_metrics": {"accuracy": 0.5}, "best_accuracy": 0.5})
    b = fake_run(tmp_path / "b", {"strategy.mu": 0.1}, rounds({2: 0.55}, [1.0, 0.8]),
                 {"final_metrics": {"accuracy": 0.55}, "best_accuracy": 0.55})
    out = tmp_path / "report"
    text = build_report([a, b], out=out).read_text()
    assert "final divergence" not in text and "divergence.png" not in text
    assert not (out / "divergence.png").exists() and not (out / "uplink_error.png").exists()
    assert "| run | strategy.mu |" in text
    assert_png(out / "metric.png")
    assert_png(out / "loss.png")
    # With several folders and no --out, the report goes to their common parent.
    assert build_report([a, b]) == tmp_path / "report.md"


def test_local_baseline_lines_averaged_per_round(tmp_path):
    lines = (rounds({0: 0.3, 1: 0.5}, [1.0], client="client_000")
             + [r for r in rounds({1: 0.7}, [0.6], client="client_001")])
    run = fake_run(tmp_path / "local", {}, lines,
                   {"final_metrics": {"accuracy_mean": 0.6, "accuracy_min": 0.5}, "best_accuracy": 0.7})
    loaded = load_run(run)
    assert loaded.local
    assert loaded.series("eval_accuracy") == ([0, 1], [0.3, pytest.approx(0.6)])
    assert loaded.series("train_loss") == ([1], [pytest.approx(0.8)])
    text = build_report([run]).read_text()
    assert "0.6000 (client mean)" in text and "mean over clients" in text
    assert_png(run / "metric.png")


def test_same_run_names_in_two_sweeps_are_told_apart(tmp_path):
    for sweep in ("s1", "s2"):
        fake_run(tmp_path / sweep / "fedavg", {"strategy.mu": 0.1 if sweep == "s2" else 0.0},
                 rounds({1: 0.5}, [1.0]), {"final_metrics": {"accuracy": 0.5}, "best_accuracy": 0.5})
    text = build_report([tmp_path / "s1", tmp_path / "s2"]).read_text()
    assert "| s1/fedavg |" in text and "| s2/fedavg |" in text


def test_not_a_run_folder_is_an_error_naming_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="empty: neither a run folder"):
        find_runs([tmp_path / "empty"])
    assert main(["report", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: not a folder" in capsys.readouterr().err


def test_sweep_then_report_end_to_end(tiny_experiment, tmp_path, capsys):
    """Real tiny runs: eval only on round 2 (every=2) plus an initial round-0 eval."""
    exp = tiny_experiment("eval.every=2", "eval.initial=true", "federation.rounds=2")
    (tmp_path / "base.toml").write_text(exp.to_toml())
    spec = tmp_path / "s.toml"
    spec.write_text(f'base = "base.toml"\noutput_dir = "{tmp_path / "out"}"\n'
                    '[grid]\n"strategy.name" = ["fedavg", "fedprox"]\n'
                    '[[runs]]\nname = "prox_mu1"\nset = ["strategy.name=\\"fedprox\\"", "strategy.mu=1.0"]\n')
    records = sw.run_sweep(sw.load_sweep(spec), quiet=True)
    assert [r["status"] for r in records] == ["finished"] * 3

    assert main(["report", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| run | strategy.name | strategy.mu |" in text and "report written to" in printed
    for name in ("fedavg", "fedprox", "prox_mu1"):
        summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
        row = next(r for r in text.splitlines() if r.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == f"{summary['final_metrics']['accuracy']:.4f}"
        assert cells[4] == f"{summary['best_accuracy']:.4f}"
        run = load_run(tmp_path / "out" / name)
        assert run.series("eval_accuracy")[0] == [0, 2]  # round 1 had no evaluation
    assert_png(tmp_path / "out" / "metric.png")
    assert_png(tmp_path / "out" / "loss.png")


def test_key_missing_from_an_older_run_compares_as_its_default(tmp_path):
    """A run saved before a config key existed ran with its default: not a difference."""
    from fedtune.report import label_runs

    old = fake_run(tmp_path / "old", {"strategy.name": "fedavg"}, rounds({1: 0.5}, [1.0]), {"wall_time": 1})
    new = fake_run(tmp_path / "new", {"strategy.name": "fedprox", "partition.min_examples": 10},
                   rounds({1: 0.6}, [0.9]), {"wall_time": 1})
    other = fake_run(tmp_path / "other", {"strategy.name": "fedprox", "partition.min_examples": 3},
                     rounds({1: 0.6}, [0.9]), {"wall_time": 1})
    assert label_runs([load_run(old), load_run(new)]) == ["strategy.name"]  # 10 is the default
    runs = [load_run(old), load_run(other)]
    assert label_runs(runs) == ["strategy.name", "partition.min_examples"]
    assert runs[0].differs["partition.min_examples"] == 10


def test_int_and_float_of_one_value_do_not_differ_and_long_labels_become_names(tmp_path):
    from fedtune.report import MAX_LABEL, label_runs

    a = fake_run(tmp_path / "a", {"strategy.mu": 1}, rounds({1: 0.5}, [1.0]), {"wall_time": 1})
    b = fake_run(tmp_path / "b", {"strategy.mu": 1.0}, rounds({1: 0.5}, [1.0]), {"wall_time": 1})
    assert label_runs([load_run(a), load_run(b)]) == []
    long = "x" * (MAX_LABEL + 5)
    c = fake_run(tmp_path / "c", {"strategy.name": long}, rounds({1: 0.5}, [1.0]), {"wall_time": 1})
    runs = [load_run(a), load_run(c)]
    label_runs(runs)
    assert [r.label for r in runs] == ["a", "c"]
