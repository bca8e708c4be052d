#!/usr/bin/env python
"""Same as `moe-infer bench cache`: cache policies in the trace-driven simulator on a shipped
model's held-out text (moe_infer/benchmarks/cache.py).
"""

import sys

from moe_infer.benchmarks.cache import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/bench_cache.py"))
