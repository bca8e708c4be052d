#!/usr/bin/env bash
# The prepared GPU run: two calls of under 5 minutes each on a lent GPU (device time is short: 15
# minutes per task, start-up included, 10 per command). Run from the repository root:
#
#   bash scripts/gpu_session.sh call1   # the CUDA tests (cache on the GPU tier: the default
#                                       # gpu_memory-only config with cpu_compute="auto", the ring
#                                       # loader, the pinned host tier, a store-backed load; the
#                                       # fused kernels, float and quantized), then the untuned
#                                       # kernel benchmark (--time-budget 150)
#   bash scripts/gpu_session.sh call2   # tune the Mixtral-8x7B configs (float and int4, --quick,
#                                       # --time-budget 170), the tuned kernel rows, then the offload
#                                       # benchmark at Mixtral-8x7B shapes: 8 of 32 layers with the
#                                       # per-layer share of a 20 GiB budget, tokens/s normalised to
#                                       # 32 layers (labelled), ours vs plain LRU vs accelerate
#   bash scripts/gpu_session.sh call3   # the offload benchmark's quantization rows at Mixtral-8x7B
#                                       # shapes (issue 16): bf16, int8, int4-g128 experts at one
#                                       # budget, 4 of 32 layers, calibrated routing
#
# Every step writes under $OUT as it goes (logs, JSON lines, junit XML, tuned configs), so a call
# cut short still returns what it measured; each step has its own `timeout`. Without $OUT results go
# to bench/results/gpu-session/.
#
# Rehearsal on a machine without a GPU (checks every path, flag and output file at tiny shapes; the
# CUDA-only tests skip, the kernel tests are only collected; measures nothing):
#   REHEARSE=1 bash scripts/gpu_session.sh call1
#   REHEARSE=1 bash scripts/gpu_session.sh call2
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_session.sh call1|call2|call3}
out=${OUT:-bench/results/gpu-session}
rehearse=${REHEARSE:-0}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "== $(( $(date +%s) - start )) s: $*" | tee -a "$out/steps.log"; }

if [ "$rehearse" = 1 ]; then
    smoke=--smoke
    export TRITON_INTERPRET=1
else
    smoke=
    python3 - <<'EOF' || { echo "gpu_session: no CUDA device visible (REHEARSE=1 to rehearse on the CPU)" >&2; exit 2; }
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
    # the image has torch/triton/transformers; install only this package, without touching them
    python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1 || { cat "$out/pip.log"; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
fi
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
free -g | tee -a "$out/device.txt"

case "$stage" in
call1)
    step "cache tests on the GPU tier"
    timeout 90 python3 -m pytest -q -p no:cacheprovider --junitxml="$out/cache-tests.xml" \
        tests/test_cache_pool.py tests/test_cache_runtime.py::test_gpu_tier_with_pinned_host_tier \
        tests/test_store.py::test_pinned_reads_on_cuda tests/test_bench_offload.py::test_accelerate_row_reports_no_hit_rate \
        tests/test_quant_wrap.py::test_a_gpu_budget_caches_the_experts_quantized_in_memory \
        2>&1 | tee "$out/cache-tests.log"
    step "kernel tests"
    if [ "$rehearse" = 1 ]; then collect=--collect-only; else collect=; fi
    timeout 130 python3 -m pytest -q -p no:cacheprovider $collect --junitxml="$out/kernel-tests.xml" \
        tests/test_kernels.py tests/test_kernels_quantized.py 2>&1 | tail -40 | tee "$out/kernel-tests.log"
    step "kernel benchmark (untuned)"
    timeout 170 python3 scripts/bench_kernels.py $smoke --time-budget 150 --out "$out/kernels-untuned.jsonl" \
        2>&1 | tee "$out/bench-kernels-untuned.log"
    ;;
call2)
    if [ "$rehearse" = 1 ]; then  # --smoke tunes and benchmarks its own tiny layer
        model=()
        tokens=()
    else
        model=(--models mixtral-8x7b)
        tokens=(--tokens 1 16 256 4096)
    fi
    step "tune mixtral-8x7b (float, int4)"
    timeout 185 python3 scripts/tune_fused_moe.py "${model[@]}" --quant none int4 --quick $smoke \
        --time-budget 170 --out-dir "$out/configs" 2>&1 | tee "$out/tune.log"
    step "kernel rows with the tuned configs"
    MOE_INFER_KERNEL_CONFIG_DIR="$out/configs" timeout 35 python3 scripts/bench_kernels.py $smoke "${model[@]}" \
        --impls ours w4a16 grouped_mm "${tokens[@]}" --time-budget 25 \
        --out "$out/kernels-tuned.jsonl" 2>&1 | tee "$out/bench-kernels-tuned.log"
    step "offload benchmark"
    if [ "$rehearse" = 1 ]; then
        shape=(--smoke --repeats 1 --decode-tokens 4 --prompt-tokens 16)
    else  # 8 of the 32 layers: the host holds them pinned and the rows fit the call
        shape=(--layers 8 --expert-memory 20GiB --budget-per-32-layers --prompt-tokens 256 --decode-tokens 16 --repeats 2)
    fi
    # random routing first (its rows end with the accelerate baseline), then the calibrated trace
    timeout 90 python3 scripts/bench_offload.py "${shape[@]}" --routing random,calibrated \
        --configs "plain LRU,ours: expertflow + CPU compute,ours + noisy-oracle,LRU + noisy-oracle" \
        --quantize none --time-budget 70 --out "$out/offload.jsonl" 2>&1 | tee "$out/bench-offload.log"
    ;;
call3)
    step "offload benchmark: quantization rows"
    if [ "$rehearse" = 1 ]; then
        shape=(--smoke --repeats 1 --decode-tokens 4 --prompt-tokens 16)
    else  # 4 of the 32 layers, built three times (bf16, then quantized in memory on the GPU, one expert at a time)
        shape=(--layers 4 --expert-memory 20GiB --budget-per-32-layers --prompt-tokens 256 --decode-tokens 16 --repeats 2)
    fi
    timeout 240 python3 scripts/bench_offload.py "${shape[@]}" --routing calibrated --configs none \
        --accelerate never --quantize int8,int4 --time-budget 200 --out "$out/offload-quant.jsonl" 2>&1 \
        | tee "$out/bench-offload-quant.log"
    ;;
*)
    echo "gpu_session: unknown stage $stage (call1, call2 or call3)" >&2
    exit 2
    ;;
esac
step "done"
