#!/usr/bin/env bash
# Multi-GPU training (docs/training.md, "Multi-GPU training") on a machine with two GPUs (nvidia-h200-x2):
# the same run on one GPU and on two (torchrun, --ddp and --fsdp) with the same global batch of 2 sequences
# (one GPU: --batch 1 --grad-accum 2; two GPUs: --batch 1 --grad-accum 1 per rank), Qwen2.5-3B shape with
# random bf16 weights, random tokens, 200 optimizer steps each. Reports the largest loss difference against
# one GPU, tokens/s per GPU and the scaling efficiency from 1 to 2 GPUs.
#
#   bash scripts/device_multi_gpu.sh            # everything in one call (planned ~7.5 min on two H200s)
#   bash scripts/device_multi_gpu.sh prep one   # or phase by phase: prep one ddp fsdp report (files stay in
#                                               # $WORK, so later phases need the same warm machine)
#   SMOKE=1 bash scripts/device_multi_gpu.sh    # the whole pipeline at toy size on the CPU (gloo), ~30 s
#
# Time: the phases share BUDGET seconds (570: one device call is at most 600); a phase that would start with
# less than 60 s left is skipped and the report says "not run", so a slow machine still returns what ran.
#
# $OUT receives 6 files: multi_gpu.md (the table for bench/README.md), multi_gpu.json (every number),
# one.jsonl ddp.jsonl fsdp.jsonl (the three log.jsonl), phases.log (each phase's stderr, its last lines).
# Overrides (environment): STEPS (200), SEQ (2048), WINDOW (960), SINKS (64), PRESET (qwen2.5-3b), LR (1e-3),
# WORK (intermediate folder, /tmp/ahn_multi_gpu), PYTHON (python3), BUDGET (seconds for all phases, 570).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# NVLink multicast stays off (the trainer also sets NCCL_NVLS_ENABLE=0 when it is unset)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
O=${OUT:-/tmp/ahn_multi_gpu_out}
WORK=${WORK:-/tmp/ahn_multi_gpu}
BUDGET=${BUDGET:-570}
if [[ -n "${SMOKE:-}" ]]; then
  PRESET=${PRESET:-tiny}; STEPS=${STEPS:-4}; SEQ=${SEQ:-256}; WINDOW=${WINDOW:-96}; SINKS=${SINKS:-32}
  DEV=(--device cpu --dtype float32); WORK=${WORK}_smoke
else
  PRESET=${PRESET:-qwen2.5-3b}; STEPS=${STEPS:-200}; SEQ=${SEQ:-2048}; WINDOW=${WINDOW:-960}; SINKS=${SINKS:-64}
  DEV=(--device cuda --dtype bf16)
fi
LR=${LR:-1e-3}
mkdir -p "$O" "$WORK"
PHASES=("$@"); [[ ${#PHASES[@]} -eq 0 ]] && PHASES=(prep one ddp fsdp report)
T0=$(date +%s)

train_args() {   # the run: everything but the split of the global batch
  echo --base "$WORK/base/model.safetensors" --data "$WORK/data.jsonl" --steps "$STEPS" --seq-len "$SEQ" \
       --window "$WINDOW" --sinks "$SINKS" --lr "$LR" --batch 1 --save-every 0 --log-every 20 \
       --save-dtype float32 "${DEV[@]}"
}

phase() {   # phase NAME COMMAND...: run within the budget, stderr to $WORK/NAME.err, a status line
  local name=$1; shift
  local t=$(date +%s)
  local left=$(( BUDGET - (t - T0) - 15 ))      # 15 s kept for the report
  if (( left < 60 )); then
    echo "== $name: skipped, ${left} s of the budget left"; echo "== $name: skipped (budget)" >> "$WORK/phases.log"
    return 1
  fi
  echo "== [$(( t - T0 )) s] $name (limit ${left} s): $*"
  timeout "$left" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t )) s"
  { echo "== $name (exit $rc, $(( $(date +%s) - t )) s): $*"; tail -n 25 "$WORK/$name.err"; } >> "$WORK/phases.log"
  return $rc
}

status=0
for p in "${PHASES[@]}"; do
  case $p in
    prep)
      $PY - <<EOF || { echo "prep: this machine cannot run the comparison"; exit 1; }
import platform, sys, torch
from torch.distributed.fsdp import fully_shard  # noqa: F401 (FSDP2 is there)
n = torch.cuda.device_count()
print(f"python {platform.python_version()}, torch {torch.__version__}, {n} GPU(s)"
      + (f": {torch.cuda.get_device_name(0)}" if n else ""))
if not "${SMOKE:-}" and n < 2:
    sys.exit("needs two GPUs (run with SMOKE=1 on a CPU machine)")
EOF
      rm -rf "$WORK/base" "$WORK/one" "$WORK/ddp" "$WORK/fsdp"; : > "$WORK/phases.log"
      phase init_weights $PY -m ahn_rt.init_weights --preset "$PRESET" --out "$WORK/base/model.safetensors" \
          --dtype "$([[ -n "${SMOKE:-}" ]] && echo float32 || echo bf16)" --seed 0 || status=1
      # random token ids: STEPS x 2 sequences of exactly SEQ tokens (every step costs the same on every rank)
      $PY - <<EOF || status=1
