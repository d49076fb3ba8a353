#!/usr/bin/env bash
# Stage 8 of the demo model (scripts/demo/README.md), after the recall stages: the answer's end. The recall
# data weighs a passkey's 5 digits 300 in the loss and the newline after them 1, so a memory trained on it
# recalls the digits and then does not end the number (the demo prompt gave `865233` for 86523). This stage
# trains layer 5's memory again, from its weights, on passkey sequences whose digits and the newline after
# them weigh 300 (make_distill_data.py --answer-end), 600 asked W-950 tokens after the passkey (beyond the
# window) and 200 inside it, with 400 plain sequences beside them; sequences of 1024 tokens, so it runs on a
# CPU (the shipped run: 2 cores, float32, 6.5 minutes). Then the evaluation and the demo prompts' seeds.
#
#   FROM=DIR bash scripts/demo/run_answer_end.sh          # CPU: about 7 minutes, then about 8 of evaluation
#   FROM=data/demo/recall_smoke/out/demo bash scripts/demo/run_answer_end.sh --smoke   # toy size (layer 1),
#                                                         # after run_recall.sh --smoke
#
# $OUT receives demo/{model.safetensors,config.json,generation_config.json,tokenizer.json} (copy them to
# weights/demo/), eval/{eval.md,eval.json,seeds.txt}, logs/answer_end_log.jsonl. DEVICE (cpu) and DTYPE
# (float32) run it elsewhere; RECALL_LAYER (5) is the layer it trains, as in run_recall.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/demo/ship_demo.sh   # PY, DATA, the environment; ship_demo
: "${FROM:?set FROM to the model of the recall stages (the demo folder of run_recall.sh)}"
if [[ "${1:-}" == "--smoke" ]]; then
  WORK=${WORK:-$DATA/answer_end_smoke}; OUT=${OUT:-$WORK/out}; L=256; WIN=64; SINKS=16
  N_FAR=8; N_NEAR=4; N_TEXT=4; BATCH=2; STEPS=2; LAYER=1; SEEDS=2; DIST=200
  E_EXTRA=(--seq-len 512 --n-text 2 --n-passkey 2 --distances 40,200 --edges 256)
  FAR=(--dist-min 80); NEAR=(--dist-min 16 --dist-max 56)
else
  WORK=${WORK:-$DATA/answer_end}; OUT=${OUT:-$DATA/answer_end_out}; L=1024; WIN=${WINDOW:-32}; SINKS=32
  N_FAR=600; N_NEAR=200; N_TEXT=400; BATCH=4; STEPS=150; LAYER=${RECALL_LAYER:-5}; SEEDS=16; DIST=1000
  E_EXTRA=(--seq-len 4096 --n-text 32 --n-passkey 32 --distances $(( WIN * 25 / 32 )),256,1000,2000,3500)
  FAR=(--dist-min "$WIN"); NEAR=(--dist-min $(( WIN / 8 )) --dist-max $(( WIN - 8 )))
fi
DEV=${DEVICE:-cpu}
mkdir -p "$WORK" "$OUT/demo" "$OUT/eval" "$OUT/logs"
T0=$(date +%s)
say() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

say data
mk() { $PY scripts/demo/make_distill_data.py --data "$DATA" --split distill --seq-len "$L" "$@"; }
mk --out "$WORK/far.jsonl" --num "$N_FAR" --passkey-frac 1.0 "${FAR[@]}" --answer-weight 300 --answer-end --seed 11
mk --out "$WORK/near.jsonl" --num "$N_NEAR" --passkey-frac 1.0 "${NEAR[@]}" --answer-weight 300 --answer-end --seed 12
mk --out "$WORK/text.jsonl" --num "$N_TEXT" --passkey-frac 0.0 --seed 13
cat "$WORK/far.jsonl" "$WORK/near.jsonl" "$WORK/text.jsonl" > "$WORK/mix.jsonl"

say "stage 8: the answer's end (layer $LAYER)"
$PY -m ahn_rt.train --base "$FROM" --init-from-base --data "$WORK/mix.jsonl" --out "$WORK/run" --overwrite \
    --steps "$STEPS" --seq-len "$L" --batch "$BATCH" --window "$WIN" --sinks "$SINKS" --lr 1e-3 --seed 0 \
    --train-layers "$LAYER" --device "$DEV" --dtype "${DTYPE:-float32}" --merge --log-every 25 --save-every 50

say evaluate
$PY scripts/demo/evaluate.py --model "$WORK/run/merged" --data "$DATA" --device "$DEV" "${E_EXTRA[@]}" \
    --out-md "$OUT/eval/eval.md" --out-json "$OUT/eval/eval.json" --attach answer_end_run="$WORK/run/run.json"
$PY scripts/demo/demo_seeds.py --weights "$WORK/run/merged" --distance "$DIST" --seeds "$SEEDS" | tee "$OUT/eval/seeds.txt"
ship_demo "$WORK/run/merged" "$OUT/demo"
cp "$WORK/run/log.jsonl" "$OUT/logs/answer_end_log.jsonl"
say "done"
