"""Runs each CUDA op of ahn_rt once on small shapes (for compute-sanitizer memcheck / racecheck).

    compute-sanitizer --tool memcheck python scripts/sanitize_ops.py

--device cpu runs the same calls on the CPU kernels (CI's check that this device-only script still calls
every op as its schema reads).
"""
import argparse

args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
args.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
args = args.parse_args()

import torch  # noqa: E402

import ahn_rt._C  # noqa: E402, F401

dev, dt = args.device, torch.bfloat16
torch.manual_seed(0)
H, Hkv, D, S, W = 8, 2, 128, 4, 60
C = S + W + 3
pos_fill, pos_evict = torch.tensor([10], device=dev), torch.tensor([S + W + 7], device=dev)

x = torch.randn(5, 256, device=dev, dtype=dt)
torch.ops.ahn_rt.rms_norm(x=x, weight=torch.randn(256, device=dev, dtype=dt), eps=1e-6)

kc = torch.randn(Hkv, C, D, device=dev, dtype=dt)
vc = torch.randn(Hkv, C, D, device=dev, dtype=dt)
P = (H + 2 * Hkv) * D + 3 * H
for pos in (pos_fill, pos_evict):
    torch.ops.ahn_rt.decode_prep(
        proj=torch.randn(P, device=dev, dtype=dt),
        inv_freq=1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D)), pos=pos,
        q_norm=torch.ones(D, device=dev, dtype=dt), k_norm=torch.ones(D, device=dev, dtype=dt), norm_eps=1e-6,
        a_log=torch.zeros(H, device=dev), dt_bias=torch.zeros(H, device=dev), k_cache=kc, v_cache=vc,
        beta_cache=torch.rand(C, H, device=dev, dtype=dt), alpha_cache=-torch.rand(C, H, device=dev),
        sinks=S, window=W, k_evict=torch.empty(Hkv, D, device=dev, dtype=dt),
        v_evict=torch.empty(Hkv, D, device=dev, dtype=dt), beta_evict=torch.empty(H, device=dev, dtype=dt),
        alpha_evict=torch.empty(H, device=dev))
    for d, dtype in ((128, dt), (64, torch.float32), (256, torch.float16)):
        k2 = torch.randn(Hkv, C, d, device=dev, dtype=dtype)
        torch.ops.ahn_rt.swa_decode(q=torch.randn(H, d, device=dev, dtype=dtype), k_cache=k2, v_cache=k2,
                                    pos=pos, sinks=S, window=W, scale=d ** -0.5)
    for dk, dv in ((128, 128), (48, 40)):
        torch.ops.ahn_rt.gdn_decode(
            state=torch.randn(H, dk, dv, device=dev) * 0.1, q=torch.randn(H, dk, device=dev, dtype=dt),
            k=torch.randn(Hkv, dk, device=dev, dtype=dt), v=torch.randn(Hkv, dv, device=dev, dtype=dt),
            beta=torch.rand(H, device=dev, dtype=dt), alpha=-torch.rand(H, device=dev),
            z=torch.randn(H, device=dev, dtype=dt), norm_weight=torch.ones(dv, device=dev, dtype=dt),
            o_proj=torch.randn(H, dv, dv, device=dev, dtype=dt) * 0.1, out=torch.zeros(H, dv, device=dev, dtype=dt),
            pos=pos, sinks=S, window=W, eps=1e-6)
    # Mamba2: decode_prep's dt gate (no a_log, no beta) and mamba2_decode (vector and scalar state paths).
    torch.ops.ahn_rt.decode_prep(
        proj=torch.randn((H + 2 * Hkv) * D + 2 * H, device=dev, dtype=dt),
        inv_freq=1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D)), pos=pos, q_norm=None, k_norm=None,
        norm_eps=1e-6, a_log=None, dt_bias=torch.zeros(H, device=dev), k_cache=kc, v_cache=vc, beta_cache=None,
        alpha_cache=torch.rand(C, H, device=dev), sinks=S, window=W, k_evict=torch.empty(Hkv, D, device=dev, dtype=dt),
        v_evict=torch.empty(Hkv, D, device=dev, dtype=dt), beta_evict=None, alpha_evict=torch.empty(H, device=dev))
    for dk, dv in ((128, 128), (48, 40), (256, 256)):
        torch.ops.ahn_rt.mamba2_decode(
            state=torch.randn(H, dk, dv, device=dev) * 0.1, q=torch.randn(H, dk, device=dev, dtype=dt),
            k=torch.randn(Hkv, dk, device=dev, dtype=dt), v=torch.randn(Hkv, dv, device=dev, dtype=dt),
            dt=torch.rand(H, device=dev), a_log=torch.rand(H, device=dev), z=torch.randn(H, device=dev, dtype=dt),
            norm_weight=torch.ones(H * dv, device=dev, dtype=dt), o_proj=torch.randn(H, dv, dv, device=dev) * 0.1,
            out=torch.zeros(H, dv, device=dev, dtype=dt), pos=pos, sinks=S, window=W, eps=1e-5)
