#!/usr/bin/env bash
# On a GPU machine, in one call: build, the CUDA tests of the memory variants, then the same decode and
# prefill rows for GatedDeltaNet, DeltaNet and Mamba2 at the 3B shape (the variants issue's table).
# Usage: bash scripts/device_variants.sh        (logs and JSON under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
O=${OUT:-/tmp}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export AHN_RT_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
python3 setup.py build_ext --inplace > "$O/build.log" 2>&1 || { grep -E "error" "$O/build.log" | head -20; exit 1; }
timeout 150 $PY -m pytest -m cuda tests/test_variants.py tests/test_prefill.py tests/test_step.py -q -p no:cacheprovider > "$O/pytest_variants.log" 2>&1
grep -E "passed|failed" "$O/pytest_variants.log" | tail -2
for v in gdn dn mamba2; do
  timeout 120 $PY bench/decode_latency.py --quick --contexts 1k,32k --prefill 2k --skip full,ref,hf,hf-compile,fla \
    --ahn-impl $v --json "$O/variant_$v.json" > "$O/variant_$v.md" 2> "$O/variant_$v.err"
  grep -E "^\| (tg|pp)" "$O/variant_$v.md"
done
