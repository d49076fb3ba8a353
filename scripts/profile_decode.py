"""Per-kernel breakdown of one decode step (CUDA graph replays under torch.profiler), for the notes.

    PYTHONPATH=. python scripts/profile_decode.py [--preset qwen2.5-3b] [--context 32768] [--steps 20]
    PYTHONPATH=. python scripts/profile_decode.py --batch 16 --context 1024   # model.step of 16 pooled sessions

Without --batch: one session's ``stepper`` (the generate path). With --batch B: ``model.step`` over B
sessions of one state pool (the serving path), every session filled to --context.
"""
import argparse

import torch

from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict
from ahn_rt.sampling import Sampler, SamplingParams
from profile_common import kernel_rows   # scripts/ (this script's folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2.5-3b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mode", default="ahn")
    ap.add_argument("--batch", type=int, default=0, help="model.step over this many pooled sessions")
    args = ap.parse_args()
    cfg = preset_config(args.preset, True, torch.bfloat16)
    model = from_state_dict(cfg, random_state_dict(cfg, device="cuda"), window=32640, sinks=128,
                            mode=args.mode, dtype="bf16", device="cuda")
    if args.batch:
        pool = model.new_pool(args.batch)
        sessions = [model.new_session(pool=pool) for _ in range(args.batch)]
        for s in sessions:
            s.state.fill_random(args.context)

        def step(tok):   # greedy: the batch's next tokens stay on the device
            return model.step(sessions, tok).argmax(-1)
        tok = torch.ones(args.batch, dtype=torch.int64, device="cuda")
    else:
        full = model.config.mode == "full"   # (ahn / swa states are always sinks + window slots)
        sess = model.new_session(capacity=args.context + args.steps + 32 if full else None)
        sess.state.fill_random(args.context)
        step = sess.stepper(Sampler(SamplingParams(temperature=0), model.config.vocab_size, "cuda"))
        tok = torch.ones(1, dtype=torch.int64, device="cuda")
    for _ in range(5):
        tok = step(tok)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            tok = step(tok)
        torch.cuda.synchronize()
    rows = kernel_rows(prof)
    total = sum(t for t, _ in rows.values()) / args.steps
    what = f"model.step b{args.batch}" if args.batch else "stepper"
    print(f"{args.preset} {args.mode} @ {args.context}, {what}: kernel time {total:.1f} us/step "
          f"({sum(c for _, c in rows.values()) // args.steps} kernels/step)")
    print(f"| kernel | us/step | calls/step | share |\n|---|---|---|---|")
    for name, (t, c) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:20]:
        print(f"| {name} | {t / args.steps:.1f} | {c // args.steps} | {100 * t / args.steps / total:.1f}% |")


if __name__ == "__main__":
    main()
