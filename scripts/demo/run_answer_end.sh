#!/usr/bin/env bash
# Stages 8 and 9 of the demo model (scripts/demo/README.md), after the recall stages: the answer's end. The
# recall data weighs a passkey's 5 digits 300 in the loss and the newline after them 1, so a memory trained on
# it recalls the digits and then does not end the number (the demo prompt gave `865233` for 86523). Both stages
# train layer 5's memory again, from its weights, on passkey sequences whose digits and the newline after them
# weigh 300 (make_distill_data.py --answer-end), asked beyond the window and inside it, with plain sequences
# beside them. Then the evaluation and the demo prompts' seeds.
# * stage 8 (no flag): sequences of 1024 tokens, so it runs on a CPU (the shipped run: 2 cores, float32, 6.5
#   minutes): 600 far passkeys (W-950 tokens back), 200 near, 400 plain; 150 steps of 4.
# * stage 9 (--gpu, from stage 8's model): sequences of 4096 tokens on one GPU (bf16, about 30 s of training
#   on an H100): 1200 far passkeys (W-4020 tokens back), 400 near, 800 plain; 150 steps of 8. Stage 8's
#   1024-token sequences cost recall far back (3500 tokens: 69% -> 41%); stage 9 brings it back in the
#   evaluation, but not in the demo's seeds, so it is not shipped (weights/README.md, "After stage 8").
#
#   FROM=DIR bash scripts/demo/run_answer_end.sh          # stage 8, CPU: about 7 minutes, then 8 of evaluation
#   FROM=DIR bash scripts/demo/run_answer_end.sh --gpu    # stage 9, GPU: about 1.5 minutes with its evaluation
#   FROM=data/demo/recall_smoke/out/demo bash scripts/demo/run_answer_end.sh --smoke   # toy size (layer 1),
#                                                         # after run_recall.sh --smoke
#
# $OUT receives demo/{model.safetensors,config.json,generation_config.json,tokenizer.json} (copy them to
# weights/demo/), eval/{eval.md,eval.json,seeds.txt}, logs/answer_end_log.jsonl. DEVICE (cpu; cuda with --gpu)
# and DTYPE (float32; bf16 with --gpu) run it elsewhere; RECALL_LAYER (5) is the layer it trains, as in
# run_recall.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/demo/ship_demo.sh   # PY, DATA, the environment; ship_demo
: "${FROM:?set FROM to the model of the recall stages (the demo folder of run_recall.sh)}"
case "${1:-}" in
  ""|--gpu|--smoke) ;;
  *) echo "error: unknown argument $1: give --gpu (stage 9), --smoke, or nothing (stage 8)" >&2; exit 2 ;;
esac
T_EXTRA=()
if [[ "${1:-}" == "--smoke" ]]; then
  WORK=${WORK:-$DATA/answer_end_smoke}; OUT=${OUT:-$WORK/out}; L=256; WIN=64; SINKS=16
  N_FAR=8; N_NEAR=4; N_TEXT=4; BATCH=2; STEPS=2; LAYER=1; SEEDS=2; DIST=200; SEED0=11
  E_EXTRA=(--seq-len 512 --n-text 2 --n-passkey 2 --distances 40,200 --edges 256)
  FAR=(--dist-min 80); NEAR=(--dist-min 16 --dist-max 56)
else
  WIN=${WINDOW:-32}; SINKS=32; STEPS=150; LAYER=${RECALL_LAYER:-5}; SEEDS=16; DIST=1000
  E_EXTRA=(--seq-len 4096 --n-text 32 --n-passkey 32 --distances $(( WIN * 25 / 32 )),256,1000,2000,3500)
  FAR=(--dist-min "$WIN"); NEAR=(--dist-min $(( WIN / 8 )) --dist-max $(( WIN - 8 )))
  if [[ "${1:-}" == "--gpu" ]]; then   # stage 9
    WORK=${WORK:-$DATA/answer_end9}; OUT=${OUT:-$DATA/answer_end9_out}; L=4096; N_FAR=1200; N_NEAR=400; N_TEXT=800
    BATCH=8; SEED0=21; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-bf16}; T_EXTRA=(--no-activation-checkpointing)
  else                                  # stage 8
    WORK=${WORK:-$DATA/answer_end}; OUT=${OUT:-$DATA/answer_end_out}; L=1024; N_FAR=600; N_NEAR=200; N_TEXT=400
    BATCH=4; SEED0=11
  fi
fi
DEV=${DEVICE:-cpu}   # SEED0: the data's seeds, far, near and plain sequences SEED0, +1, +2
mkdir -p "$WORK" "$OUT/demo" "$OUT/eval" "$OUT/logs"
T0=$(date +%s)
say() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

say data
mk() { $PY scripts/demo/make_distill_data.py --data "$DATA" --split distill --seq-len "$L" "$@"; }
mk --out "$WORK/far.jsonl" --num "$N_FAR" --passkey-frac 1.0 "${FAR[@]}" --answer-weight 300 --answer-end --seed "$SEED0"
mk --out "$WORK/near.jsonl" --num "$N_NEAR" --passkey-frac 1.0 "${NEAR[@]}" --answer-weight 300 --answer-end \
   --seed $(( SEED0 + 1 ))
mk --out "$WORK/text.jsonl" --num "$N_TEXT" --passkey-frac 0.0 --seed $(( SEED0 + 2 ))
cat "$WORK/far.jsonl" "$WORK/near.jsonl" "$WORK/text.jsonl" > "$WORK/mix.jsonl"

say "the answer's end (layer $LAYER, sequences of $L)"
$PY -m ahn_rt.train --base "$FROM" --init-from-base --data "$WORK/mix.jsonl" --out "$WORK/run" --overwrite \
    --steps "$STEPS" --seq-len "$L" --batch "$BATCH" --window "$WIN" --sinks "$SINKS" --lr 1e-3 --seed 0 \
    --train-layers "$LAYER" --device "$DEV" --dtype "${DTYPE:-float32}" --merge --log-every 25 --save-every 50 "${T_EXTRA[@]}"

say evaluate
$PY scripts/demo/evaluate.py --model "$WORK/run/merged" --data "$DATA" --device "$DEV" "${E_EXTRA[@]}" \
    --out-md "$OUT/eval/eval.md" --out-json "$OUT/eval/eval.json" --attach answer_end_run="$WORK/run/run.json"
$PY scripts/demo/demo_seeds.py --weights "$WORK/run/merged" --distance "$DIST" --seeds "$SEEDS" | tee "$OUT/eval/seeds.txt"
ship_demo "$WORK/run/merged" "$OUT/demo"
cp "$WORK/run/log.jsonl" "$OUT/logs/answer_end_log.jsonl"
say "done"
