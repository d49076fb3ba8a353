#!/usr/bin/env bash
# The demo model pipeline in one command (scripts/demo/README.md):
#   teacher pretraining -> distillation data (in the background) -> AHN distillation + merge -> evaluation.
# Needs data/demo/ from scripts/demo/build_corpus.py (built on the CPU machine and carried in).
#
#   bash scripts/demo/run_gpu.sh           # one H100 / H200, about 7 minutes (the shipped stage 1's run: 216 s of
#                                          # teacher, 143 distillation steps in 150 s)
#   bash scripts/demo/run_gpu.sh --smoke   # every stage at toy size on the CPU, about 15 seconds on a 2-core CPU
#
# $OUT receives these files (each < 16 MiB, at most $OUT/a/file):
#   demo/{model.safetensors,config.json,generation_config.json,tokenizer.json}   the merged demo model (a
#     model.safetensors over 15 MiB comes as model.safetensors.part0, .part1, ...: join them with cat)
#   eval/{eval.md,eval.json}      the evaluation table and every number (+ pipeline settings and timings)
#   logs/{teacher_log.jsonl,distill_log.jsonl}
# Overrides (environment): TEACHER_ARGS (the teacher's shape flags; default "--head-dim 128", the shipped
# shape; empty: heads of 64, the model shipped before), DISTILL_ARGS (extra ahn_rt.train flags,
# e.g. "--decay-init long"), WINDOW (the sliding window in full mode; default 32, the shipped model's; 128 the
# model's shipped until commit 30b2b51), LR (distillation, 2e-3), TEACHER_STEPS, DISTILL_STEPS, DISTILL_STOP
# (stop the distillation after this step, default 143 of 250 as the shipped run; empty: run all), TEACHER_LIMIT,
# DISTILL_LIMIT (seconds, safety stops), PASSKEY_FRAC, DIST_MIN (default 16), ANSWER_WEIGHT (the distillation
# data; ANSWER_WEIGHT: the loss weight of a passkey's answer digits, default 1; ANSWER_END=1 weighs the newline
# that ends the answer as its digits), WORK (intermediate folder), PYTHON, and
# TEACHER=DIR: skip the teacher stage and distill a fresh AHN onto the base weights in DIR (e.g. an earlier
# run's merged folder; its AHN tensors are not used), AHN=gdn|dn|mamba2: the memory variant (default gdn;
# scripts/demo/compare_variants.sh runs all three side by side), STOP_AFTER=teacher: train the teacher, copy it
# to $OUT/teacher (split as the demo model is) and stop, for a pipeline that does not fit one call (a wider
# teacher); the next call passes TEACHER=<that folder, its parts joined>.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=full
source scripts/demo/ship_demo.sh   # PY, DATA, the environment; ship_demo
[[ "${1:-}" == "--smoke" ]] && MODE=smoke
case "${STOP_AFTER:-}" in
  ""|teacher) ;;
  *) echo "error: STOP_AFTER=$STOP_AFTER: give teacher (stop after the teacher stage) or leave it unset" >&2; exit 2 ;;
esac
if [[ -n "${STOP_AFTER:-}" && -n "${TEACHER:-}" ]]; then
  echo "error: STOP_AFTER=teacher with TEACHER set trains no teacher: unset one of them" >&2; exit 2
fi
case "${ANSWER_END:-}" in
  ""|0) ANSWER_END_ARGS=() ;;
  1) ANSWER_END_ARGS=(--answer-end) ;;
  *) echo "error: ANSWER_END=$ANSWER_END: give 1 (weigh the newline after a passkey's answer) or 0" >&2; exit 2 ;;
esac

