#!/usr/bin/env python
"""Multi-GPU benchmark of one MoE layer under every sharding factor r and under `parallel="auto"`.

    torchrun --nproc-per-node 8 scripts/bench_parallel.py --shape mixtral --tokens 32,1024,8192
    deepspeed --num_gpus 8 scripts/bench_parallel.py --shape deepseek-v3

Every rank builds its own slice of random expert weights of the real shape (Mixtral-8x7B or
DeepSeek-V3 routed experts, bf16; nothing is loaded), routes random tokens (uniform, or Zipf-skewed
with --skew), and times the parallel expert step (dispatch, expert math, combine, weight exchange)
for each r: median of --repeat calls after --warmup, synchronised over ranks. Prints a table with the
cost model's estimate beside each measurement and appends one JSON line per run to
bench/results/parallel_bench.jsonl (rank 0). Needs at least 2 GPUs (one process per GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from moe_infer.distributed import cost as parallel_cost
from moe_infer.experts.math import Activation
from moe_infer.distributed.group import init_distributed
from moe_infer.distributed.parallel import ParallelExperts, ParallelRuntime
from moe_infer.distributed.shard import ExpertShard

SHAPES = {
    "mixtral": dict(num_experts=8, hidden_size=4096, intermediate_size=14336, top_k=2),
    "deepseek-v3": dict(num_experts=256, hidden_size=7168, intermediate_size=2048, top_k=8),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description="one MoE layer across GPUs, every sharding factor r")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    parser.add_argument("--tokens", default="32,1024,8192", help="tokens per GPU per call, comma-separated")
    parser.add_argument("--skew", type=float, default=0.0, help="Zipf exponent of expert popularity (0 = uniform)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", default=os.path.join("bench", "results", "parallel_bench.jsonl"),
                        help="JSON lines file appended to (default: under the current directory)")
    parser.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    return parser.parse_args(argv)


def route(tokens: int, shape: dict, skew: float, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    popularity = 1.0 / np.power(np.arange(1, shape["num_experts"] + 1, dtype=np.float64), skew)
    probs = torch.tensor(popularity / popularity.sum())
    ids = torch.multinomial(probs.expand(tokens, -1), shape["top_k"], replacement=False, generator=generator)
    weights = torch.rand(tokens, shape["top_k"], generator=generator)
    return ids.to(device), (weights / weights.sum(1, keepdim=True)).to(device)


def timed(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - start], device="cuda")
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a call is done when the slowest rank is
        times.append(float(elapsed))
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        print(f"bench_parallel: needs at least 2 GPUs (found {gpus}); run it as "
              f"`torchrun --nproc-per-node N scripts/bench_parallel.py` on a machine with N >= 2 GPUs", file=sys.stderr)
        return 2
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        print("bench_parallel: start one process per GPU: `torchrun --nproc-per-node N scripts/bench_parallel.py` "
              "or `deepspeed --num_gpus N scripts/bench_parallel.py` (N >= 2)", file=sys.stderr)
        return 2
    rank, world = init_distributed(backend="nccl")
    device = torch.device("cuda", torch.cuda.current_device())
    shape = SHAPES[args.shape]
    e, h, i_size, k = shape["num_experts"], shape["hidden_size"], shape["intermediate_size"], shape["top_k"]
    if i_size % world:
        print(f"bench_parallel: intermediate size {i_size} is not divisible by {world} ranks", file=sys.stderr)
        return 2
    generator = torch.Generator().manual_seed(rank)
    def random_slice(*shape):
        return (torch.randn(*shape, generator=generator) * h ** -0.5).to(device, torch.bfloat16)

    s = i_size // world
    shard = ExpertShard.of_slices(random_slice(e, 2 * s, h), random_slice(e, h, s), intermediate_size=i_size,
                                  world_size=world, activation=Activation("silu"))
    runtime = ParallelRuntime(0)
    experts = ParallelExperts(runtime, 0, shard)
    runtime.measure(device, torch.bfloat16)
    layer_shape = parallel_cost.LayerShape(e, h, i_size, k, 2)
    rs = parallel_cost.valid_rs(world, i_size)
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        hidden = torch.randn(tokens, h, generator=generator).to(device, torch.bfloat16)
        ids, routing_weights = route(tokens, shape, args.skew, generator, device)
        counts = torch.bincount(ids.reshape(-1), minlength=e).to(device)
        all_counts = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(all_counts, counts)
        table = torch.stack(all_counts).cpu().numpy()
        for r in [*rs, "auto"]:
            runtime.set(r)
            runtime.reset_stats()
            seconds = timed(lambda: experts(hidden, ids, routing_weights), args.warmup, args.repeat)
            stats = runtime.stats()
            chosen = stats["last_r"]
            est = parallel_cost.estimate(chosen, table, layer_shape, runtime.links, runtime.device_rates)
            rows.append({"tokens_per_gpu": tokens, "r": r, "chosen_r": chosen, "ms": seconds * 1e3,
                         "estimated_ms": est.seconds * 1e3, "bytes_sent_per_call": stats["bytes_sent_per_call"]})
    if rank == 0:
        print(f"{args.shape}, {world} GPUs ({torch.cuda.get_device_name(device)}), skew {args.skew}, "
              f"measured links {runtime.links.intra_bw / 1e9:.1f} GB/s, latency {runtime.links.latency_s * 1e6:.0f} us")
        print(f"{'tokens/GPU':>10} {'r':>5} {'chosen':>6} {'ms':>9} {'model ms':>9} {'MB sent/call':>12}")
        for row in rows:
            print(f"{row['tokens_per_gpu']:>10} {row['r']!s:>5} {row['chosen_r']:>6} {row['ms']:>9.3f} "
                  f"{row['estimated_ms']:>9.3f} {row['bytes_sent_per_call'] / 1e6:>12.1f}")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps({
                "kind": "parallel_bench", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "device": torch.cuda.get_device_name(device), "world_size": world, "shape": args.shape, **shape,
                "skew": args.skew, "dtype": "bfloat16", "torch": torch.__version__, "repeat": args.repeat,
                "links": dict(vars(runtime.links)), "rows": rows}) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
