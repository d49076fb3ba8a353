#!/usr/bin/env bash
# On a GPU machine, in one call: build this tree and an older tree (OLD, e.g. a `git archive` of an earlier
# commit) side by side, run every CUDA test and compute-sanitizer memcheck on this tree, then the decode
# benchmark on both trees, so that "before" and "after" come from one run on one card.
# Usage: bash scripts/device_ab.sh OLD_DIR [extra decode_latency.py args]     (logs and JSON under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: device_ab.sh OLD_DIR [bench args]}
shift
O=${OUT:-/tmp}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} AHN_RT_CUDA=1
PY=${PYTHON:-python3}
BENCH=(--quick --contexts 1k,32k,128k --skip full,ref,hf,hf-compile,fla "$@")
status=0
t0=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
stage "build both trees"
(cd "$OLD" && MAX_JOBS=8 $PY setup.py build_ext --inplace > "$O/build_old.log" 2>&1) &
old_pid=$!
MAX_JOBS=8 $PY setup.py build_ext --inplace > "$O/build.log" 2>&1 || { status=1; grep -E "error" "$O/build.log" | head -20; }
wait $old_pid || { echo "old build failed"; grep -E "error" "$O/build_old.log" | head -5; }
stage "pytest -m cuda"
PYTHONPATH="$PWD" timeout 240 $PY -m pytest -m cuda tests/test_ops.py tests/test_gemv.py tests/test_cuda_model.py tests/test_state.py -q --maxfail=20 -p no:cacheprovider > "$O/pytest_cuda.log" 2>&1 || status=1
grep -E "passed|failed|error" "$O/pytest_cuda.log" | tail -6
grep -E "^FAILED|Error" "$O/pytest_cuda.log" | head -10
stage "decode bench, this tree"
PYTHONPATH="$PWD" timeout 150 $PY bench/decode_latency.py "${BENCH[@]}" --json "$O/bench_new.json" --commit "${COMMIT:-new}" > "$O/bench_new.md" 2> "$O/bench_new.err" || status=1
tail -12 "$O/bench_new.md"
stage "decode bench, old tree"
(cd "$OLD" && PYTHONPATH="$PWD" timeout 150 $PY bench/decode_latency.py "${BENCH[@]}" --json "$O/bench_old.json" --commit "${OLD_COMMIT:-old}" > "$O/bench_old.md" 2> "$O/bench_old.err")
tail -12 "$O/bench_old.md"
stage "compute-sanitizer memcheck"
for script in scripts/sanitize_ops.py scripts/gemv_sanitize.py; do
  log="$O/san_$(basename "$script" .py).log"
  if PYTHONPATH="$PWD" timeout 90 compute-sanitizer --tool memcheck --error-exitcode 3 $PY "$script" > "$log" 2>&1; then
    echo "memcheck $script: clean ($(grep -E 'ERROR SUMMARY' "$log" | head -1))"
  else
    echo "memcheck $script: FAILED"; grep -E "ERROR SUMMARY|Invalid|Error" "$log" | head -8; status=1
  fi
done
stage "done, status $status"
exit $status