if [[ $MODE == full ]]; then
  WORK=${WORK:-$DATA/run}; OUT=${OUT:-$DATA/out}; DEV=cuda
  L=4096; WIN=${WINDOW:-32}; SINKS=32
  T_STEPS=${TEACHER_STEPS:-1800}; T_BATCH=32; T_LIMIT=${TEACHER_LIMIT:-240}
  # TEACHER_ARGS: train_teacher.py flags for the teacher's shape; the shipped model's heads of 128 by default
  # (empty: train_teacher.py's heads of 64, the model shipped until the thirtieth session; the demo files must
  # stay under 25 MB: ship_demo checks)
  read -r -a T_SHAPE <<< "${TEACHER_ARGS---head-dim 128}"
  T_EXTRA=(--log-every 50 --eval-every 300 --eval-seqs 8 "${T_SHAPE[@]}")
  D_STEPS=${DISTILL_STEPS:-250}; D_BATCH=32; D_LIMIT=${DISTILL_LIMIT:-320}; D_DIST_MIN=${DIST_MIN:-16}
  read -r -a D_ARGS <<< "${DISTILL_ARGS:-}"
  # the shipped stage 1 stopped at step 143 of 250 (its time guard, on an H100): DISTILL_STOP= (empty) runs all
  D_STOP=${DISTILL_STOP-143}
  D_EXTRA=(--dtype bf16 --no-activation-checkpointing --log-every 25 --save-every 50 ${D_STOP:+--stop-after "$D_STOP"}
           "${D_ARGS[@]}")
  # the first distance is inside the window (25 at W = 32, 100 at W = 128)
  E_EXTRA=(--n-text 32 --n-passkey 32 --distances $(( WIN * 25 / 32 )),256,1000,2000,3500)
else
  WORK=${WORK:-$DATA/smoke}; OUT=${SMOKE_OUT:-$DATA/smoke/out}; DEV=cpu
  L=512; WIN=64; SINKS=16
  T_STEPS=${TEACHER_STEPS:-30}; T_BATCH=4; T_LIMIT=${TEACHER_LIMIT:-0}
  read -r -a T_SHAPE <<< "${TEACHER_ARGS:-}"   # after the toy shape: a smoke run of another shape
  T_EXTRA=(--hidden 64 --layers 2 --heads 2 --kv-heads 1 --mlp 128 --warmup 5 --lr 3e-3 --log-every 10
           --eval-every 30 --eval-seqs 2 "${T_SHAPE[@]}")
  D_STEPS=${DISTILL_STEPS:-4}; D_BATCH=4; D_LIMIT=${DISTILL_LIMIT:-300}; D_DIST_MIN=${DIST_MIN:-32}
  read -r -a D_ARGS <<< "${DISTILL_ARGS:-}"
  D_EXTRA=(--dtype float32 --log-every 1 --save-every 2 "${D_ARGS[@]}")
  E_EXTRA=(--n-text 2 --n-passkey 2 --distances 40,200,400 --edges 256)
fi
D_NUM=$(( D_STEPS * D_BATCH / 2 ))   # two passes over the distillation sequences
mkdir -p "$WORK" "$OUT/demo" "$OUT/eval" "$OUT/logs"

T_START=$(date +%s)
STAGE_T0=$T_START
TIMING="{\"mode\": \"$MODE\""
stage() { STAGE=$1; STAGE_T0=$(date +%s); echo "== [$((STAGE_T0 - T_START)) s] $STAGE"; }
done_stage() {
  local dt=$(( $(date +%s) - STAGE_T0 ))
  echo "== $STAGE: $dt s"
  TIMING="$TIMING, \"$STAGE\": $dt"
}

stage setup
$PY - <<EOF
import hashlib, json, platform, sys, torch
m = json.load(open("$DATA/manifest.json"))
for name, digest in m["sha256"].items():
    h = hashlib.sha256(open("$DATA/" + name, "rb").read()).hexdigest()
    if h != digest:
        sys.exit(f"$DATA/{name}: sha256 {h} differs from the manifest ({digest}); rebuild or re-carry data/demo")
