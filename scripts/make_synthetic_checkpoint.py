"""Write a random-weight checkpoint in the original hub layout at full-size dimensions.

    python scripts/make_synthetic_checkpoint.py mixtral-8x7b --layers 4 --out /tmp/mixtral-4l
    python scripts/make_synthetic_checkpoint.py deepseek-v3 --layers 2 --out /tmp/dsv3-2l   # FP8 blocks

Library code: moe_infer.experts.synthetic.
"""

from __future__ import annotations

import argparse
import math
import sys

from tqdm import tqdm

from moe_infer.experts.synthetic import FP8_BY_DEFAULT, PRESETS, hub_tensors, preset_config, write_synthetic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=PRESETS)
    parser.add_argument("--layers", type=int, required=True, help="decoder layers")
    parser.add_argument("--out", required=True, help="directory to create")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="maximum shard size in GB")
    parser.add_argument("--fp8", choices=["auto", "yes", "no"], default="auto",
                        help="FP8 projection weights with 128x128 block scales (auto: deepseek-v3 only)")
    parser.add_argument("--mtp-layer", action="store_true", help="add a DeepSeek-V3-style multi-token-prediction layer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        config = preset_config(args.preset, args.layers)
        fp8 = args.fp8 == "yes" or (args.fp8 == "auto" and args.preset in FP8_BY_DEFAULT)
        total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in hub_tensors(config).values())
        with tqdm(total=total, unit="B", unit_scale=True, desc=args.preset, file=sys.stderr) as bar:
            summary = write_synthetic(args.out, config, fp8=fp8, mtp_layer=args.mtp_layer,
                                      shard_bytes=int(args.shard_gb * 1e9), seed=args.seed, progress=bar.update)
    except ValueError as err:
        print(f"make_synthetic_checkpoint: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {summary['dst']}: {summary['bytes'] / 1e9:.2f} GB in {summary['shards']} shard(s), "
          f"{summary['tensors']} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
