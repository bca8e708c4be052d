#!/usr/bin/env python
"""Tune the fused MoE kernels' launch configs on this GPU and write them as data to
moe_infer/kernels/configs/ (moe_infer/kernels/tuning.py; `--help` for the options).
"""

import sys

from moe_infer.kernels.tuning import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/tune_fused_moe.py"))
