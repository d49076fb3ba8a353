"""The gated delta rule for training: batched, chunked (WY/UT form), differentiable.

Same function as ``ahn_rt.ref.gdn_recurrent_ref`` (docs/semantics.md §5), for a batch of sequences and
with gradients for every input. Layout [B, T, H, D]; k and v are already expanded to the H query heads.

How it is computed (T padded to N blocks of c = chunk_size steps; everything below is batched over
[N, B, H] at once, except the one recurrence over blocks):

* per block, with G the cumulative log-decay inside the block, Gam_ij = exp(G_i - G_j) (j <= i), and
  A = strictly-lower(diag(beta) (K^ K^T) * Gam), one unit-lower-triangular inverse (``_UnitLowerInverse``,
  blocked forward substitution with batched matmuls only) gives

      U' = (I + A)^-1 diag(beta) V          W = (I + A)^-1 diag(beta e^G) K^

  so that the block's corrections are U = U' - W M0 for the state M0 entering it (§5, chunked form);
* the state then obeys a linear recurrence with a Dk x Dk transition per block:

      M_next = Atr M0 + Bin,   Atr = e^(G_c) I - Kd^T W,   Bin = Kd^T U',   Kd_i = k^_i e^(G_c - G_i)

  run by ``_StateScan`` (one batched matmul per block forward and one per block backward, with a
  hand-written backward: dM_n = Atr_n^T dM_(n+1) + (direct gradient), dAtr_n = dM_(n+1) M_n^T);
* the outputs are O = Qeff M0 + P U' with P = (Q^ K^T) * Gam (inclusive) and Qeff = e^G Q^ - P W,
  batched over all blocks once the entering states are known.

Every exponent is of a non-positive number (alpha <= 0, G decreasing), so nothing overflows; G and its
differences are formed in float64 (elementwise only), so strong decays lose no precision. Autograd
saves a fixed number of [N, B, H, c, c] / [N, B, H, c, D] tensors plus the N + 1 block states
[N + 1, B, H, Dk, Dv] (about 1.8 GB for one sequence at T = 8192, H = 16, D = 128, measured on the CPU);
there is no per-token loop and no per-block autograd graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

L2_EPS = 1e-6   # x / (||x|| + eps), docs/semantics.md §5


class _UnitLowerInverse(torch.autograd.Function):
    """T = (I + A)^-1 for strictly lower-triangular A [..., c, c] (c a multiple of 16) by blocked forward
    substitution: row by row inside the 16 x 16 diagonal blocks (15 batched row updates),
    then the blocks are merged pairwise (16 -> 32 -> 64 ...) with
    [[X, 0], [C, Y]]^-1 = [[X^-1, 0], [-Y^-1 C X^-1, Y^-1]]. Only batched matmuls, no triangular-solve
    kernel. Backward: dA = -strictly-lower(T^T dT T^T)."""

    @staticmethod
    def forward(ctx, A):
        c = A.shape[-1]
        b = 16 if c % 16 == 0 else c
        lead = A.shape[:-2]
        T = torch.zeros_like(A)
        # diagonal blocks: [..., c/b, b, b]
        Ad = A.unflatten(-2, (c // b, b)).unflatten(-1, (c // b, b)).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
        Ad = Ad.contiguous()
        Td = torch.eye(b, dtype=A.dtype, device=A.device).expand(*lead, c // b, b, b).clone()
        for i in range(1, b):
            Td[..., i:i + 1, :i] = -(Ad[..., i:i + 1, :i] @ Td[..., :i, :i])
        for k in range(c // b):
            T[..., k * b:(k + 1) * b, k * b:(k + 1) * b] = Td[..., k, :, :]
        s = b
        while s < c:
            for o in range(0, c, 2 * s):
                X = T[..., o:o + s, o:o + s]
                Y = T[..., o + s:o + 2 * s, o + s:o + 2 * s]
                T[..., o + s:o + 2 * s, o:o + s] = -(Y @ (A[..., o + s:o + 2 * s, o:o + s] @ X))
            s *= 2
        ctx.save_for_backward(T)
        return T

    @staticmethod
    def backward(ctx, dT):
        (T,) = ctx.saved_tensors
        return -(T.mT @ dT @ T.mT).tril(-1)


class _StateScan(torch.autograd.Function):
    """M_0 = M0; M_(n+1) = A_n M_n + B_n for n < N. A: [N, X, Dk, Dk], Bm: [N, X, Dk, Dv], M0: [X, Dk, Dv].
    Returns all states [N + 1, X, Dk, Dv] (index n = the state entering block n; index N = final)."""

    @staticmethod
    def forward(ctx, A, Bm, M0):
        N = A.shape[0]
        Ms = A.new_empty((N + 1,) + tuple(M0.shape))
        Ms[0].copy_(M0)
        for n in range(N):
            torch.baddbmm(Bm[n], A[n], Ms[n], out=Ms[n + 1])
        ctx.save_for_backward(A, Ms)
        return Ms

    @staticmethod
    def backward(ctx, dMs):
        A, Ms = ctx.saved_tensors
        N = A.shape[0]
        dMs = dMs.contiguous()
        # dB[n] = total gradient of M_(n+1) = dMs[n+1] + A_(n+1)^T dB[n+1]
        dB = torch.empty_like(Ms[1:])
        dB[N - 1].copy_(dMs[N])
        for n in range(N - 1, 0, -1):
            torch.baddbmm(dMs[n], A[n].mT, dB[n], out=dB[n - 1])
        dM0 = torch.baddbmm(dMs[0], A[0].mT, dB[0]) if ctx.needs_input_grad[2] else None
        dA = dB @ Ms[:-1].mT if ctx.needs_input_grad[0] else None
        return dA, dB, dM0


def chunk_gdn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor,
              initial_state: torch.Tensor | None = None, *, scale: float | None = None,
              chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule over T (write, read) pairs per sequence, differentiable w.r.t. every input.

    q: [B, T, H, Dk] read queries (post-RoPE); k: [B, T, H, Dk], v: [B, T, H, Dv] written tokens (already
    expanded to the H query heads); beta: [B, T, H]; alpha: [B, T, H] log-decay (<= 0); initial_state:
    [B, H, Dk, Dv] or None (zeros). q and k are l2-normalized inside as x / (||x|| + 1e-6); q is scaled by
    ``scale`` (default Dk^-0.5). Pair t: M <- e^alpha M; M <- M + k^ (beta (v - M^T k^))^T; o_t = M^T q^.
    A pair with beta = alpha = 0 leaves M unchanged (the padding rule).

    Computes in float32 whatever the input dtype (float64 inputs stay float64, which the tests use) and
    with autocast disabled. Returns (o [B, T, H, Dv], final_state [B, H, Dk, Dv]).
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if k.shape != (B, T, H, Dk) or v.shape[:3] != (B, T, H) or beta.shape != (B, T, H) or alpha.shape != (B, T, H):
        raise ValueError(f"chunk_gdn: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"beta {tuple(beta.shape)}, alpha {tuple(alpha.shape)} do not match [B, T, H, D]")
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = Dk ** -0.5
    with torch.autocast(q.device.type, enabled=False):
        qf, kf = q.to(dt), k.to(dt)
        qf = qf / (torch.linalg.vector_norm(qf, dim=-1, keepdim=True) + L2_EPS) * scale
        kf = kf / (torch.linalg.vector_norm(kf, dim=-1, keepdim=True) + L2_EPS)
        vf, bf, af = v.to(dt), beta.to(dt), alpha.to(dt)

        c = int(chunk_size)
        N = -(-T // c)
        pad = N * c - T
        if pad:   # padded pairs: zero q/k/v, beta = alpha = 0 (state unchanged, outputs dropped)
            qf, kf, vf = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (qf, kf, vf))
            bf, af = (F.pad(x, (0, 0, 0, pad)) for x in (bf, af))

        def blocks(x):   # [B, N*c, H, ...] -> [N, B, H, c, ...]
            x = x.reshape(B, N, c, H, *x.shape[3:])
            return x.permute(1, 0, 3, 2, *range(4, x.dim())).contiguous()

        Q, K, V = blocks(qf), blocks(kf), blocks(vf)           # [N, B, H, c, D]
        bt = blocks(bf)                                        # [N, B, H, c]
        # The cumulative log-decay and its differences in float64: with strong decays |G| reaches
        # hundreds inside a block, and G_i - G_j formed in float32 would lose ~|G| * 6e-8 absolutely.
        G = blocks(af).double().cumsum(-1)
        g_last = G[..., -1:]

        idx = torch.arange(c, device=q.device)
        incl = idx[:, None] >= idx[None, :]
        strict = idx[:, None] > idx[None, :]
        diff = G[..., :, None] - G[..., None, :]
        gam = torch.where(incl, diff, float("-inf")).exp().to(dt)   # e^(G_i - G_j) for j <= i, else 0
        A = torch.where(strict, (K @ K.mT) * gam * bt[..., None], 0.0)
        eG = G.exp().to(dt)
        rhs = bt[..., None] * torch.cat([V, eG[..., None] * K], dim=-1)
        X = _UnitLowerInverse.apply(A) @ rhs
        U, Wm = X.split([Dv, Dk], dim=-1)

        Kd = K * (g_last - G).exp().to(dt)[..., None]
        eye = torch.eye(Dk, dtype=dt, device=q.device)
        Atr = g_last.exp().to(dt)[..., None] * eye - Kd.mT @ Wm       # [N, B, H, Dk, Dk]
        Bin = Kd.mT @ U                                        # [N, B, H, Dk, Dv]
        P = (Q @ K.mT) * gam
        Qeff = eG[..., None] * Q - P @ Wm

        if initial_state is None:
            M0 = torch.zeros(B * H, Dk, Dv, dtype=dt, device=q.device)
        else:
            M0 = initial_state.to(dt).reshape(B * H, Dk, Dv)
        Ms = _StateScan.apply(Atr.reshape(N, B * H, Dk, Dk), Bin.reshape(N, B * H, Dk, Dv), M0)
        O = Qeff @ Ms[:-1].view(N, B, H, Dk, Dv) + P @ U       # [N, B, H, c, Dv]
        o = O.permute(1, 0, 3, 2, 4).reshape(B, N * c, H, Dv)[:, :T]
        return o, Ms[-1].view(B, H, Dk, Dv)
