"""Expert-aware micro-batching against first-come-first-served, on the shipped models.

Two measurements, both on requests of several kinds of text arriving interleaved (py, rst, license,
metadata, py, ...), so that arrival order mixes kinds as a serving queue does:

1. trace replay (`moe_infer.serving.schedule.simulate_schedule`): every window of the mixed traces of
   ``scripts/bench_traces.py`` is a request (``--prompt-tokens`` prompt, ``--decode-tokens``
   decode steps with the recorded routing); distinct experts per micro-batch and MoE layer for
   fcfs, the expert scheduler with the default signature (each request's own recent routing), with
   a predictor's lookahead (`PredictedRouting`: a ``pregate`` and an ``expertflow`` predictor
   trained on a training-split trace, as ``scripts/bench_predictors.py`` records it, predict each
   request's next token from its own token window -- and, expertflow, its previous token's routing)
   and with perfect lookahead (the next token's true routing: what
   exact pre-gating would give);
2. real generation (`moe_infer.generate_many`) of a few prompts cut from the same files, with
   every expert resident and under a CPU expert budget of half the expert bytes (the tiered cache,
   LRU), for fcfs, expert (recent routing) and expert with each predictor: distinct experts
   measured on the real routing of every decode micro-batch, expert bytes loaded, hit rate, tokens/s, KV bytes copied, and whether the tokens equal the unbudgeted fcfs run.

Writes ``bench/results/batching.json`` (appends one JSON line per run) and ``batching.md``.

    python scripts/bench_batching.py [--models tiny-mixtral tiny-deepseek] [--threads 1]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from moe_infer.benchmarks import predictors as bench_predictors  # the training-split corpus and trace recording

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_traces  # noqa: E402


def trained_predictors(model_name: str, work_dir: Path, train_tokens: int, epochs: int) -> dict:
    """``pregate`` and ``expertflow`` predictors trained on a training-split trace of ``model_name``
    (none of the held-out files the requests come from)."""
    import moe_infer
    from moe_infer.models import load_model
    from moe_infer.predictors import train

    work_dir.mkdir(parents=True, exist_ok=True)
    model, _ = load_model(model_name, device="cpu")
    moe_infer.wrap(model)
    trace = bench_predictors.record(model_name, model, "train", bench_predictors.corpora()["train"], work_dir,
                                    train_tokens)
    moe_infer.unwrap(model)
    predictors = {}
    for kind in ("pregate", "expertflow"):
        started = time.perf_counter()
        predictors[kind] = train(kind, trace, epochs=epochs)
        print(f"  {kind} predictor for {model_name}: {trace.num_tokens} training tokens, "
              f"trained in {time.perf_counter() - started:.0f} s")
    return predictors


def interleaved_order(kind_counts: dict[str, int]) -> list[int]:
    """Sequence positions of the joined trace, taking one request of each kind in turn."""
    starts, offset = {}, 0
    for kind, count in kind_counts.items():
        starts[kind] = offset
        offset += count
    order = []
    for i in range(max(kind_counts.values())):
        order += [starts[kind] + i for kind, count in kind_counts.items() if i < count]
    return order


def replay(model_name: str, trace_dir: Path, batch_sizes: list[int], prompt_tokens: int, decode_tokens: int,
           predictors: dict) -> list[dict]:
    from moe_infer.serving.schedule import simulate_schedule
    from moe_infer.serving.signatures import PredictedRouting
    from moe_infer.traces.trace import Trace

    path, counts = bench_traces.record(model_name, trace_dir)
    trace = Trace.load(path)
    order = interleaved_order(counts)
    rows = []
    for batch_size in batch_sizes:
        common = dict(max_batch_size=batch_size, pool_size=4 * batch_size, prompt_tokens=prompt_tokens,
                      decode_tokens=decode_tokens, order=order)
        for label, options in (("fcfs", dict(scheduler="fcfs")),
                               ("expert (own recent routing)", dict(scheduler="expert")),
                               *((f"expert ({kind} predictor)", dict(scheduler="expert",
                                                                     signatures=PredictedRouting(predictor)))
                                 for kind, predictor in predictors.items()),
                               ("expert (perfect lookahead)", dict(scheduler="expert", lookahead=True))):
            started = time.perf_counter()
            result = simulate_schedule(trace, **common, **options)
            rows.append({"model": model_name, "batch_size": batch_size, "policy": label, **result,
                         "num_experts": trace.num_experts, "top_k": trace.top_k, "kinds": counts,
                         "seconds": round(time.perf_counter() - started, 2)})
            print(f"  replay {model_name} B={batch_size} {label}: "
                  f"{result['distinct_experts_per_micro_batch']:.3f} distinct experts / micro-batch / layer")
    return rows


def prompts_from_files(tokenizer, per_kind: int, prompt_bytes: int) -> list[list[int]]:
    """``per_kind`` prompts of each kind, interleaved by kind: the first bytes of different files."""
    from moe_infer.models import encode_text

    by_kind = {kind: [encode_text(tokenizer, p.read_text(errors="replace")[:prompt_bytes], add_special_tokens=False)
                      for p in files[:per_kind]]
               for kind, files in bench_traces.text_files(per_kind).items()}
    return [by_kind[kind][i] for i in range(per_kind) for kind in by_kind if i < len(by_kind[kind])]


def generation(model_name: str, batch_size: int, per_kind: int, new_tokens: int, predictors: dict,
               repeats: int = 3) -> list[dict]:
    """fcfs, expert (recent routing) and expert (with each predictor) scheduling of the same prompts, with every expert resident and then under a
    CPU expert budget of half the expert bytes (the tiered cache, LRU): tokens/s (median of
    ``repeats`` alternating runs), distinct experts, expert bytes loaded, hit rate."""
    import statistics

    import moe_infer
    from moe_infer.models import load_model

    model, tokenizer = load_model(model_name, device="cpu")
    moe_infer.wrap(model)
    ex = moe_infer.executor(model)
    expert_bytes = sum(layer.expert_source.expert_nbytes() * layer.num_experts for layer in ex.layers)
    prompts = prompts_from_files(tokenizer, per_kind, 96)
    rows, reference = [], None
    for budget in (None, expert_bytes // 2):
        if budget is not None:
            moe_infer.wrap(model, cpu_memory=budget, cache_policy="lru")
        policies = {"fcfs": dict(scheduler="fcfs"), "expert": dict(scheduler="expert"),
                    **{f"expert + {kind}": dict(scheduler="expert", predictor=predictor)
                       for kind, predictor in predictors.items()}}
        outputs, summaries, speeds, tiers = {}, {}, {policy: [] for policy in policies}, {}
        for _ in range(repeats):  # alternating, so all see the same machine load
            for scheduler, options in policies.items():
                ex.reset_stats()
                tokens, stats = moe_infer.generate_many(model, prompts, max_batch_size=batch_size,
                                                        pool_size=4 * batch_size, max_new_tokens=new_tokens,
                                                        eos_token_id=None, return_stats=True, **options)
                outputs[scheduler], summaries[scheduler] = tokens, stats.summary()
                speeds[scheduler].append(summaries[scheduler]["tokens_per_second"])
                tiers[scheduler] = ex.stats()["tiers"].get("cpu", {})
        reference = reference or outputs["fcfs"]
        for scheduler, summary in summaries.items():
            summary["tokens_per_second"] = statistics.median(speeds[scheduler])
            tier = tiers[scheduler]
            accesses = tier.get("hits", 0) + tier.get("misses", 0)
            rows.append({"model": model_name, "batch_size": batch_size, "policy": scheduler, **summary,
                         "expert_budget_bytes": budget, "expert_bytes_total": expert_bytes,
                         "expert_bytes_loaded": tier.get("bytes_moved", 0) if budget else 0,
                         "hit_rate": tier.get("hits", 0) / accesses if budget and accesses else None,
                         "same_tokens_as_unbudgeted_fcfs": outputs[scheduler] == reference})
            print(f"  generate {model_name} B={batch_size} budget={budget} {scheduler}: "
                  f"{summary['distinct_experts_per_micro_batch']:.3f} distinct experts / micro-batch / layer, "
                  f"{rows[-1]['expert_bytes_loaded'] / 1e6:.1f} MB of experts loaded, "
                  f"{summary['tokens_per_second']:.1f} tokens/s (median of {repeats})")
    moe_infer.unwrap(model)
    return rows


def markdown(replays: list[dict], generations: list[dict], environment: dict) -> str:
    lines = ["# Expert-aware micro-batching vs first-come-first-served", "",
             f"CPU, {environment['threads']} thread(s), torch {environment['torch']}, {environment['when']}.",
             "Requests: windows of held-out stdlib .py, .rst, license texts and package METADATA, arriving "
             "interleaved by kind. Pool of 4 x batch size; every pooled request decodes one token per round, "
             "so every scheduler runs the same number of micro-batches.",
             f"Pregate and expertflow predictors (`moe_infer.predictors.train(kind, ...)`, {environment['predictors']['epochs']} epochs) "
             f"trained per model on up to {environment['predictors']['train_tokens']} tokens of training-split stdlib files "
             "(`scripts/bench_predictors.py`'s corpus); the requests are held-out text.", "",
             "## Trace replay (recorded routing)", "",
             "| model | experts (top-k) | batch | policy | distinct experts / micro-batch / layer | vs fcfs | regroups | requests moved |",
             "|---|---|---|---|---|---|---|---|"]
    fcfs = {(r["model"], r["batch_size"]): r["distinct_experts_per_micro_batch"] for r in replays if r["policy"] == "fcfs"}
    for r in replays:
        base = fcfs[(r["model"], r["batch_size"])]
        lines.append(f"| {r['model']} | {r['num_experts']} (top-{r['top_k']}) | {r['batch_size']} | {r['policy']} | "
                     f"{r['distinct_experts_per_micro_batch']:.3f} | {r['distinct_experts_per_micro_batch'] / base - 1:+.1%} | "
                     f"{r['regroups']} | {r['requests_moved']} |")
    lines += ["", "## Real generation (`generate_many`, greedy, 16 prompts, 24 new tokens)", "",
              "Expert budget: none (every expert resident) or half the expert bytes in the CPU tier of the "
              "tiered cache (`cpu_memory`, LRU). Tokens/s: median of "
              f"{environment['repeats']} alternating runs on a shared 2-core machine "
              "(noisy).", "",
              "| model | expert budget | scheduler | micro-batches | distinct experts / micro-batch / layer | expert MB loaded | hit rate | regroups | KV MB copied | tokens/s | same tokens as unbudgeted fcfs |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in generations:
        budget = "none" if r["expert_budget_bytes"] is None else \
            f"{r['expert_budget_bytes'] / 1e6:.2f} MB of {r['expert_bytes_total'] / 1e6:.2f}"
        hit_rate = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        lines.append(f"| {r['model']} | {budget} | {r['policy']} | {r['micro_batches']} | "
                     f"{r['distinct_experts_per_micro_batch']:.3f} | {r['expert_bytes_loaded'] / 1e6:.1f} | {hit_rate} | "
                     f"{r['regroups']} | {r['kv_bytes_moved'] / 1e6:.1f} | {r['tokens_per_second']:.1f} | "
                     f"{r['same_tokens_as_unbudgeted_fcfs']} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = bench_traces.benchmark_parser(__doc__)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--generate-per-kind", type=int, default=4)
    parser.add_argument("--generate-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-tokens", type=int, default=40_000, help="tokens of the predictors' training trace")
    parser.add_argument("--epochs", type=int, default=5, help="predictor training epochs")
    parser.add_argument("--repeats", type=int, default=3, help="alternating generation runs (tokens/s median)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/moe_infer_bench_predictors"),
                        help="where the training traces are recorded (reused when present)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    environment = bench_traces.environment(threads=args.threads, repeats=args.repeats,
                                           predictors={"train_tokens": args.train_tokens, "epochs": args.epochs})
    replays, generations = [], []
    for model_name in args.models:
        predictors = trained_predictors(model_name, args.work_dir, args.train_tokens, args.epochs)
        replays += replay(model_name, Path(args.trace_dir), args.batch_sizes, args.prompt_tokens, args.decode_tokens,
                          predictors)
        generations += generation(model_name, 4, args.generate_per_kind, args.generate_tokens, predictors,
                                  args.repeats)
    bench_traces.write_results(args.results, "batching",
                               {"benchmark": "batching", **environment, "replay": replays, "generate": generations},
                               markdown(replays, generations, environment))


if __name__ == "__main__":
    main()
