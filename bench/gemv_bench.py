"""GPU timing of the fused decode GEMV ``ahn_rt.gemv`` at the Qwen2.5-3B decode shapes, against cuBLAS
(torch F.linear) and the decode step's current sequence (rms_norm + F.linear / addmm + SiLU * up), all in
one process on one card.

    python bench/gemv_bench.py [--batch 1,8,16] [--json out.json]   # needs a GPU and the CUDA build
--batch: rows per call (one token of each of B sequences; each weight read once for all B): every table
is repeated per batch size.
Every variant is captured in a CUDA graph of many calls that rotate over weight copies larger than L2
(so each call streams its weights from HBM), replayed 20 times; median us per call (launch gaps inside a
graph included, as in the decode step) and weight GB/s, next to a 1 GiB device-to-device copy measured in
the same run. Then a whole synthetic decode step's GEMVs (36 layers + LM head, 6.17 GB of distinct
weights) against the weights-only floor. AHN_RT_GEMV_PDL toggles programmatic dependent launch.
"""
from __future__ import annotations

import os

from bench_args import (ArgParser, check_output, int_list, output_arg, require_cuda_ops, script_start,
                        write_json)

if __name__ == "__main__":
    script_start()   # Ctrl-C handler; the switches ahn_rt reads at import: one line here, not a traceback there

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ahn_rt.ref import gemv_ref  # noqa: E402
from machine import copy_bandwidth  # noqa: E402
from timing import graph_us  # noqa: E402

dev, dt = "cuda", torch.bfloat16
EPS = 1e-6
D, L, VOCAB, QKV, FF = 2048, 36, 151936, 2608, 11008


def gemv(*a):
    return torch.ops.ahn_rt.gemv(*a)


def set_pdl(on):
    os.environ["AHN_RT_GEMV_PDL"] = "1" if on else "0"


def rel_err(a, b):
    a, b = a.double().flatten().cpu(), b.double().flatten().cpu()
    return ((a - b).norm() / b.norm()).item()


