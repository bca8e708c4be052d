"""Convert a Hugging Face MoE checkpoint into moe_infer's expert-addressable layout.

    python scripts/convert_checkpoint.py SRC DST [--dtype bfloat16] [--fp8 keep] [--verify]

The same as `moe-infer convert`; library code: moe_infer.experts.convert.
"""

from __future__ import annotations

import sys

from moe_infer.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
