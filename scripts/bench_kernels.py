#!/usr/bin/env python
"""Same as `moe-infer bench kernels`: one MoE layer on the GPU, fused Triton kernels against transformers' experts and the roofline
(moe_infer/benchmarks/kernels.py).
"""

import sys

from moe_infer.benchmarks.kernels import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/bench_kernels.py"))
