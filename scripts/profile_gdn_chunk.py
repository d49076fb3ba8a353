"""Per-kernel breakdown of the memory's chunked prefill (``ops.gdn_chunk``) for one layer (torch.profiler).

    PYTHONPATH=. python scripts/profile_gdn_chunk.py --tokens 8192            # the 3B shape: H 16, Hkv 2, D 128
    PYTHONPATH=. python scripts/profile_gdn_chunk.py --tokens 8192 --block 8192   # one call, no token blocks

Prints the wall time per call and the kernels by device time, grouped by name; with fla importable, the same
for fla's ``chunk_gated_delta_rule`` on the same inputs (its heads repeated to H, as the bench does).
"""
import argparse
import time

import torch

from ahn_rt import ops
from profile_common import kernel_rows   # scripts/ (this script's folder)


def profile(name, fn, reps, rows):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / reps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ks = kernel_rows(prof, cut=("(", "<"))
    total = sum(t for t, _ in ks.values())
    print(f"== {name}: {ms:.3f} ms per call (wall), kernels {total / 1e3:.3f} ms in {sum(n for _, n in ks.values())}")
    for k, (t, n) in sorted(ks.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"  {t / 1e3:8.3f} ms  {n:4d}x  {k}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=None, help="tokens per call (ops._MEMORY_BLOCK); default as shipped")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--no-fla", action="store_true", help="ahn_rt only (e.g. under ncu)")
    args = ap.parse_args()
    if args.block:
        ops._MEMORY_BLOCK = args.block
    n, H, Hkv, D = args.tokens, args.heads, args.kv_heads, args.head_dim
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(n, H, D, device=dev, dtype=dt)
    k = torch.randn(n, Hkv, D, device=dev, dtype=dt)
    v = torch.randn(n, Hkv, D, device=dev, dtype=dt)
    beta = torch.rand(n, H, device=dev, dtype=dt)
    alpha = -torch.rand(n, H, device=dev) * 0.1
    state = torch.zeros(H, D, D, device=dev)
    print(f"gdn_chunk, {n} tokens, H {H}, Hkv {Hkv}, D {D}, token block {ops._MEMORY_BLOCK}, "
          f"{torch.cuda.get_device_name()}")
    profile("ahn_rt gdn_chunk", lambda: ops.gdn_chunk(q, k, v, beta, alpha, state.zero_()), args.reps, args.rows)
    if args.no_fla:
        return
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as e:   # noqa: BLE001 - optional peer
        print(f"fla not importable ({type(e).__name__}: {e})")
        return
    G = H // Hkv
    qf, kf, vf = q[None], k.repeat_interleave(G, 1)[None], v.repeat_interleave(G, 1)[None]
    init = torch.zeros(1, H, D, D, device=dev)
    profile("fla chunk_gated_delta_rule",
            lambda: chunk_gated_delta_rule(qf, kf, vf, g=alpha[None], beta=beta[None], initial_state=init,
                                           output_final_state=True, use_qk_l2norm_in_kernel=True),
            args.reps, args.rows)


if __name__ == "__main__":
    main()