print(f"data/demo intact (corpus of CPython {m['python']}, {m['splits']['train']['tokens']:,} train tokens); "
      f"python {platform.python_version()}, torch {torch.__version__}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
if "$DEV" == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device: run with --smoke on a CPU machine")
EOF
$PY -c "import ahn_rt.ops as o; print('ahn_rt ops backend:', o.backend())"
done_stage

# The distillation data does not depend on the teacher: write it while the teacher trains.
$PY scripts/demo/make_distill_data.py --data "$DATA" --split distill --out "$WORK/distill.jsonl" --num "$D_NUM" \
    --seq-len "$L" --passkey-frac "${PASSKEY_FRAC:-0.5}" --dist-min "$D_DIST_MIN" --seed 1 --stats "$WORK/distill_stats.json" \
    --answer-weight "${ANSWER_WEIGHT:-1}" "${ANSWER_END_ARGS[@]}" \
    > "$WORK/distill_data.log" 2>&1 &
DATA_PID=$!

stage teacher
if [[ -n "${TEACHER:-}" ]]; then
  echo "using the teacher in $TEACHER (TEACHER is set: no teacher training)"
  TEACHER_DIR=$TEACHER
else
  TEACHER_DIR=$WORK/teacher
  $PY scripts/demo/train_teacher.py --data "$DATA" --out "$TEACHER_DIR" --steps "$T_STEPS" --batch "$T_BATCH" \
      --seq-len "$L" --seed 0 --passkey-frac 0.5 --device "$DEV" --time-limit "$T_LIMIT" --overwrite "${T_EXTRA[@]}"
fi
done_stage
if [[ "${STOP_AFTER:-}" == teacher ]]; then   # a pipeline longer than one call: the teacher alone, then TEACHER=
  wait "$DATA_PID" || { cat "$WORK/distill_data.log"; exit 1; }
  ship_demo "$TEACHER_DIR" "$OUT/teacher"
  [[ -f "$TEACHER_DIR/log.jsonl" ]] && cp "$TEACHER_DIR/log.jsonl" "$OUT/logs/teacher_log.jsonl"
  echo "== stopped after the teacher (STOP_AFTER=teacher) in $(( $(date +%s) - T_START )) s: $TEACHER_DIR," \
       "a copy in $OUT/teacher; go on with TEACHER=<that folder>"
  exit 0
fi

stage distill_data
wait "$DATA_PID" || { cat "$WORK/distill_data.log"; exit 1; }
cat "$WORK/distill_data.log"
done_stage

stage distill
rm -f "$WORK/ahn/partial.json"
set +e
timeout -s INT -k 30 "$D_LIMIT" $PY -m ahn_rt.train --base "$TEACHER_DIR" --data "$WORK/distill.jsonl" \
    --out "$WORK/ahn" --overwrite --steps "$D_STEPS" --seq-len "$L" --batch "$D_BATCH" --grad-accum 1 \
    --window "$WIN" --sinks "$SINKS" --lr "${LR:-2e-3}" --seed 0 --device "$DEV" --merge ${AHN:+--ahn "$AHN"} "${D_EXTRA[@]}"
rc=$?
set -e
if [[ $rc != 0 && $rc != 124 && $rc != 130 ]]; then
  echo "distillation failed (exit $rc)"; exit "$rc"
fi
# stopped early: by the time guard (exit 124 / 130), or on purpose by --stop-after (DISTILL_STOP; exit 0, no
# merged folder; the lr schedule stays that of DISTILL_STEPS)
if [[ $rc != 0 || ! -f "$WORK/ahn/merged/model.safetensors" ]]; then
  if [[ $rc != 0 ]]; then why="its time guard (${D_LIMIT} s)"; else why="--stop-after"; fi
  echo "distillation stopped by $why; merging its last resume state"
  $PY scripts/demo/merge_resume.py --base "$TEACHER_DIR" --run "$WORK/ahn" --window "$WIN" --sinks "$SINKS"
fi
done_stage
echo "$TIMING}" > "$WORK/timing.json"

stage evaluate
$PY scripts/demo/evaluate.py --model "$WORK/ahn/merged" --data "$DATA" --seq-len "$L" --device "$DEV" \
    "${E_EXTRA[@]}" --out-md "$OUT/eval/eval.md" --out-json "$OUT/eval/eval.json" \
    --attach timing="$WORK/timing.json" --attach teacher="$TEACHER_DIR/train_summary.json" \
    --attach distill_run="$WORK/ahn/run.json" --attach distill_data="$WORK/distill_stats.json" \
    --attach distill_partial="$WORK/ahn/partial.json"
done_stage

stage collect
ship_demo "$WORK/ahn/merged" "$OUT/demo"
[[ -f "$TEACHER_DIR/log.jsonl" ]] && cp "$TEACHER_DIR/log.jsonl" "$OUT/logs/teacher_log.jsonl"
cp "$WORK/ahn/log.jsonl" "$OUT/logs/distill_log.jsonl"
(cd "$OUT" && find . -type f | sort | xargs sha256sum)
done_stage
echo "== pipeline done in $(( $(date +%s) - T_START )) s; $TIMING}"
