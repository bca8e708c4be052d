"""Offloading benchmark: a Mixtral-8x7B-shaped model whose experts do not fit in GPU memory.

Default (GPU): all 32 layers, bf16, random weights, 20 GiB of GPU memory for experts (as on a
24 GB card); the experts live in pinned host memory (the backing). Measures decode tokens/s at
batch 1 and prefill tokens/s for a 512-token prompt, hit rate, bytes over PCIe per token, for:
- `accelerate` offload with the same memory limit (whole decoder layers' experts on the GPU until
  the limit, the rest streamed by accelerate's hooks at every forward), when accelerate is installed;
- plain on-demand LRU (the mixtral-offloading design);
- ours with each feature on and off (expertflow apportioning, CPU compute of misses, SE-MoE ring).
Routing both as the random router gives it and replayed from a trace calibrated with real
Mixtral-8x7B statistics (`../shared/data/routing-stats/`: per-layer popularity, cross-layer pair
counts; token-to-token reuse tuned so that LRU with 4 of 8 experts per layer hits 61.5%, the hit
rate of real Mixtral traces in `reference/anchors.md`). Prints the floor: bytes that must cross
PCIe per token at the measured hit rate over the measured host-to-device bandwidth, plus CPU time
of experts run there. Appends one JSON line per run to bench/results/offload.jsonl under the current
directory (``--out``).

    moe-infer bench offload                 # the GPU run (``python scripts/bench_offload.py`` is the same)

Without CUDA it refuses the full size. CPU smoke test (reduced size, CPU tier instead of GPU tier,
no accelerate; checks that the benchmark runs, measures nothing about offloading):
    moe-infer bench offload --smoke
which is short for
    moe-infer bench offload --layers 2 --hidden 256 --intermediate 512 --vocab 512 --heads 4 --kv-heads 2 \
        --prompt-tokens 64 --decode-tokens 16 --expert-fraction 0.25 --dtype float32 \
        --out bench/results/offload-cpu-smoke.jsonl
(options given beside ``--smoke`` win).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import moe_infer
from moe_infer.cache.backing import ModuleBacking
from moe_infer.cache.cpu_compute import CostModel
from moe_infer.cache.simulate import simulate
from moe_infer.config import parse_bytes
from moe_infer.experts.layout import ModuleExperts
from moe_infer.models import cache_argument, output_cache
from moe_infer.trace import Trace
from moe_infer.errors import ConfigError, MissingFile
from moe_infer.helpformat import HelpFormatter

SOURCE_TREE = Path(__file__).resolve().parents[2]  # the checkout, when moe_infer is installed from one
# the shared data folder sits beside the checkout (../shared) or beside the worktrees (../../shared)
ROUTING_STATS_CANDIDATES = list(dict.fromkeys(
    base / "shared" / "data" / "routing-stats" / "olmoe_repo_routing_stats.json"
    for root in (Path.cwd(), SOURCE_TREE) for base in (root, root.parent, root.parent.parent)))
RESULTS = Path("bench") / "results" / "offload.jsonl"  # under the current directory
# --smoke: a CPU-sized run (the command of bench/results/offload-cpu-smoke.md)
SMOKE = dict(layers=2, hidden=256, intermediate=512, vocab=512, heads=4, kv_heads=2, prompt_tokens=64,
             decode_tokens=16, expert_fraction=0.25, dtype="float32",
             out=str(Path("bench") / "results" / "offload-cpu-smoke.jsonl"))
CPU_EXPERT_BYTES_LIMIT = 4 * 2**30  # without CUDA, larger runs are refused: they are GPU runs

CONFIGS = {  # name -> MoEConfig fields (the budget is added per run)
    "plain LRU (mixtral-offloading design)": dict(cache_policy="lru", cpu_compute="never"),
    "ours: expertflow + CPU compute": dict(cache_policy="expertflow", cpu_compute="auto"),
    "ours - CPU compute": dict(cache_policy="expertflow", cpu_compute="never"),
    "ours - expertflow (LRU + CPU compute)": dict(cache_policy="lru", cpu_compute="auto"),
    "ours + ring loader": dict(loader="ring", cpu_compute="never"),
    "all misses on the CPU (Fiddler-like)": dict(cache_policy="expertflow", cpu_compute="always"),
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
    are in host memory (pinned on CUDA). Built on meta first: no second copy of 90 GB is made."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k, max_position_embeddings=4096)
    with torch.device("meta"):
        model = MixtralForCausalLM(config).to(dtype)
    generator = torch.Generator(device="cpu").manual_seed(0)
    pin = device.type == "cuda"
    for name, module in model.named_modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            is_expert = name.endswith(".experts")
            target = torch.device("cpu") if is_expert else device
            data = torch.empty(param.shape, dtype=dtype, device=target, pin_memory=pin and is_expert)
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


# -- calibrated routing --------------------------------------------------------------------------
def routing_stats_path(given: str | None) -> Path:
    if given:
        return Path(given)
    for path in ROUTING_STATS_CANDIDATES:
        if path.exists():
            return path
    raise MissingFile(f"routing statistics not found at {', '.join(map(str, ROUTING_STATS_CANDIDATES))}; "
                            f"give --routing-stats PATH or --routing random")


def calibrated_trace(stats_path: Path, num_layers: int, num_experts: int, top_k: int, num_tokens: int, reuse: float,
                     seed: int = 0, domain: str = "github") -> Trace:
    """Synthetic Mixtral routing: first choice at layer l drawn from P(e | previous layer's first
    choice) (cross-layer pair counts of real Mixtral), tilted to the real popularity of the nearest
    sampled layer; with probability `reuse` a token repeats the previous token's expert at that
    layer (temporal locality); further choices from the layer's popularity without replacement."""
    stats = json.loads(stats_path.read_text())
    model = "mixtral-8x7b"
    sampled = stats["layers_sampled"]  # [0, 7, 15]
    counts = np.array(stats["expert_counts"][model][domain], dtype=np.float64)  # [3, 8]
    pairs = stats["crosslayer_pairs"][model][domain]  # two lists of [e1, e2, count]
    transitions = []
    for rows in pairs:
        m = np.ones((8, 8))
        for e1, e2, c in rows:
            m[e1, e2] += c
        transitions.append(m / m.sum(axis=1, keepdims=True))
    if num_experts != 8:
        raise ConfigError("calibrated routing is Mixtral's: 8 experts")
    rng = np.random.default_rng(seed)
    popularity = [counts[int(np.argmin([abs(l * 31 / max(num_layers - 1, 1) - s) for s in sampled]))]
                  for l in range(num_layers)]
    popularity = [p / p.sum() for p in popularity]
    ids = np.zeros((num_tokens, num_layers, top_k), dtype=np.int32)
    for n in range(num_tokens):
        prev_first = None
        for l in range(num_layers):
            p = popularity[l]
            if n > 0 and rng.random() < reuse:
                first = int(ids[n - 1, l, 0])
            elif prev_first is None:
                first = int(rng.choice(8, p=p))
            else:
                t = transitions[0 if l * 31 / max(num_layers - 1, 1) < 7 else 1][prev_first] * p
                first = int(rng.choice(8, p=t / t.sum()))
            rest = p.copy()
            rest[first] = 0
            others = rng.choice(8, size=top_k - 1, replace=False, p=rest / rest.sum())
            ids[n, l] = [first, *others]
            prev_first = first
    weights = np.full(ids.shape, 1.0 / top_k, dtype=np.float32)
    return Trace.from_arrays(expert_ids=ids, expert_weights=weights, seq_ids=np.zeros(num_tokens, np.int32),
                             positions=np.arange(num_tokens), token_ids=np.zeros(num_tokens, np.int32),
                             num_experts=8, moe_layers=list(range(num_layers)), model="synthetic-mixtral",
                             family="mixtral", source=f"calibrated on {model}/{domain} routing statistics")


