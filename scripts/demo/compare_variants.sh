#!/usr/bin/env bash
# The AHN memory variants side by side (the variants issue's table): each one distilled onto the same
# teacher with the same data, settings and step / time budget by run_gpu.sh (AHN=<variant>; a time guard
# can stop the variants at different steps, and the table shows each one's), evaluated alike, then one
# table (variants_table.py).
#
#   TEACHER=weights/demo bash scripts/demo/compare_variants.sh     # GPU: the shipped teacher, data/demo/ carried in
#   bash scripts/demo/compare_variants.sh --smoke                  # every stage at toy size on the CPU
#
# Results: $OUT/<variant>/eval/{eval.md,eval.json}, $OUT/<variant>/logs/ and $OUT/variants.md (the merged
# models are not kept). Overrides: VARIANTS (default "gdn dn mamba2"), and run_gpu.sh's (DISTILL_STEPS,
# DISTILL_LIMIT per variant, DISTILL_ARGS, ...; e.g. VARIANTS="gdn mamba2" DISTILL_ARGS="--decay-init long":
# DeltaNet has no decay gate and refuses that flag). Without TEACHER the first variant's run trains one and the others reuse it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SMOKE=${1:-}
ROOT_OUT=${OUT:-data/demo/variants/out}
ROOT_WORK=${WORK:-data/demo/variants/work}
[[ $SMOKE == --smoke ]] && { ROOT_OUT=${SMOKE_OUT:-data/demo/variants/smoke_out}; ROOT_WORK=data/demo/variants/smoke; }
read -r -a VS <<< "${VARIANTS:-gdn dn mamba2}"
teacher=${TEACHER:-}
runs=()
for v in "${VS[@]}"; do
  echo "=== variant $v"
  # run_gpu.sh takes OUT in full mode and SMOKE_OUT in smoke mode: set both.
  OUT="$ROOT_OUT/$v" SMOKE_OUT="$ROOT_OUT/$v" WORK="$ROOT_WORK/$v" AHN=$v TEACHER=$teacher \
      bash scripts/demo/run_gpu.sh $SMOKE
  [[ -z $teacher ]] && teacher="$ROOT_WORK/$v/teacher"
  rm -f "$ROOT_OUT/$v/demo/model.safetensors"
  runs+=(--run "$v=$ROOT_WORK/$v")
done
$PY scripts/demo/variants_table.py "${runs[@]}" --eval-root "$ROOT_OUT" --out "$ROOT_OUT/variants.md"
