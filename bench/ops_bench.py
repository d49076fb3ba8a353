"""Per-op GPU timing of the compiled ahn_rt ops at the Qwen2.5-3B shape (36 layers, window full).

    python bench/ops_bench.py        # needs a GPU and the CUDA build (scripts/device_check.sh)
    python bench/ops_bench.py --only swa                         # swa_decode alone (A/B: PYTHONPATH)
    python bench/ops_bench.py --only gdn                         # the memory steps alone: gdn_decode (default:
                                                                 # fast kernel) and mamba2_decode
    AHN_RT_GDN_GENERIC=1 python bench/ops_bench.py --only gdn    # the generic gdn_decode kernel, for A/B
Prints device, the measured copy bandwidth, then for each op: median us per call (CUDA events, layers
rotated so the working set exceeds L2) and achieved GB/s. Timing and the copy bandwidth: bench/timing.py,
bench/machine.py (the same helpers as bench/decode_latency.py).
"""

from bench_args import ArgParser, require_cuda_ops, script_start

if __name__ == "__main__":
    script_start()   # Ctrl-C handler; the switches ahn_rt reads at import: one line here, not a traceback there

import torch  # noqa: E402

from ahn_rt.settings import kernel_flag  # noqa: E402
from machine import copy_bandwidth  # noqa: E402
from timing import events_us, graph_us  # noqa: E402

dev, dt = "cuda", torch.bfloat16
L, H, Hkv, D, S, W = 36, 16, 2, 128, 128, 32640
C = S + W


def main(only=None):
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    copy_bw = copy_bandwidth(torch.device(dev), 1 << 30, 10) / 1e9
    print(f"copy bandwidth (read + write): {copy_bw:.0f} GB/s")

    kc = torch.randn(L, Hkv, C, D, device=dev, dtype=dt)
    vc = torch.randn(L, Hkv, C, D, device=dev, dtype=dt)
    q = torch.randn(L, H, D, device=dev, dtype=dt)
    rows = []
    for p in (() if only == "gdn" else (1023, 8191, C + 5000)):
        pos = torch.tensor([p], device=dev)

        def swa():
            for i in range(L):
                torch.ops.ahn_rt.swa_decode(q=q[i], k_cache=kc[i], v_cache=vc[i], pos=pos, sinks=S, window=W,
                                            scale=D ** -0.5)
        us = graph_us(swa)[0] / L   # median us per call, all L layers in one CUDA graph
        n = min(p + 1, C)
        gbs = 2 * Hkv * n * D * 2 / us / 1e3
        rows.append((f"swa_decode n={n}", us, gbs))
    if only == "swa":
        print_rows(rows, copy_bw)
        return

    state = torch.randn(L, H, D, D, device=dev) * 0.1
    qs, ks, vs = (torch.randn(L, h, D, device=dev, dtype=dt) for h in (H, Hkv, Hkv))
    beta, z = torch.rand(L, H, device=dev, dtype=dt), torch.randn(L, H, device=dev, dtype=dt)
    alpha = -torch.rand(L, H, device=dev)
    nw = torch.ones(D, device=dev, dtype=dt)
    op = torch.randn(L, H, D, D, device=dev, dtype=dt) * 0.05
    out = torch.zeros(L, H, D, device=dev, dtype=dt)
    pos = torch.tensor([C + 10], device=dev)

    def gdn():
        for i in range(L):
            torch.ops.ahn_rt.gdn_decode(state=state[i], q=qs[i], k=ks[i], v=vs[i], beta=beta[i], alpha=alpha[i], z=z[i],
                                        norm_weight=nw, o_proj=op[i], out=out[i], pos=pos, sinks=S, window=W,
                                        eps=1e-6)
    dt_m2, a_log = torch.rand(L, H, device=dev) * 0.1, torch.rand(H, device=dev)
    nw_m2 = torch.ones(H * D, device=dev, dtype=dt)

    def mamba2():
        for i in range(L):
            torch.ops.ahn_rt.mamba2_decode(state=state[i], q=qs[i], k=ks[i], v=vs[i], dt=dt_m2[i], a_log=a_log,
                                           z=z[i], norm_weight=nw_m2, o_proj=op[i], out=out[i], pos=pos, sinks=S,
                                           window=W, eps=1e-5)
    path = "generic" if kernel_flag("AHN_RT_GDN_GENERIC") else "fast"
    print(f"gdn_decode kernel: {path} (AHN_RT_GDN_GENERIC)")
    traffic = L * (H * D * D * 4 * 2 + H * D * D * 2)   # state read + write, o_proj read
    for name, fn in (("gdn_decode", gdn), ("mamba2_decode", mamba2)):
        us36 = events_us(fn)[0]
        rows.append((f"{name} x36 eager (total)", us36, traffic / us36 / 1e3))
        usg = graph_us(fn)[0]  # the same 36 calls in one CUDA graph (as in the decode step)
        rows.append((f"{name} x36 in a graph (total)", usg, traffic / usg / 1e3))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        gdn()
        mamba2()
        if only != "gdn":
            swa()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
    if only == "gdn":
        print_rows(rows, copy_bw)
        return

    P = (H + 2 * Hkv) * D + 3 * H
    proj = torch.randn(L, P, device=dev, dtype=dt)
    kc1 = torch.zeros(Hkv, C, D, device=dev, dtype=dt)
    vc1 = torch.zeros_like(kc1)
    args = dict(inv_freq=torch.rand(D // 2, device=dev), pos=pos, q_norm=None, k_norm=None, norm_eps=1e-6,
                a_log=torch.zeros(H, device=dev), dt_bias=torch.zeros(H, device=dev), k_cache=kc1, v_cache=vc1,
                beta_cache=torch.zeros(C, H, device=dev, dtype=dt), alpha_cache=torch.zeros(C, H, device=dev),
                sinks=S, window=W, k_evict=torch.zeros(Hkv, D, device=dev, dtype=dt),
                v_evict=torch.zeros(Hkv, D, device=dev, dtype=dt), beta_evict=torch.zeros(H, device=dev, dtype=dt),
                alpha_evict=torch.zeros(H, device=dev))
    rows.append(("decode_prep", graph_us(lambda: [torch.ops.ahn_rt.decode_prep(proj=proj[i], **args)
                                              for i in range(L)])[0] / L, float("nan")))
    x = torch.randn(1, 2048, device=dev, dtype=dt)
    w = torch.ones(2048, device=dev, dtype=dt)
    rows.append(("rms_norm [1, 2048]", graph_us(lambda: [torch.ops.ahn_rt.rms_norm(x=x, weight=w, eps=1e-6)
                                                     for _ in range(L)])[0] / L, float("nan")))
    print_rows(rows, copy_bw)


def print_rows(rows, copy_bw):
    print(f"| op | us/call | GB/s | % of copy |\n|---|---|---|---|")
    for name, us, gbs in rows:
        print(f"| {name} | {us:.2f} | {gbs:.0f} | {100 * gbs / copy_bw:.0f}% |")


if __name__ == "__main__":
    ap = ArgParser(prog="python bench/ops_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["gdn", "swa"], default=None,
                    help="time only this op (gdn: both memory steps, gdn_decode and mamba2_decode)")
    only = ap.parse_args().only
    require_cuda_ops("ops_bench.py", ["swa_decode", "gdn_decode", "mamba2_decode", "decode_prep", "rms_norm"])
    main(only)
