"""Offloading benchmark: a Mixtral-8x7B-shaped model whose experts do not fit in GPU memory.

Default (GPU): all 32 layers, bf16, random weights, 20 GiB of GPU memory for experts (as on a
24 GB card); the experts live in host memory (the backing). Measures decode tokens/s at batch 1
and prefill tokens/s for a 512-token prompt, hit rate, bytes over PCIe per token, for:
- `accelerate` offload with the same memory limit (whole decoder layers' experts on the GPU until
  the limit, the rest streamed by accelerate's hooks at every forward), when accelerate is
  installed; it runs the random router (it cannot replay a trace) and reports no hit rate (it has
  no cache to count one in);
- plain on-demand LRU (the mixtral-offloading design);
- ours with each feature on and off (expertflow apportioning, CPU compute of misses, SE-MoE ring);
- ours with predictive prefetch: on random weights no trained predictor applies, so the
  prediction is a noisy oracle (labelled as such): the replayed trace's next-layer experts, each
  kept with probability --oracle-recall (default: the recall the shipped tiny-mixtral predictor
  measures at distance 1 on held-out text, bench/results/shipped-predictor-recall-tiny-mixtral.md)
  and otherwise replaced by a wrong expert; prefetched one MoE layer ahead.
- the quantization rows: one config (--quant-config, default "ours - CPU compute": every miss is a
  load, so bytes moved per token are all the transfer) with the experts in the run's float dtype,
  int8 and int4-g128 (`wrap(model, quantize=...)` on a freshly built model) at the same byte budget:
  a quantized expert is smaller, so the budget holds more of them and each load moves fewer bytes.
  Each row records the quantization it ran and its slot size.
Routing both as the random router gives it and replayed from a trace calibrated with real
Mixtral-8x7B statistics (shipped in `moe_infer/assets/routing-stats/`, from the OLMoE repository,
Apache-2.0: per-layer popularity at layers 0, 7, 15 and cross-layer pair counts 0->7, 7->15;
token-to-token reuse tuned so that LRU with 4 of 8 experts per layer hits 61.5%, the hit rate of
real Mixtral traces); each record says which statistics fed which layer. Every row starts from the
same state (a fresh wrap: a cold cache, the replay at its first token, the same prompt and seed)
and is appended to the JSONL file (``--out``) as soon as it is measured, so a run cut short keeps
its rows. Prints the floor: bytes that must cross PCIe per token at the measured hit rate over the
measured host-to-device bandwidth, plus CPU time of experts run there.

    moe-infer bench offload                 # the GPU run (``python scripts/bench_offload.py`` is the same)

Fewer layers (``--layers L``, where the host cannot hold every expert): ``--budget-per-32-layers``
scales the budget by L/32, so each layer has the share of room it has in the full model, and rows
also give tokens/s normalised to 32 layers (x L/32), labelled as such.

Without CUDA it refuses the full size. CPU smoke test (reduced size, CPU tier instead of GPU tier,
no accelerate; checks that the benchmark runs and that each row runs what it says, measures nothing
about offloading):
    moe-infer bench offload --smoke
which is short for
    moe-infer bench offload --layers 2 --hidden 256 --intermediate 512 --vocab 512 --heads 4 --kv-heads 2 \\
        --prompt-tokens 64 --decode-tokens 16 --expert-fraction 0.25 --dtype bfloat16 \\
        --out bench/results/offload-cpu-smoke.jsonl
(options given beside ``--smoke`` win).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import moe_infer
from moe_infer.benchmarks.offload_routing import OraclePrefetch, calibrate_reuse, calibrated_trace, calibration
from moe_infer.cache.backing import ModuleBacking
from moe_infer.cache.cpu_compute import CostModel
from moe_infer.config import parse_bytes
from moe_infer.errors import ConfigError
from moe_infer.experts.layout import ModuleExperts
from moe_infer.helpformat import HelpFormatter
from moe_infer.models import cache_argument, output_cache

ROUTING_STATS = Path(__file__).resolve().parents[1] / "assets" / "routing-stats" / "mixtral-8x7b.json"
RESULTS = Path("bench") / "results" / "offload.jsonl"  # under the current directory
# --smoke: a CPU-sized run (the command of bench/results/offload-cpu-smoke.md)
SMOKE = dict(layers=2, hidden=256, intermediate=512, vocab=512, heads=4, kv_heads=2, prompt_tokens=64,
             decode_tokens=16, expert_fraction=0.25, dtype="bfloat16",
             out=str(Path("bench") / "results" / "offload-cpu-smoke.jsonl"))
CPU_EXPERT_BYTES_LIMIT = 4 * 2**30  # without CUDA, larger runs are refused: they are GPU runs
# bench/results/shipped-predictor-recall-tiny-mixtral.md: the shipped expertflow predictor, held-out, d=1
SHIPPED_PREDICTOR_RECALL = 0.918
ORACLE = "noisy-oracle prefetch"

QUANT_CONFIG = "ours - CPU compute"
QUANT_SCHEMES = ("int8", "int4")  # beside the float row; int4 in groups of the default 128

CONFIGS = {  # name -> MoEConfig fields (the budget is added per run); ORACLE rows also prefetch
    "plain LRU (mixtral-offloading design)": dict(cache_policy="lru", cpu_compute="never"),
    "ours: expertflow + CPU compute": dict(cache_policy="expertflow", cpu_compute="auto"),
    "ours - CPU compute": dict(cache_policy="expertflow", cpu_compute="never"),
    "ours - expertflow (LRU + CPU compute)": dict(cache_policy="lru", cpu_compute="auto"),
    "ours + ring loader": dict(loader="ring", cpu_compute="never"),
    "all misses on the CPU (Fiddler-like)": dict(cache_policy="expertflow", cpu_compute="always"),
    f"ours + {ORACLE} (expertflow + CPU compute)": dict(cache_policy="expertflow", cpu_compute="auto"),
    f"LRU + {ORACLE}": dict(cache_policy="lru", cpu_compute="never"),
}


# -- setup ---------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """The one timer of this script: median wall time of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(args, device: torch.device, dtype: torch.dtype):
    """A MixtralForCausalLM with random weights: everything on `device` except the experts, which
    are in pageable host memory (the cache page-locks them in one registered slab per layer, exact
    in size). Built on meta first: no second copy of 90 GB is made."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k, max_position_embeddings=4096)
    with torch.device("meta"):
        model = MixtralForCausalLM(config).to(dtype)
    generator = torch.Generator(device="cpu").manual_seed(0)
    for name, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            is_expert = name.endswith(".experts")
            target = torch.device("cpu") if is_expert else device
            data = torch.empty(param.shape, dtype=dtype, device=target)
            if is_expert:
                # one random expert, copied to every slot: timing and bytes are those of distinct experts
                pattern = (torch.randn(param.shape[1:], generator=generator) * 0.02).to(dtype)
                for e in range(param.shape[0]):
                    data[e].copy_(pattern)
            elif pname == "weight" and "norm" in name:
                data.fill_(1.0)
            else:
                data.copy_((torch.randn(param.shape, generator=generator) * 0.02).to(dtype))
            module._parameters[pname] = torch.nn.Parameter(data, requires_grad=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # its buffers were built on meta
    return model.eval()


def expert_bytes(args, dtype: torch.dtype) -> int:
    return 3 * args.hidden * args.intermediate * torch.finfo(dtype).bits // 8


def host_to_device_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float | None:
    """Bytes/s of a pinned host -> device copy of one expert (None on CPU-only machines)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    seconds = median_seconds(lambda: dst.copy_(src, non_blocking=True), repeats, device)
    return nbytes / seconds


