#!/usr/bin/env python
"""Same as `moe-infer bench serve`: a bounded load test of the OpenAI-compatible server, expert vs fcfs
scheduling, with and without an expert budget (moe_infer/benchmarks/serve.py).
"""

import sys

from moe_infer.benchmarks.serve import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/bench_serve.py"))
