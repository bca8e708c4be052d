"""The benchmarks behind ``moe-infer bench NAME``.

One module per benchmark, each with ``main(argv=None, prog=None) -> int`` and its own argparse
options (a benchmark's own helpers may sit beside it, as ``offload_routing.py`` does for
``offload.py``); ``scripts/bench_NAME.py`` are thin shells over the same ``main``. Results go to
``bench/results/`` under the current directory unless ``--out`` says otherwise.
"""

from __future__ import annotations
from moe_infer.errors import ConfigError

BENCHMARKS = {
    "kernels": "one MoE layer on the GPU: fused Triton kernels vs transformers' experts and the roofline (CUDA)",
    "offload": "decode/prefill of a Mixtral-8x7B-shaped model whose experts do not fit in GPU memory "
               "(CUDA; --smoke for a small CPU run)",
    "predictors": "recall of every routing predictor on the shipped tiny models, simulator and executor hit rates",
    "cache": "cache policies (lru, lfu, static, expertflow with predictors, belady) in the trace-driven "
             "simulator on a shipped model's held-out text, at several capacities",
    "serve": "a bounded load test of `moe-infer serve` (servers it starts itself): throughput, TTFT, inter-token "
             "latency, distinct experts per micro-batch, expert vs fcfs, with and without an expert budget",
}


def run(name: str, argv: list[str], prog: str | None = None) -> int:
    """Run benchmark ``name`` with its command-line arguments ``argv``; its exit status."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; benchmarks are {', '.join(BENCHMARKS)}")
    from importlib import import_module

    return import_module(f"moe_infer.benchmarks.{name}").main(argv, prog=prog)
