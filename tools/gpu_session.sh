#!/usr/bin/env bash
# Every pending GPU measurement, as ONE call of the device tool (about 3-8 minutes on an H100/H200;
# each step is bounded, the whole run to 470 s, and a failing step does not stop the later ones;
# give the device call a timeout of about 540 s):
#
#   bash tools/gpu_session.sh            # everything it writes goes under $OUT (or bench/gpu_out)
#
# 1. the Triton memory kernel: tests compiled on the device, then bench_kernels --record;
# 2. what keeping every k-th chunk-start state costs the kernels (bench_memory_saved, k = 1 and 4);
# 3. banded vs dense sliding-window attention at 4K-32K tokens, bf16;
# 4. streaming a small model over 1M and 2M tokens: tokens/s and peak memory.
#
# Made for the lent machine as it is: `python3` (no `python`; PYTHON overrides), nothing installed
# from a registry. The package is imported from the checkout (PYTHONPATH, no install). Pure-Python
# wheels carried in the ignored folder .whl/ (titans-pytorch and its dependencies, the peer in
# bench_kernels, built for the machine's Python) are installed into a temporary folder on
# PYTHONPATH when .whl/ holds any; without them the titans-pytorch cases are reported as skipped.
# titans-pytorch 0.5.5 also needs pyvers (<0.3), cloudpickle and loguru: make sure .whl/ has them
# (`pip download --no-deps pyvers==0.2.3 cloudpickle==3.1.3 loguru==0.7.3 -d .whl`, on a machine
# with a registry), else `import titans_pytorch` fails.
# Outputs in $OUT: gpu.txt, env.txt, wheels.log, <step>.log, kernel_tests.xml, streaming_*.json,
# RESULTS.md (the checkout's, after the appends), RESULTS.appended.md (only what this run appended)
# and summary.txt (each step's exit status; 124 = ran out of time). The exit status is 1 if any step
# failed. GPU_SESSION_BUDGET_S (default 470) caps the whole run: each step's limit is cut to what is
# left, and a step with under 20 s left is skipped.
set -u
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-bench/gpu_out}
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
deadline=$((SECONDS + ${GPU_SESSION_BUDGET_S:-470}))
failed=0
: >"$out/summary.txt"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

step() {  # name, time limit (s), command...: runs it bounded, logs to $out/<name>.log, never exits
    local name=$1 limit=$2 left rc
    shift 2
    left=$((deadline - SECONDS))
    if ((left < 20)); then
        echo "=== $name: skipped (${left}s left of the session budget)" | tee -a "$out/summary.txt"
        failed=1
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc" | tee -a "$out/summary.txt"
    ((rc == 0)) || failed=1
    return 0
}

if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
else
    echo "nvidia-smi: not found" | tee "$out/gpu.txt"
fi

# Carried wheels -> a temporary folder (removed at exit); none carried: skip.
wheel_dir=
shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if ((${#wheels[@]})); then
    wheel_dir=$(mktemp -d)
    trap 'rm -rf "$wheel_dir"' EXIT
    if timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --target "$wheel_dir" "${wheels[@]}" \
        >"$out/wheels.log" 2>&1; then
        echo "installed ${#wheels[@]} wheels from .whl/ into $wheel_dir" | tee -a "$out/wheels.log"
    else
        echo "=== wheels: install failed (see wheels.log); going on without them" | tee -a "$out/summary.txt"
        failed=1
    fi
else
    echo "no .whl/*.whl carried: titans-pytorch cases will be skipped" | tee "$out/wheels.log"
fi
export PYTHONPATH="${wheel_dir:+$wheel_dir:}$PWD${PYTHONPATH:+:$PYTHONPATH}"

timeout 60 "$py" - >"$out/env.txt" 2>&1 <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "numpy", "titans_pytorch"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as err:
        print(name, "not importable:", repr(err))
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
cat "$out/env.txt"

results_lines=$(wc -l <bench/RESULTS.md 2>/dev/null || echo 0)

step kernel_tests 150 "$py" -m pytest -q -p no:cacheprovider -rfEs --junitxml "$out/kernel_tests.xml" \
    tests/models/test_memory_kernels.py
step bench_kernels 180 "$py" bench/bench_kernels.py --record --case-budget-s 20
step bench_memory_saved 45 "$py" bench/bench_memory_saved.py --device cuda --intervals 1 4 --record
step bench_attention 75 "$py" bench/bench_attention.py --device cuda --dtype bfloat16 --T 4096 16384 32768
step streaming_1048576 100 "$py" bench/bench_streaming.py --device cuda --tokens 1048576 \
    --piece-len 8192 --json "$out/streaming_1048576.json"
step streaming_2097152 150 "$py" bench/bench_streaming.py --device cuda --tokens 2097152 \
    --piece-len 8192 --json "$out/streaming_2097152.json"

if [ -f bench/RESULTS.md ]; then
    cp bench/RESULTS.md "$out/RESULTS.md"
    tail -n +"$((results_lines + 1))" bench/RESULTS.md >"$out/RESULTS.appended.md"
fi
echo "=== done in ${SECONDS}s; outputs in $out"
cat "$out/summary.txt"
exit "$failed"
