#!/usr/bin/env bash
# On a GPU machine, in one go: build the CUDA extension, run the CUDA tests of ahn_rt.gemv, time it
# (bench/gemv_bench.py). Logs under $OUT (or /tmp). Usage: bash scripts/gemv_device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
O=${OUT:-/tmp}
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} AHN_RT_CUDA=1 \
  MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv
if ! $PY -m pytest --version >/dev/null 2>&1 && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
echo "== build"
$PY setup.py build_ext --inplace > $O/build.log 2>&1; rc=$?
grep -E "error|gemv.*warning" $O/build.log | head -20
echo "build rc=$rc in $(( $(date +%s) - t0 )) s"
[ $rc -eq 0 ] || exit 1
echo "== pytest -m cuda tests/test_gemv.py"
t1=$(date +%s)
$PY -m pytest -m cuda tests/test_gemv.py -q --maxfail=10 -p no:cacheprovider > $O/pytest.log 2>&1
echo "pytest rc=$? in $(( $(date +%s) - t1 )) s"; tail -25 $O/pytest.log
echo "== bench"
$PY bench/gemv_bench.py --json $O/gemv_bench.json 2>&1 | tee $O/bench.log
echo "== compute-sanitizer"
for tool in memcheck racecheck; do
  timeout 60 compute-sanitizer --tool $tool --error-exitcode 3 $PY scripts/gemv_sanitize.py > $O/san_$tool.log 2>&1
  echo "$tool rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $O/san_$tool.log | head -2)"; grep -E "Invalid|hazard" $O/san_$tool.log | head -5
done
echo "== done in $(( $(date +%s) - t0 )) s"
