#!/usr/bin/env python
"""Same as `moe-infer bench predictors`: recall of every routing predictor on the shipped tiny
models (moe_infer/benchmarks/predictors.py).

    python scripts/bench_predictors.py --models tiny-mixtral --epochs 2
"""

import sys

from moe_infer.benchmarks.predictors import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/bench_predictors.py"))