def calibrate_reuse(stats_path: Path, num_layers: int, top_k: int, target: float = 0.615) -> tuple[float, float]:
    """The temporal reuse whose trace gives LRU (4 of 8 per layer) the real Mixtral hit rate."""
    best = (0.0, 0.0)
    for reuse in np.arange(0.0, 0.75, 0.05):
        rate = simulate(calibrated_trace(stats_path, num_layers, 8, top_k, 600, float(reuse), seed=1), "lru", 4).hit_rate
        if best == (0.0, 0.0) or abs(rate - target) < abs(best[1] - target):
            best = (float(reuse), rate)
    return best


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


def run_ours(model, name: str, fields: dict, budget: int, args, device, routing) -> dict:
    tier = "gpu" if device.type == "cuda" else "cpu"
    moe_infer.wrap(model, moe_infer.MoEConfig(**{f"{tier}_memory": budget}, routing_override=routing, **fields))
    ex = moe_infer.executor(model)
    decode_tokens_per_s(model, args, device, 1)  # warm-up: threads, cost model, a warm cache
    ex.reset_stats()
    decode_tps = decode_tokens_per_s(model, args, device, args.repeats)
    stats = ex.stats()  # decode only (the 8-token prompts included)
    t = stats["tiers"][tier]
    tokens = stats["tokens"]
    prefill_tps = prefill_tokens_per_s(model, args, device)
    return {"config": name, "fields": fields, "decode_tokens_per_s": decode_tps, "prefill_tokens_per_s": prefill_tps,
            "hit_rate": t["hits"] / max(t["hits"] + t["misses"], 1), "bytes_moved_per_token": t["bytes_moved"] / tokens,
            "cpu_experts_per_token": stats["cpu_computed_experts"] / tokens, "stall_seconds": stats["stall_seconds"],
            "peak_bytes": t["peak_bytes"], "tokens": tokens}


