#!/usr/bin/env bash
# Compile CUDA sources for Hopper without a GPU or a CUDA build of torch: catches compile errors before a
# device run. Needs nvcc on PATH and a torch install (a CPU wheel carries the CUDA headers).
# Usage: bash scripts/nvcc_check.sh [csrc/cuda/foo.cu ...]     (default: every csrc/cuda/*.cu, in parallel)
# With no arguments it also checks the C++ host files and ops.cpp as the CUDA build sees them (g++ syntax
# only; the CPU wheel lacks one generated c10/cuda header, stood in for by an empty one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TI=$($PY -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PYI=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
files=("$@")
[ ${#files[@]} -eq 0 ] && files=(csrc/cuda/*.cu)
status=0
for f in "${files[@]}"; do
  nvcc -std=c++17 -arch=sm_90 -O3 --expt-relaxed-constexpr -I"$TI" -I"$TI/torch/csrc/api/include" -I"$PYI" \
       -Icsrc -DTORCH_EXTENSION_NAME=_C -DAHN_RT_WITH_CUDA -c "$f" -o /dev/null > "/tmp/nvcc_$(basename "$f").log" 2>&1 &
done
for f in "${files[@]}"; do :; done
wait || true
for f in "${files[@]}"; do
  if grep -qE "error" "/tmp/nvcc_$(basename "$f").log"; then
    echo "FAILED $f"; grep -E "error" "/tmp/nvcc_$(basename "$f").log" | head -10; status=1
  else
    echo "ok $f"
  fi
done
if [ $# -eq 0 ]; then
  fake=$(mktemp -d)
  mkdir -p "$fake/c10/cuda/impl" && echo "#pragma once" > "$fake/c10/cuda/impl/cuda_cmake_macros.h"
  CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
  for f in csrc/ops.cpp csrc/host/*.cpp; do
    if g++ -std=c++17 -fsyntax-only -DAHN_RT_WITH_CUDA -I"$fake" -I"$CUDA_INC" -I"$TI" -I"$TI/torch/csrc/api/include" \
         -I"$PYI" -Icsrc "$f" > "/tmp/gxx_$(basename "$f").log" 2>&1; then
      echo "ok $f (CUDA build, syntax)"
    else
      echo "FAILED $f"; grep -E "error" "/tmp/gxx_$(basename "$f").log" | head -5; status=1
    fi
  done
  rm -rf "$fake"
fi
exit $status
