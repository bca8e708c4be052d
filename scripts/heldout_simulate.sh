#!/bin/bash
# Regenerates every figure of bench/results/tiny-mixtral-heldout-simulate.md: one trace of the shipped
# tiny-mixtral over the first five held-out stdlib files (12,000 tokens), then each simulator run
# the page shows, each written to its own JSON file beside the page.
#   bash scripts/heldout_simulate.sh [OUT]        # OUT: default bench/results under the current directory
set -euo pipefail
out=${1:-bench/results}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
files=$(python -c "
from moe_infer.traces.corpus import is_heldout, stdlib_files
_, files = stdlib_files()
print(' '.join(str(path) for rel, path in files if is_heldout(rel))[:100000])" | tr ' ' '\n' | head -5 | tr '\n' ' ')
moe-infer profile --model tiny-mixtral --text $files --out "$work/heldout.safetensors" --max-tokens 12000
sim() { name=$1; shift; moe-infer simulate --trace "$work/heldout.safetensors" "$@" --json "$out/tiny-mixtral-heldout-simulate$name.json"; }
sim "" --policy lru,lfu,static,belady --capacity 2,4,6
sim "-total" --policy lru,lfu,static,belady --capacity 24 --total
for noise in 0 0.3 0.6; do
  sim "-oracle-$noise" --policy lru,lfu,expertflow --capacity 4 --predictor oracle --oracle-noise "$noise"
done
sim "-total-oracle-0.3" --policy lru,expertflow --capacity 24 --total --predictor oracle --oracle-noise 0.3
