#!/usr/bin/env python
"""Same as `moe-infer bench offload`: a Mixtral-8x7B-shaped model whose experts do not fit in GPU memory
(moe_infer/benchmarks/offload.py).
"""

import sys

from moe_infer.benchmarks.offload import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/bench_offload.py"))
