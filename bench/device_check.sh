#!/usr/bin/env bash
# Every GPU check of the fast path in one call (under 8 minutes on an H200): the GPU tests, the benchmark with its
# speed options, fp16 against fp32, then torch.compile (last: it compiles for a minute or more). Each step has its
# own time limit inside one overall budget, so a slow step costs only what comes after it. Needs torch and
# transformers only (no diffusers, no open_clip).
#
#   bash bench/device_check.sh          # results in $OUT (default outputs/device_check): env.txt, tests.log,
#                                       # bench.log, bench.json, fp16.log, compile.log, compile.json
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/device_check}"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-470}"  # seconds for the whole script
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$SECONDS

step() {  # step NAME LIMIT LOG COMMAND...: run with min(LIMIT, what is left of the budget), log to $OUT/LOG
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((BUDGET - (SECONDS - start)))
    if ((left < 20)); then
        echo "== $name: skipped, the time budget is spent" | tee -a "$OUT/$log"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit} s, $((SECONDS - start)) s used)" | tee -a "$OUT/$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$OUT/$log"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "import sys, torch, transformers, safetensors; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'safetensors',
safetensors.__version__, 'gpus', torch.cuda.device_count())"
} 2>&1 | tee "$OUT/env.txt"

step "GPU tests" 150 tests.log "$PY" -m pytest -q -p no:cacheprovider -rs -s tests/test_cuda_graphs.py \
    tests/test_script_gpu.py
step "benchmark: SD 1.5 512 px and SDXL 1024 px, batch 1 and 4, speed options" 240 bench.log \
    "$PY" bench/bench_oms.py --speed-options --json "$OUT/bench.json"
step "fp16 against fp32" 60 fp16.log "$PY" bench/fp16_check.py
step "torch.compile of the OMS network" 150 compile.log \
    "$PY" bench/bench_oms.py --options-only --compile --json "$OUT/compile.json"
echo "device_check: $((SECONDS - start)) s in all; results in $OUT"
