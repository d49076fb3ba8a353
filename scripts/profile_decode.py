"""Per-kernel breakdown of one decode step (CUDA graph replays under torch.profiler), for the notes.

    PYTHONPATH=. python scripts/profile_decode.py [--preset qwen2.5-3b] [--context 32768] [--steps 20]
    PYTHONPATH=. python scripts/profile_decode.py --batch 16 --context 1024   # model.step of 16 pooled sessions
    PYTHONPATH=. python scripts/profile_decode.py --context 1024 --gaps       # where the GPU idles per token

--gaps times the loop a streaming caller runs (each step reads its token on the host) under a CPU + CUDA
trace and reports the GPU's busy time per step, its idle time between steps (the host's turn-around:
reading the token, Python, the graph launch) and inside them (kernel boundaries), and the host calls.

Without --batch: one session's ``stepper`` (the generate path). With --batch B: ``model.step`` over B
sessions of one state pool (the serving path), every session filled to --context.
"""
import argparse

import torch

from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict
from ahn_rt.sampling import Sampler, SamplingParams
import os
import tempfile

from profile_common import kernel_rows, timeline_gaps   # scripts/ (this script's folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2.5-3b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--mode", default="ahn")
    ap.add_argument("--batch", type=int, default=0, help="model.step over this many pooled sessions")
    ap.add_argument("--gaps", action="store_true", help="the GPU's idle time per step of a streaming loop")
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
    if args.gaps:
        return gaps(step, tok, args)
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


def gaps(step, tok, args):
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            with torch.profiler.record_function("decode_step"):
                tok = step(tok)
                tok.tolist()   # the host reads the token(s): the sync a streaming caller pays
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        g = timeline_gaps(path)
    finally:
        os.remove(path)
    what = f"model.step b{args.batch}" if args.batch else "stepper"
    print(f"{args.preset} {args.mode} @ {args.context}, {what}, {g['steps']} steps (us per step, under the profiler):")
    print(f"wall {g['wall']:.1f} = GPU busy {g['busy']:.1f} + idle between steps {g['idle_between']:.1f} + "
          f"idle inside {g['idle_inside']:.1f} ({g['gaps_inside']:.1f} gaps > 1 us)")
    print(f"host: step call {g['host_step']:.1f}, step start -> graph launch {g.get('host_to_launch', float('nan')):.1f}")
    for k, v in g.items():
        if k.startswith("host_") and isinstance(v, tuple):
            print(f"  {k[5:]}: {v[0]:.1f} us x {v[1]:.1f} per step")


if __name__ == "__main__":
    main()