# -- runs ----------------------------------------------------------------------------------------
def make_prompt(args, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab, (1, args.prompt_tokens), generator=generator).to(device)


def decode_tokens_per_s(model, args, device: torch.device, repeats: int) -> float:
    """Median over `repeats` of: 8 prompt tokens, then `decode_tokens` steps of one token (KV cache);
    only the steps are timed."""
    short = make_prompt(args, device)[:, :8]
    times = []
    for _ in range(repeats):
        with torch.inference_mode():
            out = model(short, use_cache=True)
            past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.decode_tokens):
                out = model(token, **cache_argument(model, past), use_cache=True)
                past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return args.decode_tokens / statistics.median(times)


def prefill_tokens_per_s(model, args, device: torch.device) -> float:
    prompt = make_prompt(args, device)

    def prefill():
        with torch.inference_mode():
            model(prompt, use_cache=False)

    return args.prompt_tokens / median_seconds(prefill, args.repeats, device)


def quant_label(scheme: str | None, dtype: str) -> str:
    """How a row names its experts' format: the float dtype, or the scheme (int4 with its group)."""
    if scheme is None:
        return dtype
    from moe_infer.experts.quant import QuantScheme

    q = QuantScheme(scheme)
    return q.name if q.name == "int8" else f"{q.name}-g{q.group_size}"


