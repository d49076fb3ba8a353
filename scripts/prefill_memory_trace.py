"""Where a prefill chunk's transient memory peaks, traced on the CPU (no GPU needed).

    PYTHONPATH=. python scripts/prefill_memory_trace.py                      # 1/8 of the 3B chunk and window
    PYTHONPATH=. python scripts/prefill_memory_trace.py --mlp-rows 0 --memory-block 0   # no row / token blocks

One layer at the --preset widths (bf16) is stood past its fill point, then one steady chunk of --chunk
tokens (every token of it evicts one to the memory) runs under torch.profiler with profile_memory. The
allocations and frees, in time order, give the running total of live bytes the chunk added; the script
prints its peak and, for each top-level op, the highest total while it ran. On the CPU the attention is
the float32 reference (it materializes scores, which CUDA never does), so by default the attention op is
replaced by a stand-in that allocates what the CUDA path holds at once: --attention-parts partial outputs
[T, H, D] in the model dtype with their log-sum-exp, then the merged output. Everything else (projections,
the memory's chunk terms, the MLP) runs for real. Transients scale with the chunk, so a run at 1/8 of the
chunk and window reads as 1/8 of the full-size figures; the session state (the ring) is not counted.
Reading the table: the attention stand-in shows as aten::zeros, the memory as ahn_rt::gdn_chunk_prep /
gdn_chunk_scan, aten::baddbmm and aten::to (its float32 chunk terms alive), the MLP as ahn_rt::silu_mul.
(Labels through record_function would misplace the frees made inside them, so there are none.)
"""
import argparse
import bisect

import torch
from torch.profiler import ProfilerActivity, profile

import ahn_rt.model as model_mod
from ahn_rt import ops
from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict


def attention_standin(parts: int):
    def attention(q, k, v, k_cache, v_cache, p0, sinks, window, scale, cached=False):
        T, H, D = q.shape
        held = [(torch.zeros(T, H, D, dtype=q.dtype), torch.zeros(H, T)) for _ in range(parts)]
        out = torch.zeros(T, H, D, dtype=q.dtype)
        del held
        return out
    return attention


def trace(args):
    torch.manual_seed(0)
    if args.mlp_rows:
        model_mod._MLP_ROWS = args.mlp_rows
    else:
        model_mod._MLP_ROWS = 1 << 40
    ops._MEMORY_BLOCK = args.memory_block or 1 << 40   # where the memory runs in token blocks
    if args.attention_parts:
        ops.prefill_attention = attention_standin(args.attention_parts)
    cfg = preset_config(args.preset, ahn=args.ahn_impl, dtype=torch.bfloat16)
    cfg.update(num_hidden_layers=1, vocab_size=4096)
    sd = random_state_dict(cfg, seed=0, dtype=torch.bfloat16, device="cpu")
    model = from_state_dict(cfg, sd, window=args.window, sinks=args.sinks, mode="ahn", dtype=torch.bfloat16,
                            device="cpu", chunk_size=args.chunk)
    s = model.new_session()
    T, fill = args.chunk, args.sinks + args.window
    ids = torch.randint(0, 4096, (fill + 2 * T,))
    s.forward(ids[: fill + T], last_only=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        s.forward(ids[fill + T:], last_only=True)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    # Allocations are charged to the op that made them (its self share); frees are "[memory]" events.
    deltas = [(e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
              for e in events]
    deltas = [d for d in deltas if d[1]]
    times, running, total = [], [], 0
    for t, m in deltas:
        total += m
        times.append(t)
        running.append(total)
    by_op = {}
    for e in events:
        if e.cpu_parent is not None or e.name == "[memory]":
            continue
        lo = bisect.bisect_left(times, e.time_range.start)
        hi = bisect.bisect_right(times, e.time_range.end)
        high = max([running[lo - 1] if lo else 0] + running[lo:hi])
        by_op[e.name] = max(by_op.get(e.name, 0), high)
    return max(running, default=0), by_op


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="qwen2.5-3b")
    ap.add_argument("--ahn-impl", default="gdn", help="gdn, dn or mamba2")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--window", type=int, default=4080)
    ap.add_argument("--sinks", type=int, default=128)
    ap.add_argument("--mlp-rows", type=int, default=256, help="MLP rows per block (0: one block)")
    ap.add_argument("--memory-block", type=int, default=256, help="memory tokens per call (0: one call)")
    ap.add_argument("--attention-parts", type=int, default=8,
                    help="partial outputs the attention stand-in holds (0: the CPU reference attention)")
    ap.add_argument("--rows", type=int, default=10)
    args = ap.parse_args()
    peak, by_op = trace(args)
    print(f"{args.preset}, chunk {args.chunk}, window {args.window}: peak {peak / 2**20:.1f} MiB above the "
          f"state and weights")
    print("| op (top level) | highest live MiB while it ran |\n|---|---:|")
    for name, b in sorted(by_op.items(), key=lambda x: -x[1])[: args.rows]:
        print(f"| {name} | {b / 2**20:.1f} |")


if __name__ == "__main__":
    main()
