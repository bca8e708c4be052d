"""Cache policies in the trace-driven simulator on a shipped model's held-out text.

For each model: a trace of held-out text (the first ``--files`` held-out stdlib files of
``moe_infer.traces.corpus``, at most ``--eval-tokens`` tokens) and a training trace (every 2nd
training-split file, ``--train-tokens``), both recorded as in ``moe-infer bench predictors`` (MoE
inputs and the embedding as features); the predictors of ``--predictors`` are trained on the
training trace (``oracle``: the held-out trace's own future, a share ``--oracle-noise`` of its
(token, layer) predictions replaced by random scores). Then ``moe_infer.cache.simulate`` replays
the held-out trace through one cache per run, at each capacity of ``--capacities`` (fractions of
a layer's experts, slots per MoE layer):
- demand loading: ``lru``, ``lfu``, ``static`` (pins the experts the training trace used most),
  ``belady`` (the offline optimum of demand loading: most hits and fewest loads of them all);
- for each predictor P, prefetching P's top-K one MoE layer ahead: ``lru + P`` and
  ``expertflow + P`` (evicts what P predicts least).
Writes ``cache.json`` and ``cache.md`` to ``--out`` (default ``bench/results`` under the current
directory).

    moe-infer bench cache                                   # both models, a few minutes on 1 core
    moe-infer bench cache --models tiny-mixtral --capacities 0.5 --predictors markov oracle

(``python scripts/bench_cache.py ...`` is the same.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from moe_infer.errors import ConfigError
from moe_infer.helpformat import HelpFormatter

RESULTS = Path("bench") / "results"  # under the current directory
DEMAND = ("lru", "lfu", "static", "belady")
PREFETCHING = ("lru", "expertflow")


def parse_args(argv: list[str] | None, prog: str | None) -> argparse.Namespace:
    from moe_infer.predictors import PREDICTORS

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny-mixtral", "tiny-deepseek"],
                        help="shipped models (moe_infer.assets)")
    parser.add_argument("--files", type=int, default=5, help="held-out stdlib files the held-out trace reads")
    parser.add_argument("--eval-tokens", type=int, default=12_000, help="tokens of the held-out trace")
    parser.add_argument("--train-tokens", type=int, default=60_000, help="tokens of the training trace")
    parser.add_argument("--capacities", nargs="+", type=float, default=[0.25, 0.5, 0.75],
                        help="cache slots per MoE layer as fractions of the layer's experts")
    parser.add_argument("--predictors", nargs="*", default=["markov", "gate-lookahead", "expertflow", "oracle"],
                        help=f"predictors driving prefetch: {', '.join(PREDICTORS)}, oracle")
    parser.add_argument("--oracle-noise", type=float, default=0.3,
                        help="share of the oracle's (token, layer) predictions replaced by random scores")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of learned predictors")
    parser.add_argument("--max-seconds", type=float, default=None, help="training time limit per learned predictor")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/moe_infer_bench_cache"),
                        help="where the traces are recorded (reused when present)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of cache.json and cache.md")
    args = parser.parse_args(argv)
    args.command = " ".join([parser.prog, *(sys.argv[1:] if argv is None else argv)])
    for name, value in (("--files", args.files), ("--eval-tokens", args.eval_tokens),
                        ("--train-tokens", args.train_tokens), ("--epochs", args.epochs)):
        if value < 1:
            raise ConfigError(f"{name} {value}: expected a positive number")
    if not args.capacities or any(not 0.0 < c <= 1.0 for c in args.capacities):
        raise ConfigError(f"--capacities {args.capacities}: expected fractions in (0, 1] of a layer's experts")
    unknown = [p for p in args.predictors if p != "oracle" and p not in PREDICTORS]
    if unknown:
        raise ConfigError(f"--predictors {' '.join(unknown)}: unknown; predictors are {', '.join(PREDICTORS)}, oracle")
    return args


def run_model(model_name: str, args: argparse.Namespace, report=lambda result: None) -> dict:
    """Every run of one model; ``report(result)`` gets the partial result after each finished row."""
    import moe_infer
    import moe_infer.assets
    from moe_infer.benchmarks.predictors import LEARNED, corpora, record
    from moe_infer.cache.simulate import TraceOracle, simulate
    from moe_infer.traces.corpus import stdlib_root
    from tqdm.auto import tqdm

    from moe_infer.predictors import train
    from moe_infer.predictors.progress import training_progress

    model, _ = moe_infer.assets.load_model(model_name)
    moe_infer.wrap(model)
    texts = corpora()
    held_files = texts["heldout"][:args.files]
    heldout = record(model_name, model, f"heldout-{args.files}-files-{args.eval_tokens}", held_files, args.work_dir,
                     args.eval_tokens)
    training = record(model_name, model, f"train-{args.train_tokens}", texts["train"], args.work_dir,
                      args.train_tokens)
    result = {"model": model_name, "num_experts": heldout.num_experts, "top_k": heldout.top_k,
              "moe_layers": list(heldout.moe_layers),
              "traces": {"heldout": {"tokens": heldout.num_tokens, "sequences": heldout.num_sequences,
                                     "files": [path.relative_to(stdlib_root()).as_posix() for path in held_files]},
                         "train": {"tokens": training.num_tokens, "sequences": training.num_sequences}},
              "predictors": {}, "runs": []}
    predictors = {}
    for name in args.predictors:
        start = time.perf_counter()
        if name == "oracle":
            predictors[name] = TraceOracle(args.oracle_noise)
            result["predictors"][name] = {"kind": "oracle", "options": {"noise": args.oracle_noise}}
            continue
        options = {"model": model} if name == "gate-lookahead" else {}
        if name in LEARNED:
            options.update(epochs=args.epochs, max_seconds=args.max_seconds)
        with training_progress(f"{model_name} {name}"):
            predictors[name] = train(name, training, **options)
        result["predictors"][name] = {"kind": name, "train_seconds": time.perf_counter() - start,
                                      "options": {k: v for k, v in predictors[name].options.items() if k != "model"}}
    moe_infer.unwrap(model)

    capacities = sorted({max(1, round(fraction * heldout.num_experts)) for fraction in args.capacities})
    result["capacities"] = capacities
    rows = [(policy, policy, None) for policy in DEMAND] + [
        (f"{policy} + {name}", policy, name) for name in predictors for policy in PREFETCHING]
    progress = tqdm(total=len(capacities) * len(rows), desc=f"{model_name} simulations", unit="run")
    for capacity in capacities:
        for row, policy, predictor in rows:
            run = simulate(heldout, policy, capacity, predictor=predictors.get(predictor), prefetch_depth=1,
                           hot_from=training if policy == "static" else None)
            result["runs"].append({"row": row, "predictor": predictor, **run.as_dict()})
            report(result)
            progress.update(1)
        tqdm.write(f"{model_name} {capacity} of {heldout.num_experts} per layer: " + ", ".join(
            f"{r['row']} {r['hit_rate']:.3f}" for r in result["runs"] if r["capacity"] == capacity))
    progress.close()
    return result


def markdown(results: dict) -> str:
    from moe_infer.benchmarks.predictors import TRAIN_EVERY, ordinal
    from moe_infer.traces.corpus import HELDOUT_RULE

    lines = ["# Cache policies on held-out text (trace-driven simulator)", "",
             f"{results['date']}, {results['device']}, torch {results['torch']}. Command: `{results['command']}`.", "",
             "Held-out text: standard-library files the shipped models never saw in training (split by "
             f"`{HELDOUT_RULE}`); training trace: every {ordinal(TRAIN_EVERY)} training-split file. One cache for the whole trace, token by token, layer by layer; capacity in expert slots per MoE "
             "layer. Cells: hit rate (share of (token, layer, expert) accesses found resident) and, in brackets, "
             "loads (experts brought in: misses + prefetches = bytes moved / expert size). `static` pins the "
             "experts the training trace used most. `belady` is the offline optimum of demand loading; "
             "prefetching (`lru + P`, `expertflow + P`: P's top-K loaded one MoE layer ahead) can pass its hit "
             "rate but never its loads. `oracle`: the held-out trace's own future with a share "
             f"{results['args']['oracle_noise']} of predictions replaced by random scores (an upper-bound "
             "reference, not a real predictor).", ""]
    for model in results["models"]:
        held, train = model["traces"]["heldout"], model["traces"]["train"]
        lines += [f"## {model['model']}", "",
                  f"{len(model['moe_layers'])} MoE layers x {model['num_experts']} experts, top-{model['top_k']}. "
                  f"Held-out trace: {held['tokens']:,} tokens in {held['sequences']} sequences "
                  f"({', '.join(held['files'])}); training trace: {train['tokens']:,} tokens.", ""]
        trained = {name: p for name, p in model["predictors"].items() if "train_seconds" in p}
        if trained:
            lines += ["Predictors trained in: " + ", ".join(f"{name} {p['train_seconds']:.1f} s"
                                                            for name, p in trained.items()) + ".", ""]
        capacities = model.get("capacities", [])
        lines += ["| policy | " + " | ".join(f"{c} of {model['num_experts']}" for c in capacities) + " |",
                  "|---" * (1 + len(capacities)) + "|"]
        cells: dict[str, dict[int, str]] = {}
        for run in model["runs"]:
            cells.setdefault(run["row"], {})[run["capacity"]] = f"{run['hit_rate']:.3f} ({run['loads']:,})"
        for row, by_capacity in cells.items():
            lines.append(f"| {row} | " + " | ".join(by_capacity.get(c, "") for c in capacities) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    import torch

    args = parse_args(argv, prog)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "device": f"CPU ({platform.processor() or platform.machine()})", "torch": torch.__version__,
               "python": platform.python_version(), "command": args.command,
               "args": {"files": args.files, "eval_tokens": args.eval_tokens, "train_tokens": args.train_tokens,
                        "capacities": args.capacities, "predictors": args.predictors,
                        "oracle_noise": args.oracle_noise, "epochs": args.epochs, "max_seconds": args.max_seconds},
               "models": []}

    def write(partial_model: dict | None = None) -> None:
        """Rewrite the result files with every finished row so far (an interrupted run keeps them)."""
        snapshot = {**results, "models": [*results["models"], *([partial_model] if partial_model else [])]}
        (args.out / "cache.json").write_text(json.dumps(snapshot, indent=1))
        (args.out / "cache.md").write_text(markdown(snapshot))

    for name in args.models:
        results["models"].append(run_model(name, args, write))
        write()
    print(markdown(results))
    print(f"wrote {args.out / 'cache.json'} and {args.out / 'cache.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
