#!/usr/bin/env bash
# The GPU checks of issues 5 and 7 in four stages, each sized to finish inside a 10-minute slot of
# a lent H100/H200 (30 device-minutes in all: run them in this order, most needed first). Run from
# the repository root:
#
#   bash scripts/gpu_session.sh check            # CUDA tests (kernels at real shapes, bf16, copy
#                                                # streams, pinned memory), then the untuned kernel benchmark
#   bash scripts/gpu_session.sh offload          # offloading, Mixtral-8x7B shape, 32 layers, routing
#                                                # calibrated on real Mixtral statistics: ours vs plain LRU
#   bash scripts/gpu_session.sh offload-random   # the same on the random router's routing, plus the
#                                                # accelerate offload baseline
#   bash scripts/gpu_session.sh tune             # tune the fused MoE configs for the three benchmark
#                                                # shapes, then benchmark again with them
#
# Each benchmark is stopped after 9.5 minutes (`timeout 570`) so its log still comes back.
#
# Results land in bench/results/ and kernels/configs/ (commit them); when $OUT is set (the lent
# machine), copies and the logs go there too so they come back. The offload benchmark's calibrated
# routing reads ../shared/data/routing-stats; copy that folder to ./shared/data/ first when the
# machine only receives the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_session.sh check|offload|offload-random|tune}
out=${OUT:-bench/results/gpu-session}
mkdir -p "$out" bench/results
export PYTHONUNBUFFERED=1

python3 - <<'EOF' || { echo "gpu_session: no CUDA device visible" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
# The image has torch/triton/transformers; install only this package, without touching them.
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1 || { cat "$out/pip.log"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"

case "$stage" in
check)
    python3 -m pytest -q -x tests/test_kernels.py tests/test_kernels_align.py tests/test_cache_runtime.py \
        tests/test_store.py tests/test_kernels_compile.py 2>&1 | tee "$out/check-tests.log"
    timeout 400 python3 scripts/bench_kernels.py 2>&1 | tee "$out/bench-kernels-untuned.log"
    cp bench/results/kernels.jsonl "$out/" 2>/dev/null
    ;;
tune)
    timeout 420 python3 scripts/tune_fused_moe.py --models mixtral-8x7b deepseek-v2-lite qwen3-30b-a3b --quick \
        2>&1 | tee "$out/tune.log"
    timeout 150 python3 scripts/bench_kernels.py 2>&1 | tee "$out/bench-kernels-tuned.log"
    tar czf "$out/configs.tar.gz" kernels/configs/*.json 2>/dev/null || true
    cp bench/results/kernels.jsonl "$out/" 2>/dev/null
    ;;
offload)
    timeout 570 python3 scripts/bench_offload.py --routing calibrated 2>&1 | tee "$out/bench-offload.log"
    cp bench/results/offload.jsonl "$out/" 2>/dev/null
    ;;
offload-random)
    timeout 570 python3 scripts/bench_offload.py --routing random \
        --configs "plain LRU,ours: expertflow + CPU compute,ours - CPU compute" 2>&1 | tee "$out/bench-offload-random.log"
    cp bench/results/offload.jsonl "$out/" 2>/dev/null
    ;;
*)
    echo "gpu_session: unknown stage $stage (check, offload, offload-random or tune)" >&2
    exit 2
    ;;
esac
