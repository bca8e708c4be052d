"""`moe-infer` command line (also `python -m moe_infer`).

User mistakes (bad arguments, bad files, unsupported models: the `moe_infer.errors` types, and a
path the operating system cannot open) print one line to stderr and exit with status 2, without a
traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from moe_infer.config import add_config_arguments, config_from_arguments
from moe_infer.errors import ConfigError, MissingFile, MoEInferError
from moe_infer.helpformat import HelpFormatter, RawDescriptionHelpFormatter

USER_ERRORS = (MoEInferError, FileNotFoundError, PermissionError, IsADirectoryError)


def _demo(args: argparse.Namespace) -> int:
    from moe_infer.demo import format_report, run_demo

    result = run_demo(args.model, prompt=args.prompt, new_tokens=args.new_tokens, device=args.device,
                      dtype=args.dtype)
    print(format_report(result))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from moe_infer.traces.profiler import ProfileOptions, check_inputs_exist, load_model, record_trace

    features = tuple(f.strip() for f in args.features.split(",") if f.strip()) if args.features else ()
    options = ProfileOptions(mode=args.mode, seq_len=args.seq_len, batch_size=args.batch_size,
                             new_tokens=args.new_tokens, max_tokens=args.max_tokens, features=features,
                             router_logits=args.router_logits, chunk_tokens=args.chunk_tokens,
                             progress=not args.no_progress)
    if not args.text and args.prompts is None:
        raise ConfigError("give --text FILE... and/or --prompts JSONL")
    check_inputs_exist(args.text or (), args.prompts)  # before the model is loaded
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    result = record_trace(model, args.out, texts=args.text or (), prompts=args.prompts, tokenizer=tokenizer,
                          model_name=args.model, options=options)
    print(f"wrote {result.path}: {result.tokens} tokens in {result.sequences} sequences "
          f"({result.tokens / result.seconds:.1f} tokens/s, {result.parts} part(s))")
    return 0


def _trace_stats(args: argparse.Namespace) -> int:
    from moe_infer.traces.trace import Trace
    from moe_infer.traces.stats import format_markdown, write_report

    statistics, written = write_report(Trace.load(args.trace), plots=args.plots, json_path=args.json,
                                       markdown_path=args.markdown, max_distance=args.max_distance)
    print(format_markdown(statistics), end="")
    for path in written:
        print(f"wrote {path}")
    return 0


def _placement(args: argparse.Namespace) -> int:
    from moe_infer.distributed import placement
    from moe_infer.traces.trace import Trace

    trace = Trace.load(args.trace)
    result = placement.plan(trace, args.devices, capacity=args.capacity, method=args.method,
                            replicas=args.replicas, load_tolerance=args.load_tolerance)
    result.save(args.out)
    round_robin = placement.round_robin_plan(trace, args.devices).cross_device_rate(trace)
    load_only = placement.load_balanced_plan(trace, args.devices).cross_device_rate(trace)
    print(f"wrote {args.out}: {trace.num_experts} experts x {trace.num_layers} MoE layers on {args.devices} devices "
          f"({result.method}, {result.num_replicas()} replicas, capacity {result.capacity})")
    print(f"expected cross-device rate {result.stats['cross_device_rate']:.4f} "
          f"(round-robin {round_robin:.4f}, load-only {load_only:.4f}); "
          f"max device load / mean {result.stats['load_imbalance']:.3f}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import moe_infer
    from moe_infer.serving.batching import generate_many
    from moe_infer.executor import check_supported
    from moe_infer.models import load_model
    from moe_infer.traces.profiler import check_inputs_exist, read_prompts

    prompts = list(args.prompt or [])
    if args.prompts:
        check_inputs_exist((), args.prompts)
        prompts += list(read_prompts(args.prompts))
    if not prompts:
        raise ConfigError("give --prompt TEXT (repeatable) and/or --prompts JSONL")
    config = config_from_arguments(args)
    check_supported(config)  # before the model is loaded
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    moe_infer.wrap(model, config)
    sampling = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p")
                if getattr(args, name) is not None}  # unset: the model's generation config, as in generate()
    outputs, stats = generate_many(model, prompts, tokenizer=tokenizer, max_batch_size=args.max_batch_size,
                                   pool_size=args.pool_size, scheduler=args.scheduler,
                                   max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                   seed=args.seed, return_stats=True, **sampling)
    for index, (prompt, output) in enumerate(zip(prompts, outputs)):
        print(f"[{index}] {prompt!r} -> {output!r}")
    summary = stats.summary()
    signatures = f", signatures: {summary['signatures']}" if summary["scheduler"] == "expert" else ""
    print(f"{summary['requests']} requests, {summary['micro_batches']} micro-batches ({summary['scheduler']} "
          f"scheduler{signatures}, mean size {summary['mean_batch_size']:.2f}), "
          f"{summary['distinct_experts_per_micro_batch']:.2f} distinct experts per micro-batch and MoE layer, "
          f"{summary['regroups']} regroups, {summary['tokens_per_second']:.1f} tokens/s")
    for line in _cache_lines(moe_infer.executor(model).stats()):
        print(line)
    return 0


def _cache_lines(stats: dict) -> list[str]:
    """One line per budgeted expert tier: hit rate and bytes moved (none without a budget)."""
    lines = []
    for tier, counts in stats.get("tiers", {}).items():
        if counts.get("budget_bytes") is None:
            continue
        accesses = counts["hits"] + counts["misses"]
        rate = f"{counts['hits'] / accesses:.3f}" if accesses else "-"
        lines.append(f"expert cache, {tier} tier of {counts['budget_bytes'] / 2**20:.2f} MiB: hit rate {rate} "
                     f"({counts['hits']} hits, {counts['misses']} misses), {counts['bytes_moved'] / 2**20:.1f} MiB "
                     f"moved, {stats.get('cpu_computed_experts', 0)} experts computed on the CPU")
    return lines


def _serve(args: argparse.Namespace) -> int:
    from moe_infer.executor import check_supported
    from moe_infer.serving.server import ServerOptions, check_dependencies, serve

    check_dependencies()
    config = config_from_arguments(args)
    check_supported(config)  # before the model is loaded
    options = ServerOptions(**{name: getattr(args, name) for name in ServerOptions.__dataclass_fields__})
    return serve(args.model, config, options)


def _add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous, expert-aware batching",
                           description="Serve MODEL over HTTP: /v1/completions, /v1/chat/completions (streaming), "
                                       "/v1/models, /health, /metrics. Needs the serve extra: "
                                       "pip install 'moe-infer[serve]'.")
    serve.add_argument("model", metavar="MODEL",
                       help="a shipped model (tiny-mixtral, tiny-deepseek), a transformers directory, a hub id "
                            "(org/name) or a converted checkpoint")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
    serve.add_argument("--served-model-name", default=None, help="the name clients use (default: MODEL's name)")
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests per decode forward pass")
    serve.add_argument("--pool-size", type=int, default=None,
                       help="requests running at once, prefilling or decoding (default 4 x batch size)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests waiting for a slot; beyond that the server answers 503")
    serve.add_argument("--scheduler", choices=["expert", "fcfs"], default=None,
                       help="how running requests are grouped into micro-batches (default: expert with "
                            "--token-scheduling, fcfs otherwise)")
    serve.add_argument("--prefill-chunk", type=int, default=512,
                       help="prompt tokens prefilled per step: a long prompt is cut into chunks so running "
                            "requests keep decoding")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="context length: prompt + max_tokens (default: the model's max_position_embeddings)")
    serve.add_argument("--chat-template", default=None, metavar="FILE",
                       help="a Jinja chat template for /v1/chat/completions (default: the tokenizer's)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGINT/SIGTERM, seconds the requests in flight get to finish before they are cancelled")
    serve.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    serve.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="default: float32, or a converted checkpoint's own dtype")
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                       help="the server's log level")
    add_config_arguments(serve)
    serve.set_defaults(run=_serve)


def _predictor_options(pairs: list[str] | None) -> dict:
    import json

    options = {}
    for pair in pairs or ():
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise ConfigError(f"--option {pair!r}: expected NAME=VALUE (e.g. epochs=4, hidden=64)")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value  # a bare string, e.g. model=tiny-mixtral
    return options


def _predictor_train(args: argparse.Namespace) -> int:
    import os

    from moe_infer.predictors import train
    from moe_infer.traces.trace import Trace

    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise MissingFile(f"output folder of {args.out!r} does not exist")
    from moe_infer.predictors.progress import training_progress

    trace = Trace.load(args.trace)
    with training_progress(f"train {args.kind}"):  # the learned kinds' bars; counting kinds take under a second
        predictor = train(args.kind, trace, **_predictor_options(args.option))
    predictor.save(args.out)
    cost = predictor.cost()
    print(f"wrote {args.out}: {args.kind} predictor, {cost['parameters']} parameters, "
          f"{cost['macs_per_token']} multiply-accumulates per token")
    return 0


def _predictor_eval(args: argparse.Namespace) -> int:
    import json

    from moe_infer.predictors import load
    from moe_infer.traces.trace import Trace

    predictor = load(args.predictor)
    result = predictor.evaluate(Trace.load(args.trace), top_k=args.top_k, max_distance=args.max_distance)
    print(f"{predictor.kind} on {result['tokens']} tokens: recall of the true experts among the predicted "
          f"top-{result['top_k']}")
    print("| distance | recall | per layer | brier | ece |")
    print("|---|---|---|---|---|")
    for distance, value in result["recall"].items():
        per_layer = " ".join(f"{v:.3f}" for v in result["recall_per_layer"][distance])
        calibration = result["calibration"][distance]
        print(f"| {distance} | {value:.3f} | {per_layer} | {calibration['brier']:.4f} | {calibration['ece']:.4f} |")
    print(f"cost: {result['cost']['macs_per_token']} multiply-accumulates per token, "
          f"{result['seconds_per_token'] * 1e6:.1f} us per token offline")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
        print(f"wrote {args.json}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from moe_infer import hub
    from moe_infer.experts.convert import convert
    from moe_infer.experts.hub_layouts import SourceCheckpoint

    if hub.is_hub_id(args.src):
        args.src = hub.resolve(args.src)  # the hub cache's snapshot, downloaded if it is not there
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        source = SourceCheckpoint(args.src)  # also checks the source before anything is written
        total = source.total_bytes()
        source.close()
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr)
        progress = bar.update
    summary = convert(args.src, args.dst, dtype=args.dtype, fp8=args.fp8, quantize=args.quantize,
                      group_size=args.group_size, verify_after=args.verify, progress=progress)
    if progress is not None:
        bar.close()
    if summary["skipped"]:
        print(f"{summary['dst']} already holds this conversion; nothing to do" + (" (verified)" if args.verify else ""))
    else:
        gb = summary["bytes_written"] / 1e9
        print(f"wrote {summary['dst']}: {len(summary['moe_layers'])} MoE layers x {summary['num_experts']} experts, "
              f"{gb:.2f} GB in {summary['seconds']:.1f} s ({gb / summary['seconds']:.2f} GB/s)"
              + (", verified" if args.verify else ""))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from moe_infer.experts.store import verify

    result = verify(args.dir)
    print(f"{args.dir}: OK ({result['moe_layers']} MoE layers, {result['experts']} experts, "
          f"{result['bytes'] / 1e9:.2f} GB checked)")
    return 0


class _PredictOnce:
    """A saved predictor's scores for the trace, computed once for every (policy, capacity) run. A
    predictor that needs the MoE inputs of every token runs the model over the trace when the trace
    did not record them (the model is then loaded once, and the reason printed)."""

    def __init__(self, predictor, trace):
        from moe_infer.predictors.features import recorded_moe_inputs

        self.predictor, self.scores = predictor, {}
        needs_model = predictor.kind == "gate-lookahead" or (
            predictor.kind == "expertflow" and (recorded_moe_inputs(trace) is None
                                                or predictor.options.get("attention_lookahead")))
        if needs_model:
            print(f"note: the {predictor.kind} predictor reads every MoE layer's input, which this trace did not "
                  f"record (profile --features moe_input:...): loading {trace.model} once to compute them",
                  file=sys.stderr)

    def predict_trace(self, trace, distance: int):
        if distance not in self.scores:
            self.scores[distance] = self.predictor.predict_trace(trace, distance)
        return self.scores[distance]


def _simulate(args: argparse.Namespace) -> int:
    import json

    from moe_infer.cache.simulate import (TraceOracle, capacity_for_budget, checkpoint_expert_bytes, format_table,
                                          simulate)
    from moe_infer.config import parse_bytes
    from moe_infer.traces.trace import Trace

    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    if (args.capacity is None) == (args.budget is None):
        raise ConfigError("simulate: give --capacity (expert slots) or --budget (bytes, with --checkpoint), one of them")
    if args.quantize is not None and args.checkpoint is None:
        raise ConfigError("simulate --quantize: give --checkpoint, the converted checkpoint whose experts it quantizes")
    expert_bytes = None if args.checkpoint is None else checkpoint_expert_bytes(args.checkpoint, args.quantize)
    if args.budget is not None:
        if expert_bytes is None:
            raise ConfigError("simulate --budget: give --checkpoint too (the expert size the budget is divided by)")
        capacities = [capacity_for_budget(parse_bytes(b.strip()), expert_bytes) for b in args.budget.split(",")]
    else:
        try:
            capacities = [int(c) for c in args.capacity.split(",")]
        except ValueError:
            raise ConfigError(f"--capacity {args.capacity!r}: expected expert slots, e.g. 4 or 2,4,6") from None
    trace = Trace.load(args.trace)
    predictor = None
    if args.predictor == "oracle":
        predictor = TraceOracle(args.oracle_noise)
    elif args.predictor is not None:
        from moe_infer import predictors

        predictor = _PredictOnce(predictors.load(args.predictor), trace)
    results = []
    for capacity in capacities:
        for policy in policies:
            uses_predictor = predictor is not None and policy != "belady"
            results.append(simulate(trace, policy, capacity, per_layer=not args.total,
                                    predictor=predictor if uses_predictor else None,
                                    prefetch_depth=args.prefetch_depth, expert_bytes=expert_bytes))
    table = format_table(results)
    print(table, end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trace": args.trace, "num_tokens": trace.num_tokens, "moe_layers": list(trace.moe_layers),
                       "num_experts": trace.num_experts, "top_k": trace.top_k, "predictor": args.predictor,
                       "checkpoint": args.checkpoint, "quantize": args.quantize, "budget": args.budget,
                       "results": [r.as_dict() for r in results]}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from moe_infer.benchmarks import run

    return run(args.name, args.args, prog=f"moe-infer bench {args.name}")


DTYPE_HELP = "dtype the model computes in"


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: defaults in its help, and itself in its namespace (``args.parser``)
    so that arguments no command takes are reported with the usage of the command that got them."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        self.set_defaults(parser=self)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moe-infer", description="Mixture-of-Experts inference for transformers models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="wrap a small MoE model, check its outputs, generate and report")
    demo.add_argument("--model", default="tiny-mixtral",
                      help="a shipped model (tiny-mixtral, tiny-deepseek), 'random-mixtral', a transformers directory "
                           "or a hub id (org/name)")
    demo.add_argument("--prompt", default="def main(", help="the text generation starts from")
    demo.add_argument("--new-tokens", type=int, default=64, help="tokens generated by each run")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    demo.set_defaults(run=_demo)

    profile = sub.add_parser("profile", help="run a model over text or prompts and record an expert trace")
    profile.add_argument("--model", required=True,
                         help="a shipped model name, a transformers directory or a hub id (org/name)")
    profile.add_argument("--text", nargs="+", metavar="FILE", help="text files, cut into windows of --seq-len tokens")
    profile.add_argument("--prompts", metavar="JSONL", help='a JSONL file of {"prompt": "..."} lines')
    profile.add_argument("--out", required=True, metavar="TRACE", help="the trace file to write (.safetensors)")
    profile.add_argument("--mode", default="prefill", choices=["prefill", "generate"],
                         help="prefill: teacher forcing over the text; generate: greedy decoding after each prompt")
    profile.add_argument("--max-tokens", type=int, default=None, help="stop after recording this many tokens")
    profile.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (window or prompt)")
    profile.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    profile.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (generate mode)")
    profile.add_argument("--features", default="",
                         help="comma-separated: embedding, moe_input:LAYER (hidden state entering that MoE layer)")
    profile.add_argument("--router-logits", action="store_true", help="also record router logits (float16)")
    profile.add_argument("--chunk-tokens", type=int, default=65536,
                         help="tokens of records held in memory before they are written to a part file")
    profile.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    profile.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    profile.add_argument("--no-progress", action="store_true", help="no progress bar")
    profile.set_defaults(run=_profile)

    stats = sub.add_parser("trace-stats", help="routing statistics of a trace, beside a uniform random router")
    stats.add_argument("trace", metavar="TRACE", help="a trace file (moe-infer profile --out)")
    stats.add_argument("--plots", metavar="DIR", help="write PNG heatmaps (popularity, cross-layer affinity) here")
    stats.add_argument("--json", metavar="OUT", help="write the statistics as JSON")
    stats.add_argument("--markdown", metavar="OUT", help="write the markdown report")
    stats.add_argument("--max-distance", type=int, default=3, help="cross-layer distances 1..D")
    stats.set_defaults(run=_trace_stats)

    place = sub.add_parser("placement", help="place experts on devices from a trace (fewest cross-device pairs)")
    place.add_argument("--trace", required=True, metavar="TRACE", help="the trace the plan is fitted to")
    place.add_argument("--devices", required=True, type=int, metavar="N", help="devices to place the experts on")
    place.add_argument("--out", required=True, metavar="PLAN", help="the plan file to write (.safetensors)")
    place.add_argument("--capacity", type=int, default=None, help="expert slots per device and MoE layer")
    place.add_argument("--method", default="auto", choices=["auto", "milp", "heuristic", "load", "round-robin"],
                       help="auto: exact (MILP) for small problems, the heuristic beyond")
    place.add_argument("--replicas", type=int, default=0, help="extra copies of hot experts per MoE layer (EPLB)")
    place.add_argument("--load-tolerance", type=float, default=0.1,
                       help="a device may compute up to (1 + this) x the mean load of a layer")
    place.set_defaults(run=_placement)

    gen = sub.add_parser("generate", help="generate for one or many prompts with expert-aware micro-batching")
    gen.add_argument("--model", required=True,
                     help="a shipped model name, 'random-mixtral', a transformers directory or a hub id (org/name)")
    gen.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    gen.add_argument("--prompts", metavar="JSONL", help='a JSONL file of {"prompt": "..."} lines')
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    gen.add_argument("--max-batch-size", type=int, default=8, help="requests per decode forward pass")
    gen.add_argument("--pool-size", type=int, default=None, help="requests decoded at once (default 4 x batch size)")
    gen.add_argument("--scheduler", choices=["expert", "fcfs"], default=None,
                     help="default: expert with --token-scheduling, fcfs otherwise; with --predictor P (a saved "
                          "pregate predictor) the expert scheduler groups requests by P's prediction of their next token")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=None, help="default: the model's generation config")
    gen.add_argument("--top-k", type=int, default=None, help="default: the model's generation config (else 50)")
    gen.add_argument("--top-p", type=float, default=None, help="default: the model's generation config")
    gen.add_argument("--seed", type=int, default=0, help="request i samples with seed + i")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    add_config_arguments(gen)
    gen.set_defaults(run=_generate)

    _add_serve_parser(sub)

    predictor = sub.add_parser("predictor", help="train and evaluate routing predictors")
    predictor_sub = predictor.add_subparsers(dest="predictor_command", required=True, metavar="ACTION")
    predictor_train = predictor_sub.add_parser("train", help="fit a predictor on a trace and save it")
    predictor_train.add_argument("--kind", required=True,
                                 choices=["gate-lookahead", "markov", "frequency", "expertflow", "pregate"], help="the predictor kind")
    predictor_train.add_argument("--trace", required=True, metavar="TRACE", help="the training trace")
    predictor_train.add_argument("--out", required=True, metavar="PREDICTOR", help="file to write (.safetensors)")
    predictor_train.add_argument("--option", action="append", metavar="NAME=VALUE",
                                 help="a training option (repeatable): epochs=4, hidden=64, window=8, lookahead=1, ...")
    predictor_train.set_defaults(run=_predictor_train)
    predictor_eval = predictor_sub.add_parser("eval", help="recall of a saved predictor on a trace")
    predictor_eval.add_argument("--predictor", required=True, metavar="PREDICTOR", help="a saved predictor file")
    predictor_eval.add_argument("--trace", required=True, metavar="TRACE", help="the held-out trace")
    predictor_eval.add_argument("--top-k", type=int, default=None, help="predicted experts per layer (default: the model's K)")
    predictor_eval.add_argument("--max-distance", type=int, default=4, help="layer distances 1..D")
    predictor_eval.add_argument("--json", metavar="OUT", help="write the evaluation as JSON")
    predictor_eval.set_defaults(run=_predictor_eval)

    sim = sub.add_parser("simulate", help="replay a trace through an expert cache policy (hit rate, loads)")
    sim.add_argument("--trace", required=True, metavar="TRACE", help="the trace to replay")
    sim.add_argument("--policy", required=True,
                     help="lru, lfu, static, expertflow, belady, or several separated by commas")
    sim.add_argument("--capacity", default=None, help="expert slots per MoE layer (or in total with --total); "
                                                       "several separated by commas")
    sim.add_argument("--budget", default=None,
                     help="instead of --capacity: bytes per MoE layer (or in total with --total), e.g. 2GiB, several "
                          "separated by commas; divided by --checkpoint's expert size")
    sim.add_argument("--checkpoint", default=None, metavar="DIR",
                     help="a converted checkpoint: loads are also counted in bytes of its experts as stored "
                          "(quantized bytes if converted with --quantize)")
    sim.add_argument("--quantize", default=None, choices=["int8", "int4"],
                     help="count --checkpoint's float experts as they would be stored quantized (int4: groups of 128)")
    sim.add_argument("--total", action="store_true", help="capacity counts slots over all layers, not per layer")
    sim.add_argument("--predictor", default=None,
                     help="a saved predictor file, or 'oracle' (the trace's own future: an upper bound)")
    sim.add_argument("--oracle-noise", type=float, default=0.0, help="probability that an oracle prediction is replaced by random scores")
    sim.add_argument("--prefetch-depth", type=int, default=1, help="MoE layers ahead that predictions prefetch")
    sim.add_argument("--json", metavar="OUT", help="write the results as JSON")
    sim.set_defaults(run=_simulate)

    conv = sub.add_parser("convert", help="convert a transformers MoE checkpoint into the expert-addressable layout")
    conv.add_argument("src", metavar="SRC", help="a transformers model directory (safetensors, single or sharded) or a hub id (org/name)")
    conv.add_argument("dst", metavar="DST", help="the converted checkpoint directory to create")
    conv.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                      help="cast the weights (default: keep the source dtype; FP8 becomes bfloat16)")
    conv.add_argument("--fp8", default="dequantize", choices=["dequantize", "keep"],
                      help="FP8 expert weights (DeepSeek-V3): dequantize, or keep FP8 with block scales")
    conv.add_argument("--quantize", default=None, choices=["int8", "int4"],
                      help="store the routed experts quantized: int8 per output row, or int4 in groups along the "
                           "input dimension (dense weights and shared experts stay as they are)")
    conv.add_argument("--group-size", type=int, default=None, metavar="G",
                      help="int4 group size (default 128)")
    conv.add_argument("--verify", action="store_true", help="check every checksum after writing")
    conv.add_argument("--no-progress", action="store_true", help="no progress bar")
    conv.set_defaults(run=_convert)

    ver = sub.add_parser("verify", help="check a converted checkpoint: manifest, shapes, dtypes, every checksum")
    ver.add_argument("dir", metavar="DIR", help="a converted checkpoint directory")
    ver.set_defaults(run=_verify)

    from moe_infer.benchmarks import BENCHMARKS

    bench = sub.add_parser("bench", help=f"run a benchmark: {', '.join(BENCHMARKS)}",
                           description="Run a benchmark; results go to bench/results/ under the current directory "
                                       "unless its --out says otherwise. `moe-infer bench NAME --help` shows its options.",
                           epilog="benchmarks:\n" + "\n".join(f"  {name:<11} {text}" for name, text in BENCHMARKS.items()),
                           formatter_class=RawDescriptionHelpFormatter)
    bench.add_argument("name", metavar="NAME", help=", ".join(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the benchmark's own options")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # the usage of the command that got them, not the top-level one
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(args)
    except USER_ERRORS as err:
        message = str(err) or type(err).__name__
        print(f"moe-infer {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
