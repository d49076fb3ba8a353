#!/usr/bin/env bash
# On a GPU machine, in one go: build the CUDA extension, run every CUDA test (ops, gemv, whole model),
# compute-sanitizer memcheck + racecheck over one call of each CUDA op. Logs under $OUT (or /tmp).
# Usage: bash scripts/device_check.sh        (then: bash scripts/device_bench.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
O=${OUT:-/tmp}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1   # ahn_rt from the source tree
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} AHN_RT_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
status=0
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== build"
$PY setup.py build_ext --inplace > "$O/build.log" 2>&1 || { status=1; grep -E "error" "$O/build.log" | head -20; }
t1=$(date +%s)
echo "build $((t1 - t0)) s; == pytest -m cuda"
$PY -m pytest -m cuda tests/ -q -p no:cacheprovider > "$O/pytest_cuda.log" 2>&1 || status=1
grep -E "passed|failed|error" "$O/pytest_cuda.log" | tail -8
grep -E "rel err .* top-1" "$O/pytest_cuda.log" | head -8
t2=$(date +%s)
for script in scripts/sanitize_ops.py scripts/gemv_sanitize.py; do
  for tool in memcheck racecheck; do
    log="$O/san_$(basename "$script" .py)_$tool.log"
    if timeout 120 compute-sanitizer --tool $tool --error-exitcode 3 $PY "$script" > "$log" 2>&1; then
      echo "$tool $script: clean ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | head -1))"
    else
      echo "$tool $script: FAILED"; grep -E "ERROR SUMMARY|Invalid|Race|hazard|Error" "$log" | head -10; status=1
    fi
  done
done
echo "== done in $(( $(date +%s) - t0 )) s (tests $((t2 - t1)) s), status $status"
exit $status
