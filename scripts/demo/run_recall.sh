#!/usr/bin/env bash
# The recall stages of the demo model (scripts/demo/README.md, stages 6-7), on top of a distilled model:
#   6. recall: only layer 5's memory (the layer of the teacher's copy heads) trains, from the distilled
#      memory, on passkey sequences whose 5 answer digits weigh 300 in the loss: 3/4 of them asked
#      W-4020 tokens after the passkey (beyond the window), 1/4 W/8 to W-8 tokens after it (inside it, so the
#      memory learns not to override the window's exact answer);
#   7. text: every layer's memory on the same sequences plus 2,400 without a passkey, lr 2e-3, 150 of 200
#      planned steps (--stop-after 150, the point the first shipped run's time guard stopped it at).
# Then the evaluation. WINDOW (default 32, the shipped model's; 128 gives the model shipped until commit
# 30b2b51) sets the sliding window of both stages, the far / near passkey distances and the evaluation's
# inside-the-window distance. Needs data/demo/ (build_corpus.py) and the stage-5 model (run_gpu.sh's merged
# folder). RECALL_LAYER (default 5) is the layer stage 6 trains: that of the teacher's copy heads
# (recall_probe.py heads names it for another teacher).
#
#   FROM=DIR bash scripts/demo/run_recall.sh           # one H100, about 6.5 minutes (heads of 64: 4)
#   FROM=data/demo/smoke/out/demo bash scripts/demo/run_recall.sh --smoke   # toy size on the CPU, after
#                                                      # run_gpu.sh --smoke (its 2-layer model: layer 1)
#
# $OUT receives demo/{model.safetensors,config.json,generation_config.json,tokenizer.json} (copy them to
# weights/demo/), eval/{eval.md,eval.json}, logs/{recall_log.jsonl,text_log.jsonl}.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/demo/ship_demo.sh   # PY, DATA, the environment; ship_demo
: "${FROM:?set FROM to the distilled model folder (stage 5)}"
if [[ "${1:-}" == "--smoke" ]]; then
  WORK=${WORK:-$DATA/recall_smoke}; OUT=${OUT:-$WORK/out}; DEV=cpu; L=512; WIN=64; SINKS=16
  N_FAR=12; N_NEAR=4; N_TEXT=8; BATCH=4; S_RECALL=3; S_TEXT=3; STOP_TEXT=2; DT=float32; LAYER=1
  E_EXTRA=(--n-text 2 --n-passkey 2 --distances 40,200,400 --edges 256)
  FAR=(--dist-min 80); NEAR=(--dist-min 16 --dist-max 56)
else
  WORK=${WORK:-$DATA/recall}; OUT=${OUT:-$DATA/recall_out}; DEV=cuda; L=4096; WIN=${WINDOW:-32}; SINKS=32
  N_FAR=3600; N_NEAR=1200; N_TEXT=2400; BATCH=32; S_RECALL=400; S_TEXT=200; STOP_TEXT=150; DT=bf16; LAYER=${RECALL_LAYER:-5}
  # the first distance is inside the window (25 at W = 32); the near passkeys too (4-24 at W = 32)
  E_EXTRA=(--n-text 32 --n-passkey 32 --distances $(( WIN * 25 / 32 )),256,1000,2000,3500)
  FAR=(--dist-min "$WIN"); NEAR=(--dist-min $(( WIN / 8 )) --dist-max $(( WIN - 8 )))
fi
mkdir -p "$WORK" "$OUT/demo" "$OUT/eval" "$OUT/logs"
T0=$(date +%s)
say() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

say data
mk() { $PY scripts/demo/make_distill_data.py --data "$DATA" --split distill --seq-len "$L" "$@"; }
mk --out "$WORK/far.jsonl" --num "$N_FAR" --passkey-frac 1.0 "${FAR[@]}" --answer-weight 300 --seed 1
mk --out "$WORK/near.jsonl" --num "$N_NEAR" --passkey-frac 1.0 "${NEAR[@]}" --answer-weight 300 --seed 2
mk --out "$WORK/text.jsonl" --num "$N_TEXT" --passkey-frac 0.0 --seed 3
cat "$WORK/far.jsonl" "$WORK/near.jsonl" > "$WORK/recall.jsonl"
cat "$WORK/far.jsonl" "$WORK/near.jsonl" "$WORK/text.jsonl" > "$WORK/text_mix.jsonl"

common=(--seq-len "$L" --batch "$BATCH" --window "$WIN" --sinks "$SINKS" --seed 0 --device "$DEV" --dtype "$DT"
        --no-activation-checkpointing --log-every 50 --save-every 50 --overwrite --init-from-base)
say "stage 6: recall (layer $LAYER)"
$PY -m ahn_rt.train --base "$FROM" --data "$WORK/recall.jsonl" --out "$WORK/recall" --steps "$S_RECALL" \
    --lr 5e-3 --train-layers "$LAYER" --merge "${common[@]}"
say "stage 7: text (every layer)"
$PY -m ahn_rt.train --base "$WORK/recall/merged" --data "$WORK/text_mix.jsonl" --out "$WORK/text" \
    --steps "$S_TEXT" --stop-after "$STOP_TEXT" --lr 2e-3 "${common[@]}"
$PY scripts/demo/merge_resume.py --base "$WORK/recall/merged" --run "$WORK/text" --window "$WIN" --sinks "$SINKS"

say evaluate
$PY scripts/demo/evaluate.py --model "$WORK/text/merged" --data "$DATA" --seq-len "$L" --device "$DEV" \
    "${E_EXTRA[@]}" --out-md "$OUT/eval/eval.md" --out-json "$OUT/eval/eval.json" \
    --attach recall_run="$WORK/recall/run.json" --attach text_run="$WORK/text/run.json"
ship_demo "$WORK/text/merged" "$OUT/demo"
cp "$WORK/recall/log.jsonl" "$OUT/logs/recall_log.jsonl"
cp "$WORK/text/log.jsonl" "$OUT/logs/text_log.jsonl"
say "done"
