#!/usr/bin/env bash
# On a GPU machine: build the CUDA extension, run the CUDA op tests, then compute-sanitizer memcheck and
# racecheck over one call of each op (scripts/sanitize_ops.py). Usage: bash scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # import ahn_rt from the source tree (build_ext --inplace)
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} AHN_RT_CUDA=1 MAX_JOBS=${MAX_JOBS:-8}
status=0
t0=$(date +%s)
echo "== build"; $PY setup.py build_ext --inplace -q 2>&1 | grep -vE "^(copying|running)" | tail -20 || status=1
t1=$(date +%s)
echo "== pytest -m cuda ($((t1 - t0)) s build)"
$PY -m pytest -m cuda tests/test_ops.py -x -q 2>&1 | tail -15 || status=1
t2=$(date +%s)
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  if compute-sanitizer --tool $tool --error-exitcode 3 $PY scripts/sanitize_ops.py > /tmp/san_$tool.log 2>&1; then
    echo "$tool: clean ($(grep -c '' /tmp/san_$tool.log) lines of output)"
  else
    echo "$tool: FAILED"; grep -E "ERROR SUMMARY|Invalid|Race|hazard|Error" /tmp/san_$tool.log | head -20; status=1
  fi
done
echo "== done in $(( $(date +%s) - t0 )) s (tests $((t2 - t1)) s), status $status"
exit $status
