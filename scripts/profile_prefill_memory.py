"""What is alive on the GPU when a long prefill's memory peaks (CUDA; the allocator's own history).

    PYTHONPATH=. python scripts/profile_prefill_memory.py --tokens 131072        # qwen2.5-3b, random weights

One prompt of --tokens random ids runs once to warm up, then again in a new session under
torch.cuda.memory._record_memory_history. Replaying the recorded allocations and frees in order gives the
running total of bytes the second prompt added (the weights and anything allocated before it are not
counted; the session's ring is). At the highest total the script lists the live blocks, grouped by the
innermost ahn_rt source line that allocated them, largest first: the places to look at to cut the peak.
"""
import argparse
import os
import sys
from collections import defaultdict

import torch

from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def where(frames) -> str:
    """The innermost frame in this project's source (else the innermost frame) as file:line function."""
    for f in frames:
        name = f.get("filename", "")
        if name.startswith(_ROOT) and "/scripts/" not in name:
            return f"{os.path.relpath(name, _ROOT)}:{f.get('line')} {f.get('name')}"
    return f"{frames[0].get('filename')}:{frames[0].get('line')}" if frames else "?"


def live_at_peak(trace):
    """(peak bytes, {addr: (size, frames)} alive at the peak) from one device's allocator trace."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            total += e["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
    return peak, at_peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-3b")
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--window", type=int, default=32640)
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this script needs a CUDA GPU (it reads the CUDA allocator's history)")
    dev = torch.device("cuda")
    cfg = preset_config(args.preset, ahn="gdn", dtype=torch.bfloat16)
    model = from_state_dict(cfg, random_state_dict(cfg, seed=0, dtype=torch.bfloat16, device=dev),
                            window=args.window, sinks=args.sinks, mode="ahn", dtype=torch.bfloat16, device=dev)
    ids = torch.randint(0, cfg["vocab_size"], (args.tokens,), device=dev)
    model.new_session().forward(ids, last_only=True)   # warm-up: plans, graphs, workspaces
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
    s = model.new_session()
    s.forward(ids, last_only=True)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak_seen = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    trace = snap["device_traces"][torch.cuda.current_device()]
    peak, at_peak = live_at_peak(trace)
    groups = defaultdict(lambda: [0, 0])
    for size, frames in at_peak.values():
        g = groups[where(frames)]
        g[0] += size
        g[1] += 1
    print("| GiB | blocks | allocated at |\n|---:|---:|---|")
    for loc, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:args.rows]:
        print(f"| {size / 2 ** 30:.3f} | {n} | {loc} |")
    # the summary last, so that the tail of a long log shows it
    print(f"{args.preset} prefill of {args.tokens} tokens (W={args.window}, S={args.sinks}, chunk {s.chunk_size}): "
          f"peak {peak / 2 ** 30:.3f} GiB above what was allocated before it (max_memory_allocated: "
          f"{peak_seen:.3f}); {len(trace)} allocator events")


if __name__ == "__main__":
    main()
