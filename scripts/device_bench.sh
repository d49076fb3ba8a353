#!/usr/bin/env bash
# On a GPU machine after scripts/device_check.sh built the extension: the decode benchmark (markdown +
# JSON under $OUT), a per-kernel profile of one 32k-context decode token, and the prefill benchmark
# (bench/prefill_bench.py; its fla row needs fla-core importable, e.g. from a carried wheel).
set -uo pipefail
cd "$(dirname "$0")/.."
O=${OUT:-/tmp}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY bench/decode_latency.py --json "$O/decode_latency.json" --commit "${COMMIT:-unknown}" "$@" 2>&1 | tee "$O/decode_latency.md"
$PY scripts/profile_decode.py --context 32768 2>&1 | tee "$O/profile_32k.md"
$PY bench/prefill_bench.py --json "$O/prefill.json" 2> "$O/prefill.err" | tee "$O/prefill.md"