# Batched calls (slots): 3 rows on entries 3, 0, 4 of a pool of 5, positions filling / past the window.
N, slots = 5, torch.tensor([3, 0, 4], device=dev)
B = slots.numel()
pos_n = torch.tensor([10, 2, S + W - 1, S + W + 7, 3 * (S + W)], device=dev)
kcn, vcn = torch.randn(N, Hkv, C, D, device=dev, dtype=dt), torch.randn(N, Hkv, C, D, device=dev, dtype=dt)
ken, ven = torch.randn(N, Hkv, D, device=dev, dtype=dt), torch.randn(N, Hkv, D, device=dev, dtype=dt)
ben, aen = torch.rand(N, H, device=dev, dtype=dt), -torch.rand(N, H, device=dev)
q = torch.ops.ahn_rt.decode_prep(
    proj=torch.randn(B, P, device=dev, dtype=dt), inv_freq=1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D)),
    pos=pos_n, q_norm=None, k_norm=None, norm_eps=1e-6, a_log=torch.zeros(H, device=dev),
    dt_bias=torch.zeros(H, device=dev), k_cache=kcn, v_cache=vcn, beta_cache=torch.rand(N, C, H, device=dev, dtype=dt),
    alpha_cache=-torch.rand(N, C, H, device=dev), sinks=S, window=W, k_evict=ken, v_evict=ven, beta_evict=ben,
    alpha_evict=aen, slots=slots)
torch.ops.ahn_rt.swa_decode(q=q, k_cache=kcn, v_cache=vcn, pos=pos_n, sinks=S, window=W, scale=D ** -0.5, slots=slots)
for d, dtype in ((64, torch.float32), (256, torch.float16)):  # the fp32 and the widest tensor-core tiles
    k2 = torch.randn(N, Hkv, C, d, device=dev, dtype=dtype)
    torch.ops.ahn_rt.swa_decode(q=torch.randn(B, H, d, device=dev, dtype=dtype), k_cache=k2, v_cache=k2, pos=pos_n,
                                sinks=S, window=W, scale=d ** -0.5, slots=slots)
# A long cache at batch 16: the tensor-core kernel's blocks loop over several splits each (split_blocks <
# nsplit); positions from an empty tail to far past the fill point, and one row whose D is below the tile.
Cl, Bl = 8192, 16
pos_l = torch.tensor([0, 1, 47, 48, 95, 500, 1023, 4096, 8000, 8187, 8188, 8191, 9000, 20000, 100000, 3], device=dev)
for d in (128, 96):
    kl = torch.randn(Bl, Hkv, Cl, d, device=dev, dtype=dt)
    torch.ops.ahn_rt.swa_decode(q=torch.randn(Bl, H, d, device=dev, dtype=dt), k_cache=kl, v_cache=kl, pos=pos_l,
                                sinks=4, window=Cl - 4, scale=d ** -0.5, slots=torch.arange(Bl, device=dev).flip(0))
for dk in (128, 64, 48):  # fast paths 128 / 64, generic 48
    torch.ops.ahn_rt.gdn_decode(
        state=torch.randn(N, H, dk, dk, device=dev) * 0.1, q=torch.randn(B, H, dk, device=dev, dtype=dt),
        k=torch.randn(N, Hkv, dk, device=dev, dtype=dt), v=torch.randn(N, Hkv, dk, device=dev, dtype=dt), beta=ben,
        alpha=aen, z=torch.randn(B, H, device=dev, dtype=dt), norm_weight=torch.ones(dk, device=dev, dtype=dt),
        o_proj=torch.randn(H, dk, dk, device=dev, dtype=dt) * 0.1, out=torch.zeros(B, H, dk, device=dev, dtype=dt),
        pos=pos_n, sinks=S, window=W, eps=1e-6, slots=slots)
q = torch.ops.ahn_rt.decode_prep(
    proj=torch.randn(B, (H + 2 * Hkv) * D + 2 * H, device=dev, dtype=dt),
    inv_freq=1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D)), pos=pos_n, q_norm=None, k_norm=None,
    norm_eps=1e-6, a_log=None, dt_bias=torch.zeros(H, device=dev), k_cache=kcn, v_cache=vcn, beta_cache=None,
    alpha_cache=torch.rand(N, C, H, device=dev), sinks=S, window=W, k_evict=ken, v_evict=ven, beta_evict=None,
    alpha_evict=torch.rand(N, H, device=dev), slots=slots)
for dk in (128, 64, 48):
    torch.ops.ahn_rt.mamba2_decode(
        state=torch.randn(N, H, dk, dk, device=dev) * 0.1, q=torch.randn(B, H, dk, device=dev, dtype=dt),
        k=torch.randn(N, Hkv, dk, device=dev, dtype=dt), v=torch.randn(N, Hkv, dk, device=dev, dtype=dt),
        dt=torch.rand(N, H, device=dev), a_log=torch.rand(H, device=dev), z=torch.randn(B, H, device=dev, dtype=dt),
        norm_weight=torch.ones(H * dk, device=dev, dtype=dt), o_proj=torch.randn(H, dk, dk, device=dev, dtype=dt) * 0.1,
        out=torch.zeros(B, H, dk, device=dev, dtype=dt), pos=pos_n, sinks=S, window=W, eps=1e-5, slots=slots)