def run_ours(model, name: str, fields: dict, budget: int, args, device, routing, quantize: str | None = None) -> dict:
    """One row from a fresh wrap (a cold cache, the replay at its first row, seed 0); `quantize`:
    the experts quantized in memory first (once per model: the float weights are released)."""
    tier = "gpu" if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    oracle_recall = args.oracle_recall if ORACLE in name else None
    if oracle_recall is not None and routing is None:
        raise ConfigError(f"{name!r} replays a trace's next-layer experts: it needs --routing calibrated")
    moe_infer.wrap(model, moe_infer.MoEConfig(**{f"{tier}_memory": budget}, routing_override=routing,
                                              quantize=quantize, **fields))
    ex = moe_infer.executor(model)
    oracle = OraclePrefetch(ex, oracle_recall) if oracle_recall is not None else None
    try:
        decode_tokens_per_s(model, args, device, 1)  # warm-up: threads, a warm cache
        ex.reset_stats()
        decode_tps = decode_tokens_per_s(model, args, device, args.repeats)
        stats = ex.stats()  # decode only (the 8-token prompts included)
        prefill_tps = prefill_tokens_per_s(model, args, device)
    finally:
        if oracle is not None:
            oracle.detach()
    t = stats["tiers"][tier]
    tokens = stats["tokens"]
    config = ex.config
    return {"config": name, "fields": fields,
            "experts": quant_label(quantize, args.dtype),
            "ran": {"cache_policy": config.cache_policy, "cpu_compute": config.cpu_compute, "loader": config.loader,
                    f"{tier}_memory": getattr(config, f"{tier}_memory"), "kernel": stats["kernel"],
                    "routing_override": routing is not None, "quantization": stats["quantization"],
                    "slot_bytes": t.get("slot_bytes"), "slots": t.get("slots"),
                    "prefetch": None if oracle is None else f"{ORACLE}, recall {oracle_recall:.3f}"},
            "decode_tokens_per_s": decode_tps, "prefill_tokens_per_s": prefill_tps,
            "hit_rate": t["hits"] / max(t["hits"] + t["misses"], 1), "bytes_moved_per_token": t["bytes_moved"] / tokens,
            "cpu_experts_per_token": stats["cpu_computed_experts"] / tokens, "stall_seconds": stats["stall_seconds"],
            "prefetch": stats["prefetch"], "oracle_recall_measured": None if oracle is None else oracle.recall(),
            "kernel_calls": stats["kernel_calls"], "peak_bytes": t["peak_bytes"], "tokens": tokens,
            "memory": stats["memory"]}