def main(argv=None) -> int:
    ap = ArgParser(prog="python bench/gemv_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=output_arg, help="also write the results here")
    ap.add_argument("--batch", default="1", help="comma list of batch sizes, each >= 1 (default 1)")
    args = ap.parse_args(argv)
    try:
        batches = int_list(args.batch, "--batch")
    except ValueError as e:
        ap.error(str(e))
    require_cuda_ops("gemv_bench.py", ["gemv", "rms_norm"])
    if args.json:   # before the run, so that its results are never lost at the end
        check_output(args.json)
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
    copy_bw = copy_bandwidth(torch.device(dev), 1 << 30, 20) / 1e9
    print(f"copy bandwidth (1 GiB d2d, read + write): {copy_bw:.0f} GB/s")
    results = dict(device=props.name, copy_gbs=copy_bw, batches={})
    for B in batches:
        results["batches"][B] = run_batch(B, l2, copy_bw)
    if args.json and not write_json(results, args.json):
        return 1
    return 0


def run_batch(B, l2, copy_bw):
    """Every table for B rows per call; returns its results."""
    print(f"\n## batch {B}")
    results = dict(shapes=[], step={})

    # (name, K, N rows, norm, bias, residual, silu)
    shapes = [("qkvabg", D, QKV, True, True, False, False), ("o_proj", D, D, False, False, True, False),
              ("gate_up", D, 2 * FF, True, False, False, True), ("down", FF, D, False, False, True, False),
              ("lm_head", D, VOCAB, True, False, False, False)]
    rows = []
    for name, K, N, norm, bias, res, silu in shapes:
        nbytes = N * K * 2
        copies = max(2, -(-4 * l2 // nbytes))
        calls = max(copies, 24 if nbytes < (64 << 20) else 4)
        W = [torch.randn(N, K, device=dev, dtype=dt) * K ** -0.5 for _ in range(copies)]
        b = torch.randn(N, device=dev, dtype=dt) if bias else None
        nw = torch.rand(K, device=dev, dtype=dt) + 0.5 if norm else None
        n_out = N // 2 if silu else N
        r = torch.randn(B, n_out, device=dev, dtype=dt) if res else None
        x = torch.randn(B, K, device=dev, dtype=dt)
        lm = name == "lm_head"

        def fused():
            for i in range(calls):
                gemv(x, W[i % copies], b, nw, EPS, r, silu, lm)

        def cublas():  # the bare GEMV (GEMM for B > 1), same weight bytes
            for i in range(calls):
                F.linear(x, W[i % copies], b)

        def current():  # what decode_step / _logits do today for this shape
            for i in range(calls):
                h = torch.ops.ahn_rt.rms_norm(x, nw, EPS) if norm else x
                if silu:
                    g, u = F.linear(h, W[i % copies]).chunk(2, dim=-1)
                    F.silu(g) * u
                elif res:
                    torch.addmm(r, h, W[i % copies].t())
                elif lm:
                    F.linear(h, W[i % copies]).float()
                else:
                    F.linear(h, W[i % copies], b)

        # correctness at this shape (reference on the CPU), then the timings
        out = gemv(x, W[0], b, nw, EPS, r, silu, lm)
        cpu = lambda t: None if t is None else t.cpu()
        err = rel_err(out, gemv_ref(cpu(x), cpu(W[0]), cpu(b), cpu(nw), EPS, cpu(r), silu, lm))
        t = {}
        for label, fn in (("fused", fused), ("cublas", cublas), ("current", current)):
            set_pdl(False)
            t[label], _ = graph_us(fn, calls)
        set_pdl(True)
        t["fused_pdl"], _ = graph_us(fused, calls)
        set_pdl(False)
        gbs = {k: nbytes / v / 1e3 for k, v in t.items()}
        rows.append((name, N, K, nbytes, t, gbs, err))
        results["shapes"].append(dict(name=name, N=N, K=K, bytes=nbytes, us=t, gbs=gbs, rel_err=err))
        del W
        torch.cuda.empty_cache()

    # ---- a whole decode step's GEMVs: 36 layers of distinct weights + the LM head ----------------------
    g = torch.Generator(device=dev).manual_seed(0)
    rn = lambda *s, scale=1.0: (torch.randn(*s, device=dev, generator=g) * scale).to(dt)
    layers = [dict(w_in=rn(QKV, D, scale=D ** -0.5), b_in=rn(QKV), ln_in=rn(D) * 0.1 + 1,
                   w_o=rn(D, D, scale=D ** -0.5), w_gu=rn(2 * FF, D, scale=D ** -0.5), ln_post=rn(D) * 0.1 + 1,
                   w_down=rn(D, FF, scale=FF ** -0.5)) for _ in range(L)]
    lm_head, fnorm = rn(VOCAB, D, scale=D ** -0.5), rn(D) * 0.1 + 1
    step_bytes = sum(sum(v.numel() * 2 for v in lw.values()) for lw in layers) + lm_head.numel() * 2
    h0 = rn(B, D)

    def step_fused():
        h = h0
        for lw in layers:
            proj = gemv(h, lw["w_in"], lw["b_in"], lw["ln_in"], EPS, None, False, False)
            h = gemv(proj[:, :D].contiguous(), lw["w_o"], None, None, 0.0, h, False, False)  # attention stand-in
            a = gemv(h, lw["w_gu"], None, lw["ln_post"], EPS, None, True, False)
            h = gemv(a, lw["w_down"], None, None, 0.0, h, False, False)
        return gemv(h, lm_head, None, fnorm, EPS, None, False, True)

    def step_current():
        h = h0
        for lw in layers:
            x = torch.ops.ahn_rt.rms_norm(h, lw["ln_in"], EPS)
            proj = F.linear(x, lw["w_in"], lw["b_in"])
            h = torch.addmm(h, proj[:, :D], lw["w_o"].t())
            x = torch.ops.ahn_rt.rms_norm(h, lw["ln_post"], EPS)
            gate, up = F.linear(x, lw["w_gu"]).chunk(2, dim=-1)
            h = torch.addmm(h, F.silu(gate) * up, lw["w_down"].t())
        return F.linear(torch.ops.ahn_rt.rms_norm(h, fnorm, EPS), lm_head).float()

    ref_logits = step_current()
    set_pdl(False)
    fused_logits = step_fused()
    step_err = rel_err(fused_logits, ref_logits)
    floor_us = step_bytes / copy_bw / 1e3
    step = {}
    for label, fn, pdl in (("fused", step_fused, False), ("fused_pdl", step_fused, True),
                           ("current", step_current, False)):
        set_pdl(pdl)
        step[label], _ = graph_us(fn, 1)
    set_pdl(False)
    results["step"] = dict(bytes=step_bytes, floor_us=floor_us, us=step, logits_rel_err_vs_current=step_err)

    # ---- tables --------------------------------------------------------------------------------------
    print(f"\n| shape | N x K | MB | fused us | fused GB/s | %copy | fused+PDL us | GB/s | cuBLAS us | GB/s | "
          f"current seq us | GB/s | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, N, K, nbytes, t, gbs, err in rows:
        print(f"| {name} | {N} x {K} | {nbytes / 1e6:.1f} | {t['fused']:.2f} | {gbs['fused']:.0f} | "
              f"{100 * gbs['fused'] / copy_bw:.0f}% | {t['fused_pdl']:.2f} | {gbs['fused_pdl']:.0f} | "
              f"{t['cublas']:.2f} | {gbs['cublas']:.0f} | {t['current']:.2f} | {gbs['current']:.0f} | {err:.1e} |")
    print(f"\nwhole decode step's GEMVs, batch {B} ({L} layers + LM head, {step_bytes / 1e9:.3f} GB of weights), one graph:")
    print(f"floor (bytes / copy bandwidth): {floor_us / 1e3:.3f} ms")
    for label, v in step.items():
        print(f"  {label:10s} {v / 1e3:.3f} ms  ({step_bytes / v / 1e3:.0f} GB/s, {100 * floor_us / v:.0f}% of floor)")
    print(f"  logits rel err fused vs current: {step_err:.2e}")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