def run_accelerate(model, budget: int, args, device) -> dict | None:
    """accelerate's offload with the same memory limit: the experts of the first decoder layers go to
    the GPU until the limit; the others stay on the CPU and accelerate moves them in at every forward."""
    if device.type != "cuda":
        return None
    try:
        from accelerate import dispatch_model
        from accelerate.hooks import remove_hook_from_submodules
    except ImportError:
        print("accelerate not installed (pip install 'moe_infer[bench]'): skipping its baseline", file=sys.stderr)
        return None
    moe_infer.unwrap(model)
    layer_bytes = args.experts * expert_bytes(args, next(model.parameters()).dtype)
    on_gpu = budget // layer_bytes
    device_map = {"": device.index or 0}
    for i in range(args.layers):
        device_map[f"model.layers.{i}.mlp.experts"] = (device.index or 0) if i < on_gpu else "cpu"
    dispatch_model(model, device_map=device_map, main_device=str(device))
    decode_tps, prefill_tps = decode_tokens_per_s(model, args, device, args.repeats), prefill_tokens_per_s(model, args, device)
    remove_hook_from_submodules(model)
    return {"config": f"accelerate offload ({on_gpu} of {args.layers} layers' experts on GPU)",
            "decode_tokens_per_s": decode_tps, "prefill_tokens_per_s": prefill_tps,
            "hit_rate": on_gpu / args.layers, "bytes_moved_per_token": None}


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
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--routing", default="random,calibrated", help="random and/or calibrated")
    ap.add_argument("--routing-stats", default=None, help="a routing statistics file in the format of olmoe_repo_routing_stats.json")
    ap.add_argument("--configs", default="all", help="comma-separated config names' prefixes, or all")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=str(RESULTS), help="JSON lines file the results are appended to")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke-test sizes (see the module docstring)")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke sizes, except where an option was given explicitly
        for name, value in SMOKE.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)

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
    budget = int(all_experts * args.expert_fraction) if args.expert_fraction else parse_bytes(args.expert_memory)
    print(f"device {device}; {args.layers} layers x {args.experts} experts of {one_expert / 2**20:.1f} MiB "
          f"({all_experts / 2**30:.2f} GiB of experts); budget {budget / 2**30:.2f} GiB "
          f"({budget // one_expert} experts, {100 * budget / all_experts:.0f}%)")
    model = build_model(args, device, dtype)
    bandwidth = host_to_device_bandwidth(one_expert, device)
    source = ModuleExperts.from_module(model.model.layers[0].mlp.experts, "silu")
    cost = CostModel.measure(ModuleBacking({0: source}).template(0), source.activation, device) \
        if device.type == "cuda" else None
    routings = [r.strip() for r in args.routing.split(",") if r.strip()]
    reuse = lru_rate = None
    if "calibrated" in routings:
        stats_path = routing_stats_path(args.routing_stats)
        reuse, lru_rate = calibrate_reuse(stats_path, args.layers, args.top_k)
        print(f"calibrated routing: reuse {reuse:.2f} gives LRU 4-of-8 hit rate {lru_rate:.3f} (real Mixtral: 0.615)")
    if bandwidth:
        print(f"host->device {bandwidth / 1e9:.1f} GB/s pinned; CPU expert {1e3 * cost.cpu_seconds(1):.1f} ms at 1 row")

    rows = []
    for routing_name in routings:
        routing = None
        if routing_name == "calibrated":
            routing = calibrated_trace(stats_path, args.layers, args.experts, args.top_k,
                                       4 * (args.prompt_tokens + args.decode_tokens + 8), reuse)
        elif routing_name != "random":
            raise ConfigError(f"--routing {routing_name!r}: random or calibrated")
        for name, fields in CONFIGS.items():
            if args.configs != "all" and not any(name.startswith(p) for p in args.configs.split(",")):
                continue
            row = run_ours(model, name, fields, budget, args, device, routing)
            row["routing"] = routing_name
            rows.append(row)
            print(format_row(row, bandwidth, cost), flush=True)
        moe_infer.wrap(model, moe_infer.MoEConfig())
        if routing_name == "random":
            row = run_accelerate(model, budget, args, device)
            if row is not None:
                row["routing"] = routing_name
                rows.append(row)
                print(format_row(row, bandwidth, cost), flush=True)
                moe_infer.wrap(model)
    record = {"bench": "offload", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or "cpu", "torch": torch.__version__, "python": platform.python_version(),
              "shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "experts", "top_k", "dtype")},
              "budget_bytes": budget, "expert_bytes": one_expert, "prompt_tokens": args.prompt_tokens,
              "decode_tokens": args.decode_tokens, "repeats": args.repeats, "h2d_bytes_per_s": bandwidth,
              "calibrated_reuse": reuse, "rows": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"appended to {args.out}")
    return 0


def format_row(row: dict, bandwidth: float | None, cost: CostModel | None) -> str:
    line = (f"{row['routing']:10s} {row['config']:42s} decode {row['decode_tokens_per_s']:8.2f} tok/s  "
            f"prefill {row['prefill_tokens_per_s']:9.1f} tok/s  hit {row['hit_rate']:.3f}")
    moved = row.get("bytes_moved_per_token")
    if moved is not None:
        line += f"  moved {moved / 2**20:8.1f} MiB/token"
        if bandwidth:
            floor_s = moved / bandwidth + (row["cpu_experts_per_token"] * cost.cpu_seconds(1) if cost else 0.0)
            row["floor_decode_tokens_per_s"] = 1 / floor_s if floor_s else None
            line += f"  floor {row['floor_decode_tokens_per_s']:.2f} tok/s" if floor_s else ""
    return line


if __name__ == "__main__":
    sys.exit(main())
