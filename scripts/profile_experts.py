#!/usr/bin/env python
"""Record an expert trace: `moe-infer profile` as a script (the work is in `moe_infer.traces.profiler`).

    python scripts/profile_experts.py --model tiny-mixtral --text corpus.txt --out trace.safetensors
"""

import sys

from moe_infer.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
