#!/usr/bin/env bash
# Everything open issues #10 and #11 need from a lent GPU, as ONE call of the device tool (about
# 6-9 minutes on an H100/H200; each step is bounded, and a failing step does not stop the later ones):
#
#   bash bench/gpu_session.sh            # outputs under $OUT (or bench/gpu_out), RESULTS.md appended
#
# 1. the Triton memory kernel: tests compiled on the device, then bench_kernels --record (#10);
# 2. banded vs dense sliding-window attention at 4K-32K tokens, bf16 (#10, deliverable 4);
# 3. streaming a small model over 1M and 2M tokens: tokens/s and peak memory (#11).
set -u
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-bench/gpu_out}
mkdir -p "$out"
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
step() {  # name, time limit (s), command...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]}"
}
step kernel_tests 150 "$py" -m pytest -q tests/models/test_memory_kernels.py
step bench_kernels 200 "$py" bench/bench_kernels.py --record
step bench_attention 90 "$py" bench/bench_attention.py --device cuda --dtype bfloat16 --T 4096 16384 32768
for tokens in 1048576 2097152; do
    step "streaming_$tokens" 120 "$py" bench/bench_streaming.py --device cuda --tokens "$tokens" \
        --piece-len 8192 --json "$out/streaming_$tokens.json"
done
cp bench/RESULTS.md "$out/RESULTS.md"