import json, random
from ahn_rt.init_weights import PRESETS
V, rng = PRESETS["$PRESET"]["vocab_size"], random.Random(0)
with open("$WORK/data.jsonl", "w") as f:
    for _ in range($STEPS * 2):
        f.write(json.dumps({"input_ids": [rng.randrange(V) for _ in range($SEQ)]}) + "\n")
print(f"{$STEPS * 2} sequences of $SEQ random tokens")
EOF
      ;;
    one)
      phase one env CUDA_VISIBLE_DEVICES=0 $PY -m ahn_rt.train $(train_args) --grad-accum 2 \
          --out "$WORK/one" --overwrite || status=1 ;;
    ddp)
      phase ddp $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m ahn_rt.train $(train_args) \
          --grad-accum 1 --out "$WORK/ddp" --overwrite --ddp || status=1 ;;
    fsdp)
      phase fsdp $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m ahn_rt.train $(train_args) \
          --grad-accum 1 --out "$WORK/fsdp" --overwrite --fsdp || status=1 ;;
    report)
      $PY - "$WORK" "$O" "$PRESET" "$SEQ" "$WINDOW" "$SINKS" "$STEPS" "$LR" "${DEV[3]}" <<'EOF' || status=1
import json, statistics, subprocess, sys
from pathlib import Path
work, out, preset, seq, window, sinks, steps, lr, dtype = sys.argv[1:10]
work, out = Path(work), Path(out)

def log(name):
    p = work / name / "log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else None

def per_gpu(recs):
    """median tokens/s per GPU over the steps after the first 10 (start-up, allocator, lazy init)"""
    rows = [r["tokens_per_s"] / r.get("world_size", 1) for r in recs[10:] if r.get("tokens_per_s")]
    return statistics.median(rows) if rows else None

one = log("one")
res = {"preset": preset, "seq_len": int(seq), "window": int(window), "sinks": int(sinks), "steps": int(steps),
       "lr": float(lr), "dtype": dtype, "global_batch": 2, "runs": {}}
try:
    res["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
lines = [f"**Multi-GPU training** ({preset} shape, random {dtype} weights, random tokens, {seq}-token sequences, "
         f"W={window} S={sinks}, global batch 2: one GPU --grad-accum 2, two GPUs --grad-accum 1 per rank, "
         f"{steps} steps, lr {lr}; `bash scripts/device_multi_gpu.sh`):", "",
         "| run | steps | loss: largest abs. diff vs 1 GPU | largest rel. diff | mean abs. diff | tokens/s per GPU "
         "| scaling 1 -> 2 GPUs |", "|---|---:|---:|---:|---:|---:|---:|"]
base_tps = per_gpu(one) if one else None
for name in ("one", "ddp", "fsdp"):
    recs = log(name)
    if recs is None:
        lines.append(f"| {name} | not run | | | | | |")
        continue
    r = {"steps": len(recs), "tokens_per_s_per_gpu": per_gpu(recs),
         "world_size": recs[0].get("world_size", 1), "final_loss": recs[-1]["loss"]}
    if one and name != "one":
        pairs = [(a["loss"], b["loss"]) for a, b in zip(recs, one) if a["loss"] is not None and b["loss"] is not None]
        d = [abs(a - b) for a, b in pairs]
        k = max(range(len(d)), key=d.__getitem__) if d else None
        r.update(max_abs_loss_diff=max(d) if d else None, at_step=k, mean_abs_loss_diff=sum(d) / len(d) if d else None,
                 max_rel_loss_diff=max(x / abs(b) for x, (_, b) in zip(d, pairs)) if d else None,
                 identical_steps=sum(x == 0 for x in d))
        if base_tps and r["tokens_per_s_per_gpu"]:
            r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / base_tps
    res["runs"][name] = r
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    lines.append(f"| {name} ({r['world_size']} GPU{'s' if r['world_size'] > 1 else ''}) | {r['steps']} | "
                 f"{f(r.get('max_abs_loss_diff'), '.2e')}"
                 + (f" (step {r['at_step']})" if r.get("at_step") is not None else "")
                 + f" | {f(r.get('max_rel_loss_diff'), '.2e')} | {f(r.get('mean_abs_loss_diff'), '.2e')} | "
                 f"{f(r['tokens_per_s_per_gpu'], ',.0f')} | "
                 + (f"{100 * r['scaling_efficiency']:.1f}%" if r.get("scaling_efficiency") else "-") + " |")
lines += ["", "Loss of the last step (one GPU): " + (f"{one[-1]['loss']:.5f}" if one else "-") +
          f"; first step: " + (f"{one[0]['loss']:.5f}" if one else "-") + ". Tokens/s per GPU: the median of the "
          "logged per-step tokens/s divided by the number of GPUs, after the first 10 steps."]
(out / "multi_gpu.md").write_text("\n".join(lines) + "\n")
(out / "multi_gpu.json").write_text(json.dumps(res, indent=1) + "\n")
for name in ("one", "ddp", "fsdp"):
    p = work / name / "log.jsonl"
    if p.exists():
        (out / f"{name}.jsonl").write_text(p.read_text())
print("\n".join(lines))
EOF
      ;;
    *) echo "unknown phase $p (prep one ddp fsdp report)"; exit 2 ;;
  esac
done
[[ -f "$WORK/phases.log" ]] && cp "$WORK/phases.log" "$O/phases.log"
echo "== done in $(( $(date +%s) - T0 )) s, status $status"
exit $status
