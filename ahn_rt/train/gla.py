"""Linear attention with a per-head scalar decay, for training: batched, chunked, differentiable.

The recurrence (per sequence and head, pairs t = 1..T):

    M_t = exp(a_t) M_(t-1) + k_t v_t^T,     o_t = M_t^T q_t          (a_t <= 0; M in R^{Dk x Dv})

This is the AHN-Mamba2 memory (docs/semantics.md §11.2) with k = k^, v = dt v, a = dt A, q = q^; the caller
forms those. Layout [B, T, H, D].

How it is computed (T padded to N blocks of c = chunk_size pairs; everything batched over [N, B, H] except
the one recurrence over blocks): with G the cumulative log-decay inside a block and M0 the state entering
it,

    O = diag(e^G) Q M0 + ((Q K^T) * Gam) V,         Gam_ij = e^(G_i - G_j) for j <= i, else 0
    M_end = e^(G_c) M0 + (K * e^(G_c - G))^T V

so the states obey M_(n+1) = e^(G_c,n) M_n + Bin_n, a scalar transition per (block, sequence, head), run by
``_ScalarScan`` (one elementwise update per block forward and backward, hand-written backward). G and
its differences are formed in float64 (elementwise), so strong decays lose no precision; every exponent is
of a non-positive number. No per-token loop; autograd saves [N, B, H, c, c] / [N, B, H, c, D] tensors plus
the N + 1 block states.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _ScalarScan(torch.autograd.Function):
    """M_0 = M0; M_(n+1) = a_n M_n + B_n. a: [N, X], Bm: [N, X, Dk, Dv], M0: [X, Dk, Dv].
    Returns all states [N + 1, X, Dk, Dv] (index n = the state entering block n; index N = final)."""

    @staticmethod
    def forward(ctx, a, Bm, M0):
        N = a.shape[0]
        Ms = Bm.new_empty((N + 1,) + tuple(M0.shape))
        Ms[0].copy_(M0)
        for n in range(N):
            torch.addcmul(Bm[n], a[n][:, None, None], Ms[n], out=Ms[n + 1])
        ctx.save_for_backward(a, Ms)
        return Ms

    @staticmethod
    def backward(ctx, dMs):
        a, Ms = ctx.saved_tensors
        N = a.shape[0]
        dMs = dMs.contiguous()
        # dB[n] = total gradient of M_(n+1) = dMs[n+1] + a_(n+1) dB[n+1]
        dB = torch.empty_like(Ms[1:])
        dB[N - 1].copy_(dMs[N])
        for n in range(N - 1, 0, -1):
            torch.addcmul(dMs[n], a[n][:, None, None], dB[n], out=dB[n - 1])
        dM0 = dMs[0] + a[0][:, None, None] * dB[0] if ctx.needs_input_grad[2] else None
        da = (dB * Ms[:-1]).sum((-2, -1)) if ctx.needs_input_grad[0] else None
        return da, dB, dM0


def chunk_scalar_decay(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                       initial_state: torch.Tensor | None = None, *, chunk_size: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar-decay linear attention over T pairs per sequence, differentiable w.r.t. every input.

    q: [B, T, H, Dk]; k: [B, T, H, Dk]; v: [B, T, H, Dv]; log_decay: [B, T, H] (<= 0); initial_state:
    [B, H, Dk, Dv] or None (zeros). Used exactly as given (no normalization, no scale). Pair t:
    M <- e^(a_t) M + k_t v_t^T; o_t = M^T q_t. A pair with k (or v) = 0 and a = 0 leaves M unchanged (the
    padding rule). Computes in float32 whatever the input dtype (float64 stays float64) with autocast
    disabled. Returns (o [B, T, H, Dv], final_state [B, H, Dk, Dv]).
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if k.shape != (B, T, H, Dk) or v.shape[:3] != (B, T, H) or log_decay.shape != (B, T, H):
        raise ValueError(f"chunk_scalar_decay: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"log_decay {tuple(log_decay.shape)} do not match [B, T, H, D]")
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        qf, kf, vf, af = q.to(dt), k.to(dt), v.to(dt), log_decay.to(dt)
        c = int(chunk_size)
        N = -(-T // c)
        pad = N * c - T
        if pad:   # padded pairs: zero q/k/v, a = 0 (state unchanged, outputs dropped)
            qf, kf, vf = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (qf, kf, vf))
            af = F.pad(af, (0, 0, 0, pad))

        def blocks(x):   # [B, N*c, H, ...] -> [N, B, H, c, ...]
            x = x.reshape(B, N, c, H, *x.shape[3:])
            return x.permute(1, 0, 3, 2, *range(4, x.dim())).contiguous()

        Q, K, V = blocks(qf), blocks(kf), blocks(vf)           # [N, B, H, c, D]
        G = blocks(af).double().cumsum(-1)                     # [N, B, H, c]
        g_last = G[..., -1:]
        idx = torch.arange(c, device=q.device)
        incl = idx[:, None] >= idx[None, :]
        gam = torch.where(incl, G[..., :, None] - G[..., None, :], float("-inf")).exp().to(dt)
        P = (Q @ K.mT) * gam
        Kd = K * (g_last - G).exp().to(dt)[..., None]
        Bin = Kd.mT @ V                                        # [N, B, H, Dk, Dv]
        a_blk = g_last[..., 0].exp().to(dt)                    # [N, B, H]
        if initial_state is None:
            M0 = torch.zeros(B * H, Dk, Dv, dtype=dt, device=q.device)
        else:
            M0 = initial_state.to(dt).reshape(B * H, Dk, Dv)
        Ms = _ScalarScan.apply(a_blk.reshape(N, B * H), Bin.reshape(N, B * H, Dk, Dv), M0)
        O = (G.exp().to(dt)[..., None] * Q) @ Ms[:-1].view(N, B, H, Dk, Dv) + P @ V
        o = O.permute(1, 0, 3, 2, 4).reshape(B, N * c, H, Dv)[:, :T]
        return o, Ms[-1].view(B, H, Dk, Dv)
