"""Command line: a thin layer over the library (``fedtune run``, ``fedtune partition``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedtune import __version__
from fedtune.cli_federation import cmd_node, cmd_server, cmd_status
from fedtune.config import ConfigError, Experiment, default_experiment
from fedtune.errors import (
    CheckpointError,
    CredentialsError,
    DataError,
    FlowerRunError,
    HumanEvalError,
    MergeError,
    ModelLoadError,
    NodeConfigError,
    OperatorError,
    PartitionError,
    PredictError,
    one_line,
)
from fedtune.memory import configure_allocator

# Parsing arguments and answering --help import no heavy library (torch, transformers, flwr): each command
# imports what it uses when it runs; the errors the CLI turns into one line live in fedtune.errors.


def _load(args: argparse.Namespace) -> Experiment:
    overrides = list(args.set or [])
    if getattr(args, "output", None):
        overrides.append(f"output_dir={_toml_str(args.output)}")
    if args.config:
        from fedtune.experiment_files import resolve_experiment_file

        return Experiment.from_toml(resolve_experiment_file(args.config), overrides)
    return Experiment.from_overrides(overrides, base=default_experiment())


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_run(args: argparse.Namespace) -> int:
    """Run an experiment (the defaults when no file is given)."""
    from fedtune.experiment import run_experiment

    if args.resume:  # continue a killed run from its checkpoint (same configuration; see fedtune.checkpoint)
        from fedtune.checkpoint import resume_experiment

        if args.output:
            raise ConfigError("--resume OUT_DIR continues the run in OUT_DIR; drop --output")
        if args.overwrite:
            raise ConfigError("--resume continues the run in OUT_DIR and --overwrite replaces it: give one")
        exp = resume_experiment(args.resume, args.config, list(args.set or []))
        args.run_dir = exp.resolved_output_dir  # (the resume hint if interrupted)
        run_experiment(exp, quiet=args.quiet, resume=True)
        return 0
    exp = _load(args)
    args.run_dir = exp.resolved_output_dir  # (the resume hint if interrupted)
    run_experiment(exp, quiet=args.quiet, overwrite=args.overwrite)
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    """Partition an experiment's training set and write the manifests, without training."""
    from fedtune.models import load_tokenizer
    from fedtune.shards import make_shards
    from fedtune.tasks.classification_task import classification_units
    from fedtune.tasks.data import load_task_data
    from fedtune.tasks.registry import build_task, task_kind

    exp = _load(args)
    if task_kind(exp) == "classification":  # no tokenizer needed
        data = load_task_data(exp.data, seed=exp.seed)
        units, name = classification_units(data), data.name
    else:
        task = build_task(exp, load_tokenizer(exp.model.name, exp.model.gguf_file))
        units, name = task.units, task.name
    out = Path(args.out) if args.out else exp.resolved_output_dir
    shards = make_shards(exp, units, name, out)
    sizes = [len(s) for s in shards]
    print(f"{len(shards)} clients, sizes min {min(sizes)} / max {max(sizes)}; manifests in {out / 'partition'}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved configuration as TOML."""
    print(_load(args).to_toml(), end="")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run (or with --dry-run, list) a grid of experiments; exit 1 when any run failed."""
    from fedtune import sweep as sw

    if args.sweep_file:
        from fedtune.experiment_files import resolve_experiment_file

        spec = sw.load_sweep(resolve_experiment_file(args.sweep_file))
    elif args.grid or args.run_set:
        spec = sw.Sweep(base=None, output_dir=Path("runs") / "sweep", source="--grid")
    else:
        raise ConfigError("fedtune sweep: give a sweep file, or --grid key=v1,v2 (with --base FILE)")
    if args.base:
        spec.base = Path(args.base).resolve()
    for item in args.grid or []:
        key, values = sw.parse_grid_arg(item)
        spec.grid[key] = values
    spec.common += list(args.run_set or [])
    if args.output:
        spec.output_dir = Path(args.output)
    if args.dry_run:
        runs = sw.plan(spec)
        sw.describe(runs, spec)
        print(f"(dry run: nothing started; outputs would go to {spec.output_dir})")
        return 0
    records = sw.run_sweep(spec, quiet=args.quiet)
    return 1 if any(r["status"] == "failed" for r in records) else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write report.md and plots comparing run folders and sweep folders."""
    from fedtune.report import ReportError, build_report

    try:
        path = build_report(args.dirs, args.out)
    except ReportError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 1
    print(path.read_text().split("\n## ", 1)[0].rstrip())
    print(f"\nreport written to {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's model (merged / int8 / onnx / onnx-int8) and score every format side by side."""
    from fedtune.artifacts import ModelMeta, model_folder
    from fedtune.export import FORMATS, evaluate_exports, export_run, write_export_report

    formats = list(FORMATS) if "all" in args.format else list(dict.fromkeys(args.format))
    out = Path(args.out) if args.out else Path(args.run_dir) / "export"
    written = export_run(args.run_dir, formats, out, int8_scope=args.int8_scope)
    for fmt, folder in written.items():
        print(f"{fmt}: {folder}")
    if args.no_eval:
        return 0
    rows = evaluate_exports(args.run_dir, written, latency_examples=args.latency_examples)
    meta = ModelMeta.read(model_folder(args.run_dir))
    headline = {"qa": "f1", "multilabel": "micro_f1", "causal_lm": "perplexity"}.get(meta.task, "accuracy")
    print(write_export_report(rows, out, headline), end="")
    print(f"table written to {out / 'export_table.md'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict with a run's model or an export; one JSON line per input on stdout (or --out)."""
    import json

    from fedtune.predict import Predictor

    predictor = Predictor(args.model, max_new_tokens=args.max_new_tokens)
    rows: list[dict] = []
    if args.file:
        from fedtune.tasks.data import read_json_lines

        rows += read_json_lines(Path(args.file))
    rows += [{"text": t} for t in args.text or []]
    if args.question or args.context:
        rows.append({"question": args.question or "", "context": args.context or ""})
    rows += [{"prompt": p} for p in args.prompt or []]
    rows += [{"instruction": i} for i in args.instruction or []]
    if not rows:
        raise PredictError("nothing to predict: give --text, --file, --question/--context, --prompt or --instruction")
    sink = open(args.out, "w") if args.out else sys.stdout
    try:
        for result in predictor.predict(rows):
            sink.write(json.dumps(result, ensure_ascii=False) + "\n")
    finally:
        if args.out:
            sink.close()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a causal LM on a benchmark (HumanEval pass@k): a run, an export, or a base model by name."""
    import json

    from fedtune.humaneval import evaluate_humaneval

    model, tokenizer, what = _causal_lm_for_evaluation(args.model)
    result = evaluate_humaneval(model, tokenizer, limit=args.limit, samples=args.samples,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                batch_size=args.batch_size, timeout=args.timeout, seed=args.seed,
                                allow_network=args.allow_network, prompt_format=args.prompt_format)
    scores = ", ".join(f"pass@{k} {v:.4f}" for k, v in result.pass_at.items())
    print(f"HumanEval ({args.prompt_format} prompts), {result.problems} problems x {result.samples} sample(s), "
          f"{what}: {scores}")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(json.dumps({"benchmark": "humaneval", "model": args.model, "prompt_format": args.prompt_format,
                                 "problems": result.problems,
                                 "samples": result.samples, "pass_at": result.pass_at}) + "\n")
            for r in result.records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return 0


def _causal_lm_for_evaluation(name: str):
    """(model, tokenizer, description) of a run / model folder / export, else of a base model by name."""
    from fedtune.artifacts import META_FILE, load_for_inference
    from fedtune.config import ModelConfig
    from fedtune.models import load_model, load_tokenizer

    path = Path(name)
    if (path / META_FILE).is_file() or (path / "model" / META_FILE).is_file():
        model, tokenizer, meta = load_for_inference(name)
        if meta.task != "causal_lm":
            raise ConfigError(f"{name} is a {meta.task} model; HumanEval scores a causal LM")
        return model, tokenizer, f"{meta.format} model of {meta.base_model}"
    model = load_model(ModelConfig(name=name, mode="full"), "causal_lm", seed=0).eval()
    return model, load_tokenizer(name), f"base model {name}"


def cmd_merge(args: argparse.Namespace) -> int:
    """Fuse trained peft LoRA adapters into one (svd, fedit, ffa or flora); write it with merge_manifest.json."""
    from fedtune.lora_merge import MergeError, merge_adapters, read_manifest_sizes

    if args.weights and args.manifests:
        raise MergeError("give --weights or --manifests, not both")
    weights = args.weights or (read_manifest_sizes(args.manifests) if args.manifests else None)
    manifest = merge_adapters(args.adapters, args.out, rule=args.rule, rank=args.rank, weights=weights)
    kept = manifest["energy_kept"]
    print(f"merged {len(args.adapters)} adapters with {args.rule} at rank {manifest['rank']}"
          + (f", singular-value energy kept {kept:.4f}" if kept is not None else "") + f"; written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``fedtune`` argument parser."""
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", nargs="?", help="experiment TOML file (defaults when omitted)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. federation.rounds=3")

    p = sub.add_parser("run", help="run an experiment")
    add_config_args(p)
    p.add_argument("--output", help="output folder (default runs/<name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    p.add_argument("--resume", metavar="OUT_DIR",
                   help="continue the run in OUT_DIR from its last checkpoint (its config, or FILE/--set, must match)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in the output folder (without it such a folder is refused)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("partition", help="partition the training set and write client manifests")
    add_config_args(p)
    p.add_argument("--out", help="folder for partition/ (default the experiment's output folder)")
    p.set_defaults(fn=cmd_partition)

    p = sub.add_parser("node", help="check this site's data, then join a federation as a Flower SuperNode")
    p.add_argument("config", help="the federation's experiment TOML file (the one the server runs)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, as the server's run does")
    p.add_argument("--superlink", default="", help="the SuperLink's address HOST:PORT (from `fedtune server`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--train-file", help="this site's training rows, in the experiment's [data] format")
    src.add_argument("--manifest", help="a client_NNN.json from `fedtune partition` (rows of the experiment's data)")
    p.add_argument("--client-id", help="this site's client id (required with --train-file; default the manifest's)")
    p.add_argument("--data-dir", help="FEDTUNE_DATA_DIR for this node (GLUE / AG News layouts)")
    p.add_argument("--root-certificates", default="", help="the federation's CA certificate (TLS)")
    p.add_argument("--auth-key", default="", help="this node's private key (SuperNode authentication)")
    p.add_argument("--insecure", action="store_true", help="no TLS (a local test only)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: every core; split cores between "
                                                          "nodes sharing a machine)")
    p.add_argument("--require-secagg", action="store_true", help="train only in SecAgg+ rounds")
    p.add_argument("--port", type=int, default=0, help="the node's local Runtime API port (default: a free one)")
    p.add_argument("--check", action="store_true", help="check the data and stop; do not join")
    p.set_defaults(fn=cmd_node)

    p = sub.add_parser("server", help="start a Flower SuperLink with TLS and node authentication; print the "
                                      "command each site runs")
    p.add_argument("credentials", help="credentials folder (made on first use: CA, server certificate, site keys)")
    p.add_argument("--host", action="append", help="a name or IP the sites reach this server at (in the certificate; "
                                                    "repeatable; the first is printed)")
    p.add_argument("--site", action="append", help="a site's name: makes its key pair if missing (repeatable)")
    p.add_argument("--port", type=int, default=9092, help="the SuperLink's port (SuperNodes and runs)")
    p.add_argument("--bind", default="", help="address to listen on (0.0.0.0 for other machines; default Flower's)")
    p.add_argument("--experiment", default="", help="the experiment file, for the printed commands")
    p.add_argument("--no-auth", action="store_true", help="TLS only: admit any node that trusts the CA")
    p.set_defaults(fn=cmd_server)

    p = sub.add_parser("status", help="the federation's nodes, runs and a run's last round")
    p.add_argument("credentials", help="the credentials folder of `fedtune server`")
    p.add_argument("--superlink", default="127.0.0.1:9092", help="the SuperLink's address")
    p.add_argument("--run", help="a run folder: print its last round from metrics.jsonl")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("config", help="print the resolved configuration")
    add_config_args(p)
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("sweep", help="run a grid of experiments (resumable)")
    p.add_argument("sweep_file", nargs="?", help="sweep TOML file (base, output_dir, [grid], [[runs]])")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="add a grid axis, e.g. strategy.name=fedavg,fedprox")
    p.add_argument("--set", dest="run_set", action="append", metavar="KEY=VALUE", help="override applied to every run")
    p.add_argument("--base", help="base experiment file (overrides the sweep file's; default experiment when none)")
    p.add_argument("--output", help="sweep output folder (default the file's output_dir, or runs/<sweep name>)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their overrides; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-run tables")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("report", help="Markdown table and plots comparing runs")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run folders and/or sweep folders")
    p.add_argument("--out", help="where report.md and the PNGs go (default the folder given, or the common parent)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("export", help="merged / INT8 / ONNX exports of a run, with a size-metric-latency table")
    p.add_argument("run_dir", help="a run folder (has config.toml and model/)")
    p.add_argument("--format", action="append", choices=["merged", "int8", "onnx", "onnx-int8", "all"],
                   required=True, help="repeat for several; 'all' for every format")
    p.add_argument("--out", help="export folder (default RUN_DIR/export)")
    p.add_argument("--no-eval", action="store_true", help="write the exports only; skip the table")
    p.add_argument("--int8-scope", choices=["all", "attention"], default="all",
                   help="int8: quantize every Linear layer, or the attention projections only")
    p.add_argument("--latency-examples", type=int, default=50, help="examples timed one by one per format")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("merge", help="fuse trained LoRA adapters into one peft adapter (svd, fedit, ffa, flora)")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="peft adapter folders (e.g. runs/x/model)")
    p.add_argument("--rule", default="svd", help="svd | fedit | ffa | flora (fedex and fedsa give no single adapter)")
    p.add_argument("--rank", type=int, help="rank of the merged adapter (required for svd)")
    p.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per adapter (default equal)")
    p.add_argument("--manifests", nargs="+", metavar="M.json", help="client manifests: weight by their 'size'")
    p.add_argument("--out", required=True, help="folder for the merged adapter and merge_manifest.json")
    p.set_defaults(fn=cmd_merge)

    p = sub.add_parser("predict", help="run a trained model or an export on new inputs (JSON lines out)")
    p.add_argument("model", help="a run folder, its model/ folder, or an export folder")
    p.add_argument("--text", action="append", help="text to classify (repeatable)")
    p.add_argument("--file", help="JSON lines input: text / text_pair, question + context, prompt or instruction")
    p.add_argument("--question", help="QA: the question")
    p.add_argument("--context", help="QA: the context")
    p.add_argument("--prompt", action="append", help="causal LM: a prompt to continue, used as given (repeatable)")
    p.add_argument("--instruction", action="append",
                   help="causal LM: an instruction, wrapped in the training template (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="causal LM: tokens to generate")
    p.add_argument("--out", help="write JSON lines here instead of stdout")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("evaluate", help="score a causal LM on a benchmark (HumanEval pass@k)")
    p.add_argument("model", help="a run folder, its model/ folder, an export, or a base model "
                                 "(embedded-llm, a model folder, a hub id, a .gguf file)")
    p.add_argument("--benchmark", choices=["humaneval"], default="humaneval", help="the benchmark")
    p.add_argument("--limit", type=int, default=0, help="score the first N problems only (0 = all 164)")
    p.add_argument("--samples", type=int, default=1, help="completions per problem (pass@k for k <= samples)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples (needed for samples > 1)")
    p.add_argument("--prompt-format", choices=["raw", "chat"], default="raw",
                   help="raw: the model continues the problem's code (the HumanEval protocol); chat: the problem in "
                        "a user turn of the model's chat template, the answer's code block run (instruct models)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds each program may run")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--allow-network", action="store_true",
                   help="run the generated code even where no network namespace can be made (it could reach "
                        "the network)")
    p.add_argument("--out", help="write the scores and every completion with its outcome here (JSON lines)")
    p.set_defaults(fn=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedtune`` console script."""
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.WARNING if quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        configure_allocator()  # FEDTUNE_ALLOCATOR=bounded: freed tensors go back to the OS (fedtune.memory)
        return args.fn(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        out = getattr(args, "run_dir", None)
        hint = f"; continue it with `fedtune run --resume {out}`" if out is not None and (
            Path(out) / "checkpoint").is_dir() else ""
        print(f"fedtune: interrupted{hint}", file=sys.stderr)
        return 130
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"fedtune: config error: {exc}", file=sys.stderr)
        return 2
    except (DataError, PartitionError, ModelLoadError, PredictError, CheckpointError, MergeError, HumanEvalError,
            FlowerRunError, NodeConfigError, CredentialsError, OperatorError, ConnectionError, TimeoutError,
            OSError) as exc:
        # These carry messages that name the file, field, value or address; a traceback would add nothing.
        if args.debug:
            raise
        print(f"fedtune: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """The error's message on one line (an OSError without one is named by its errno text and file)."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror and exc.filename and exc.strerror not in text:
        text = f"{exc.filename}: {exc.strerror}"
    return one_line(text) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