def run_accelerate(model, budget: int, args, device) -> dict | None:
    """accelerate's offload with the same memory limit: the experts of the first decoder layers go to
    the GPU until the limit; the others stay on the CPU and accelerate moves them in at every forward.
    No hit rate: accelerate has no cache to count hits in (its bytes moved follow from the split)."""
    if device.type != "cuda":
        return None
    try:
        from accelerate import dispatch_model
        from accelerate.hooks import remove_hook_from_submodules
    except ImportError:
        print("accelerate not installed (pip install 'moe_infer[bench]'): skipping its baseline", file=sys.stderr)
        return None
    moe_infer.unwrap(model)
    torch.manual_seed(0)
    layer_bytes = args.experts * expert_bytes(args, next(model.parameters()).dtype)
    on_gpu = min(budget // layer_bytes, args.layers)
    device_map = {"": device.index or 0}
    for i in range(args.layers):
        device_map[f"model.layers.{i}.mlp.experts"] = (device.index or 0) if i < on_gpu else "cpu"
    dispatch_model(model, device_map=device_map, main_device=str(device))
    try:
        decode_tps = decode_tokens_per_s(model, args, device, args.repeats)
        prefill_tps = prefill_tokens_per_s(model, args, device)
    finally:
        remove_hook_from_submodules(model)
    return {"config": f"accelerate offload ({on_gpu} of {args.layers} layers' experts on GPU)",
            "ran": {"accelerate_layers_on_gpu": on_gpu, "routing_override": False},
            "decode_tokens_per_s": decode_tps, "prefill_tokens_per_s": prefill_tps, "hit_rate": None,
            "bytes_moved_per_token": (args.layers - on_gpu) * layer_bytes,  # every CPU layer, every forward
            "cpu_experts_per_token": 0.0}


def append(path: str, record: dict) -> None:
    """One JSON line, written and flushed now (a run cut short keeps the rows it measured)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def main(argv=None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--expert-memory", default="20GiB", help="byte budget of the compute tier for experts")
    ap.add_argument("--expert-fraction", type=float, default=None,
                    help="instead of --expert-memory: this share of all expert bytes")
    ap.add_argument("--budget-per-32-layers", action="store_true",
                    help="--expert-memory is the budget of the full 32-layer model: scale it by --layers / 32")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--routing", default="random,calibrated", help="random and/or calibrated")
    ap.add_argument("--routing-stats", default=None,
                    help="a routing statistics file in the format of the shipped moe_infer/assets/routing-stats/"
                         "mixtral-8x7b.json (default: that file)")
    ap.add_argument("--oracle-recall", type=float, default=SHIPPED_PREDICTOR_RECALL,
                    help="recall of the noisy-oracle prefetch rows (default: the shipped tiny-mixtral predictor's "
                         "measured held-out recall at distance 1)")
    ap.add_argument("--configs", default="all",
                    help="comma-separated config names' prefixes, all, or none (only the quantization rows)")
    ap.add_argument("--quantize", default=",".join(QUANT_SCHEMES),
                    help="the quantization rows: comma-separated schemes run beside a float row of --quant-config "
                         "at the same budget, or none")
    ap.add_argument("--quant-config", default=QUANT_CONFIG, choices=list(CONFIGS)[:6],
                    help="the config of the quantization rows")
    ap.add_argument("--accelerate", default="random", choices=["random", "never"],
                    help="run the accelerate baseline after the random-routing rows, or not")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: start no new row after this (rows already measured are in --out)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=str(RESULTS), help="JSON lines file the results are appended to")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke-test sizes (see the module docstring)")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke sizes as defaults: an option given explicitly wins, even at its usual default
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)
    started = time.perf_counter()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    one_expert = expert_bytes(args, dtype)
    all_experts = one_expert * args.experts * args.layers
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{ap.prog}: --device {args.device} but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device.type == "cpu" and all_experts > CPU_EXPERT_BYTES_LIMIT:
        print(f"{ap.prog}: this size ({all_experts / 2**30:.1f} GiB of experts) is a GPU run and no CUDA device is "
              f"used; on the CPU run --smoke, or a shape under {CPU_EXPERT_BYTES_LIMIT / 2**30:.0f} GiB of experts",
              file=sys.stderr)
        return 2
    routings = [r.strip() for r in args.routing.split(",") if r.strip()]
    schemes = [] if args.quantize.strip() == "none" else [q.strip() for q in args.quantize.split(",") if q.strip()]
    for scheme in schemes:
        quant_label(scheme, args.dtype)  # an unknown scheme is refused before anything runs
    for routing_name in routings:
        if routing_name not in ("random", "calibrated"):
            raise ConfigError(f"--routing {routing_name!r}: random or calibrated")
    if args.expert_fraction:
        budget = int(all_experts * args.expert_fraction)
    else:
        budget = parse_bytes(args.expert_memory)
        if args.budget_per_32_layers:
            budget = budget * args.layers // 32
    # fewer layers of the full model: tokens/s x L/32 is the same run normalised to 32 layers
    scale = args.layers / 32 if args.budget_per_32_layers else None
    print(f"device {device}; {args.layers} layers x {args.experts} experts of {one_expert / 2**20:.1f} MiB "
          f"({all_experts / 2**30:.2f} GiB of experts); budget {budget / 2**30:.2f} GiB "
          f"({budget // one_expert} experts, {100 * budget / all_experts:.0f}%)")
    model = build_model(args, device, dtype)
    bandwidth = host_to_device_bandwidth(one_expert, device)
    source = ModuleExperts.from_module(model.model.layers[0].mlp.experts, "silu")
    cost = CostModel.measure(ModuleBacking({0: source}).template(0), source.activation, device) \
        if device.type == "cuda" else None
    stats_path = Path(args.routing_stats) if args.routing_stats else ROUTING_STATS
    reuse = lru_rate = calibrated = None
    if "calibrated" in routings:
        reuse, lru_rate = calibrate_reuse(stats_path, args.layers, args.top_k)
        calibrated = {**calibration(stats_path, args.layers), "reuse": reuse, "lru_4_of_8_hit_rate": lru_rate,
                      "target_lru_4_of_8_hit_rate": 0.615}
        print(f"calibrated routing ({stats_path.name}, mixtral-8x7b/github): popularity of layers "
              f"{sorted(set(calibrated['popularity_from_layer'].values()))}, pairs "
              f"{sorted(set(calibrated['pairs_from'].values()))}; reuse {reuse:.2f} gives LRU 4-of-8 hit rate "
              f"{lru_rate:.3f} (real Mixtral: 0.615)")
    if bandwidth:
        print(f"host->device {bandwidth / 1e9:.1f} GB/s pinned; CPU expert {1e3 * cost.cpu_seconds(1):.1f} ms at 1 row")

    run = {"bench": "offload", "run": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "python": platform.python_version(),
           "command": " ".join(["moe-infer bench offload", *(argv if argv is not None else sys.argv[1:])]),
           "shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "experts", "top_k", "dtype")},
           "budget_bytes": budget, "expert_bytes": one_expert, "prompt_tokens": args.prompt_tokens,
           "decode_tokens": args.decode_tokens, "repeats": args.repeats, "h2d_bytes_per_s": bandwidth,
           "normalised_to_32_layers": None if scale is None else f"tokens/s x {scale:.4f} (layers / 32)",
           "calibration": calibrated}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    append(args.out, {**run, "kind": "run"})

    traces = {}  # routing name -> the replayed trace (None: the random router)

    def routing_for(routing_name: str):
        if routing_name not in traces:
            traces[routing_name] = None if routing_name == "random" else calibrated_trace(
                stats_path, args.layers, args.experts, args.top_k, 4 * (args.prompt_tokens + args.decode_tokens + 8),
                reuse)
        return traces[routing_name]

    def emit(row: dict, routing_name: str) -> None:
        row["routing"] = routing_name
        if scale is not None:
            row["decode_tokens_per_s_normalised_32_layers"] = row["decode_tokens_per_s"] * scale
            row["prefill_tokens_per_s_normalised_32_layers"] = row["prefill_tokens_per_s"] * scale
        print(format_row(row, bandwidth, cost), flush=True)
        append(args.out, {"bench": "offload", "run": run["run"], "kind": "row", **row})

    def out_of_time() -> bool:
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s spent: no further rows", flush=True)
            return True
        return False

    for routing_name in routings:
        routing = routing_for(routing_name)
        for name, fields in CONFIGS.items():
            if args.configs != "all" and not any(name.startswith(p) for p in args.configs.split(",")):
                continue
            if ORACLE in name and routing is None:
                continue  # the oracle replays the calibrated trace
            if out_of_time():
                break
            emit(run_ours(model, name, fields, budget, args, device, routing), routing_name)
        moe_infer.wrap(model, moe_infer.MoEConfig())
        if routing_name == "random" and args.accelerate == "random" and not out_of_time():
            row = run_accelerate(model, budget, args, device)
            if row is not None:
                emit(row, routing_name)
                moe_infer.wrap(model)
    # the quantization rows: float, then each scheme on a freshly built model (quantizing releases
    # the float experts), at the same budget; the previous model is dropped before the next is built
    if schemes:
        fields = CONFIGS[args.quant_config]
        for scheme in [None, *schemes]:
            if out_of_time():  # before building a model for rows that would not run
                break
            if scheme is not None:
                moe_infer.wrap(model, moe_infer.MoEConfig())
                del model
                gc.collect()
                model = build_model(args, device, dtype)
            for routing_name in routings:
                if out_of_time():
                    break
                row = run_ours(model, f"{args.quant_config} [experts {quant_label(scheme, args.dtype)}]", fields,
                               budget, args, device, routing_for(routing_name), quantize=scheme)
                row["quantization_row"] = True
                emit(row, routing_name)
        moe_infer.wrap(model, moe_infer.MoEConfig())
    print(f"appended to {args.out}")
    return 0


def format_row(row: dict, bandwidth: float | None, cost: CostModel | None) -> str:
    """One printed line; sets row["floor_decode_tokens_per_s"] when the link's bandwidth is known."""
    hit = row.get("hit_rate")
    line = (f"{row['routing']:10s} {row['config']:52s} decode {row['decode_tokens_per_s']:8.2f} tok/s  "
            f"prefill {row['prefill_tokens_per_s']:9.1f} tok/s  hit {'  n/a' if hit is None else f'{hit:.3f}'}")
    if row.get("decode_tokens_per_s_normalised_32_layers") is not None:
        line += f"  (32-layer normalised: decode {row['decode_tokens_per_s_normalised_32_layers']:.2f} tok/s)"
    moved = row.get("bytes_moved_per_token")
    if row.get("quantization_row"):
        line += f"  experts {row['experts']:9s} slot {row['ran']['slot_bytes'] / 2**20:6.2f} MiB x {row['ran']['slots']}"
    if moved is not None:
        line += f"  moved {moved / 2**20:8.1f} MiB/token"
        if bandwidth:
            floor_s = moved / bandwidth + (row["cpu_experts_per_token"] * cost.cpu_seconds(1) if cost else 0.0)
            row["floor_decode_tokens_per_s"] = 1 / floor_s if floor_s else None
            line += f"  floor {row['floor_decode_tokens_per_s']:.2f} tok/s" if floor_s else ""
    if row.get("oracle_recall_measured") is not None:
        line += f"  oracle recall {row['oracle_recall_measured']:.3f}"
    return line


if __name__ == "__main__":
    sys.exit(main())