for dk, dv, n in ((128, 128, 3), (64, 72, 2), (48, 40, 2), (12, 20, 2)):   # tensor-core Dk 128, 64, any; CUDA-core
    f32 = dict(device=dev, dtype=torch.float32)
    torch.ops.ahn_rt.gdn_chunk_scan(
        w=torch.randn(H, n, 64, dk, **f32) * 0.1, u=torch.randn(H, n, 64, dv, **f32),
        kd_t=torch.randn(H, n, dk, 64, **f32) * 0.1, qg=torch.randn(H, n, 64, dk, **f32),
        gl=torch.rand(H, n, **f32), state=torch.randn(H, dk, dv, **f32))
    torch.ops.ahn_rt.gdn_chunk_scan(     # without the delta correction (Mamba2)
        w=None, u=torch.randn(H, n, 64, dv, **f32), kd_t=torch.randn(H, n, dk, 64, **f32) * 0.1,
        qg=torch.randn(H, n, 64, dk, **f32), gl=torch.rand(H, n, **f32), state=torch.randn(H, dk, dv, **f32))
for dk, dv, n, hq, hk in ((128, 128, 130, H, Hkv), (48, 40, 65, 3, 1), (12, 20, 1, 2, 2)):
    proj = torch.randn(n, hq * dk + 8, device=dev, dtype=dt)
    torch.ops.ahn_rt.gdn_chunk_prep(
        q=proj[:, 8:].view(n, hq, dk), k=torch.randn(n, hk, dk, device=dev, dtype=dt),
        v=torch.randn(n, hk, dv, device=dev, dtype=dt), beta=torch.rand(n, hq, device=dev, dtype=dt),
        alpha=-torch.rand(n, hq, device=dev), scale=dk ** -0.5)
    torch.ops.ahn_rt.mamba2_chunk_prep(
        q=proj[:, 8:].view(n, hq, dk), k=torch.randn(n, hk, dk, device=dev, dtype=dt),
        v=torch.randn(n, hk, dv, device=dev, dtype=dt), dt=torch.rand(n, hq, device=dev),
        a_log=torch.rand(hq, device=dev))
    torch.ops.ahn_rt.rope(x=proj[:, 8:].view(n, hq, dk), cos=torch.randn(n, dk, device=dev, dtype=dt),
                          sin=torch.randn(n, dk, device=dev, dtype=dt))
    torch.ops.ahn_rt.gdn_gate_norm(o=proj[:, 8:].view(n, hq, dk), z=torch.randn(n, hq, device=dev, dtype=dt),
                                   norm_weight=torch.ones(dk, device=dev), eps=1e-5)
for pad in (0, 1):   # 16-byte vectors; rows padded by one element (the one-element path)
    outs = [torch.randn(n, H, D + pad, device=dev, dtype=dt)[..., :D] for n in (100, 37, 64)]
    torch.ops.ahn_rt.attn_merge(outs=outs, lses=[torch.randn(H, o.shape[0], device=dev) for o in outs],
                                offsets=[0, 50, 36], rows=100)
outs = [torch.randn(n, H, D, device=dev, dtype=dt) for n in [100] * 12 + [1, 99, 50, 3]]   # the most parts
torch.ops.ahn_rt.attn_merge(outs=outs, lses=[torch.randn(H, o.shape[0], device=dev) for o in outs],
                            offsets=[0] * 12 + [99, 0, 50, 97], rows=100)
# the band attention (cuDNN, where built): whole buffers and padded (kv_len), GQA, a left bound; no left bound
# over the first kv_len rows of a cache (a filling chunk)
for n_keys, rows, left in ((300, 300, 100), (300, 333, 100), (200, 333, 0)):
    kb, vb = (torch.randn(Hkv, rows, D, device=dev, dtype=dt).transpose(0, 1) for _ in range(2))
    kv_len = torch.tensor([n_keys], dtype=torch.int32, device=dev) if rows > n_keys else None
    if left == 0:   # finite past kv_len, as the prefill's cache rows are (cuDNN's last tile reads them)
        kb[n_keys:], vb[n_keys:] = 1e4, 1e4
    try:
        torch.ops.ahn_rt.band_attention(torch.randn(128, H, D, device=dev, dtype=dt), kb, vb, left, D ** -0.5,
                                        kv_len)
        if left == 0:   # and a short chunk in a plan of more query rows: q_len (the rows past it zero)
            qp = torch.randn(160, H, D, device=dev, dtype=dt)
            qp[97:] = 0
            torch.ops.ahn_rt.band_attention(qp, kb, vb, 0, D ** -0.5, kv_len,
                                            torch.tensor([97], dtype=torch.int32, device=dev))
    except RuntimeError as e:
        if "without cudnn-frontend" not in str(e):
            raise
        print("sanitize_ops: no band attention in this build")
        break
for n_out in (296, 300, 45):
    torch.ops.ahn_rt.silu_mul(x=torch.randn(33, 2 * n_out, device=dev, dtype=dt))
if dev == "cuda":
    torch.cuda.synchronize()
print("sanitize_ops: every op ran")
