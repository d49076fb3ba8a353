"""Pure-torch reference implementations of every hot op.

Each function here has exactly the signature of the op of the same name (minus ``_ref``) in
``ahn_rt.ops``; the compiled kernels in csrc/ are tested against these. They favour being obviously
right over being fast: float32 math, literal loops where the math is a recurrence.

Shapes use T for tokens, H for query heads, Hkv for key/value heads (H % Hkv == 0, query head h reads
kv head h // (H // Hkv)), D / Dk / Dv for head dims, C = sinks + window for the cache capacity.

Cache layout (owned by ``ahn_rt.cache``): one layer's keys are ``[Hkv, C, D]``; slots ``[0, S)`` hold the
sink tokens, slots ``[S, S + W)`` are a ring buffer, and position ``p >= S`` lives in slot
``S + (p - S) % W``. Positions ``p < S + W`` therefore sit in slot ``p`` and the valid slots after
``p + 1`` tokens are always ``[0, min(p + 1, S + W))``. Keys are stored after RoPE, so attention does not
care about slot order.
"""
from __future__ import annotations


import functools

import torch
import torch.nn.functional as F

from . import functional
from .cache import held_positions, ring_slot  # the one slot formula and its inverse (owned by the State)

# fla's fused_recurrent kernel normalizes q and k as x / (||x|| + eps) (docs/semantics.md §5).
L2_EPS = 1e-6
# fla's chunked kernels work on blocks of 64 time steps (docs/semantics.md §5).
GDN_CHUNK = 64


# ----------------------------------------------------------------------------------------------
# Norms and RoPE
# ----------------------------------------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen RMSNorm over the last dim (``functional.rms_norm``, which training computes too)."""
    return functional.rms_norm(x, weight, eps)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (``functional.rope``). x: [T, nh, D]; cos, sin: [T, D] in x.dtype."""
    return functional.rope(x, cos, sin)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def window_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                         k_pos: torch.Tensor, sinks: int, window: int, scale: float) -> torch.Tensor:
    """Attention of T queries over Tk keys under the AHN mask (docs/semantics.md §2).

    q: [T, H, D]; k, v: [Tk, Hkv, D]; q_pos: [T], k_pos: [Tk] absolute positions (int64).
    Query at p sees key at j iff j <= p and (p - j < window or j < sinks). Softmax in float32.
    Returns [T, H, D] in q.dtype.
    """
    T, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    kf = k.float().repeat_interleave(G, dim=1).transpose(0, 1)  # [H, Tk, D]
    vf = v.float().repeat_interleave(G, dim=1).transpose(0, 1)
    out = torch.empty(T, H, v.shape[-1], dtype=q.dtype, device=q.device)
    # Query blocks bound the [H, block, Tk] score tensor on long prompts.
    block = max(1, (1 << 24) // max(1, H * k.shape[0]))
    for s in range(0, T, block):
        e = min(T, s + block)
        qp = q_pos[s:e, None]
        kp = k_pos[None, :]
        allowed = (kp <= qp) & ((qp - kp < window) | (kp < sinks))
        scores = torch.einsum("thd,hkd->htk", q[s:e].float(), kf) * scale
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[s:e] = torch.einsum("htk,hkd->thd", probs, vf).to(q.dtype)
    return out


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, p0: int, sinks: int, window: int, scale: float) -> torch.Tensor:
    """A chunk's attention over the ring cache and its own keys (docs/semantics.md §2-§3).

    q: [T, H, D], k, v: [T, Hkv, D] for positions [p0, p0 + T); k_cache, v_cache: [Hkv, C, D] as they are
    after p0 tokens (before the chunk's writes; a chunk that fills the cache in order may be written already:
    only slots of positions below p0 are read). Every occupied slot and every chunk row is a candidate key;
    the sinks + window rule picks. Returns [T, H, D] in q.dtype.
    """
    k_all, v_all, q_pos, k_pos = chunk_keys(k, v, k_cache, v_cache, p0, sinks, window)
    return window_attention_ref(q, k_all, v_all, q_pos, k_pos, sinks, window, scale)


def chunk_keys(k, v, k_cache, v_cache, p0: int, sinks: int, window: int):
    """Every key a chunk may attend, gathered: the occupied slots then the chunk's own rows.
    Returns (k_all, v_all [n + T, Hkv, D], the chunk's positions [T], the keys' positions [n + T])."""
    held = held_positions(p0, sinks, window, k.device)
    n = held.numel()
    q_pos = torch.arange(p0, p0 + k.shape[0], dtype=torch.int64, device=k.device)
    return (torch.cat([k_cache[:, :n].transpose(0, 1), k]), torch.cat([v_cache[:, :n].transpose(0, 1), v]),
            q_pos, torch.cat([held, q_pos]))


def band_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, scale: float,
                       kv_len: torch.Tensor | None = None, q_len: torch.Tensor | None = None):
    """Attention of Tq queries over n >= Tq keys with the diagonal at the bottom-right corner: query i sees
    key j iff j <= i + (n - Tq) and, with left > 0, j > i + (n - Tq) - left (the ``left`` keys ending at its
    diagonal). q [Tq, H, D], k / v [N, Hkv, D] (query head h reads kv head h // (H / Hkv)); n = N, or the
    value of ``kv_len`` (int32 [1]): only the first kv_len rows are keys; likewise ``q_len``: only the first
    q_len rows of q are queries (Tq = q_len for the rule; the rows past it give 0 and a log-sum-exp of -inf).
    Scores in float32. Returns (out [rows of q, H, D] in q's dtype, logsumexp [H, rows of q] float32)."""
    if q_len is not None:
        m = int(q_len.item())
        out = q.new_zeros(q.shape)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        if m:
            out[:m], lse[:, :m] = band_attention_ref(q[:m], k, v, left, scale, kv_len)
        return out, lse
    if kv_len is not None:
        n = int(kv_len.item())
        k, v = k[:n], v[:n]
    Tq, H, D = q.shape
    n, Hkv = k.shape[0], k.shape[1]
    G = H // Hkv
    kf = k.float().repeat_interleave(G, dim=1).transpose(0, 1)            # [H, n, D]
    vf = v.float().repeat_interleave(G, dim=1).transpose(0, 1)
    s = torch.einsum("thd,hnd->htn", q.float(), kf) * scale
    i = torch.arange(Tq, device=q.device)[:, None] + (n - Tq)
    j = torch.arange(n, device=q.device)[None, :]
    ok = j <= i
    if left > 0:
        ok &= j > i - left
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                      # [H, Tq]
    out = torch.einsum("htn,hnd->thd", (s - lse[..., None]).exp(), vf)
    return out.to(q.dtype), lse


def attn_merge_ref(outs: list, lses: list, offsets: list, rows: int) -> torch.Tensor:
    """Combine partial attention results by log-sum-exp. Part i covers rows [offsets[i], offsets[i] + n_i):
    outs[i] [n_i, H, D] (each normalized over its own keys), lses[i] [H, n_i] float32 (the log of its
    softmax denominator). Every row must be covered by some part. Returns [rows, H, D] in the outs' dtype."""
    H, D = outs[0].shape[1], outs[0].shape[2]
    dev = outs[0].device
    lse_all = torch.full((len(outs), H, rows), float("-inf"), dtype=torch.float32, device=dev)
    for i, (off, lse) in enumerate(zip(offsets, lses)):
        lse_all[i, :, off:off + lse.shape[1]] = lse
    total = torch.logsumexp(lse_all, dim=0)                          # [H, rows]
    out = torch.zeros(rows, H, D, dtype=torch.float32, device=dev)
    for off, o, lse in zip(offsets, outs, lses):
        n = o.shape[0]
        weight = (lse - total[:, off:off + n]).exp().transpose(0, 1)[..., None]
        out[off:off + n] += o.float() * weight
    return out.to(outs[0].dtype)


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [rows, 2N] (gate | up) -> silu(gate) * up [rows, N], each op rounded to x.dtype as in torch."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def ring_write_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, beta_cache: torch.Tensor | None,
                   alpha_cache: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor | None,
                   alpha: torch.Tensor | None, pos: torch.Tensor, sinks: int, window: int,
                   k_evict: torch.Tensor, v_evict: torch.Tensor, beta_evict: torch.Tensor | None,
                   alpha_evict: torch.Tensor | None) -> None:
    """Write one decoded token into its ring slot, handing the slot's old token to the memory first.

    k_cache, v_cache: [Hkv, C, D]; alpha_cache: [C, H] float32 (the memory's float32 gate: GatedDeltaNet's
    log-decay alpha, Mamba2's dt); beta_cache: [C, H] (model dtype; GatedDeltaNet only, else None);
    k, v: [Hkv, D]; alpha, beta: [H]; pos: int64 tensor [1] = absolute position of the new token.
    With gates (an AHN memory: alpha_cache given): when pos >= sinks + window the slot holds position
    pos - window, which is copied into k_evict / v_evict / alpha_evict (/ beta_evict) before it is
    overwritten; otherwise those buffers are left untouched. Without gates (no memory) nothing is
    evicted. Sink slots are written only by positions < sinks.
    """
    p = int(pos.reshape(-1)[0])
    slot = ring_slot(p, sinks, window)
    gated = alpha_cache is not None
    if gated and p >= sinks + window:
        k_evict.copy_(k_cache[:, slot])
        v_evict.copy_(v_cache[:, slot])
        alpha_evict.copy_(alpha_cache[slot])
        if beta_cache is not None:
            beta_evict.copy_(beta_cache[slot])
    k_cache[:, slot] = k
    v_cache[:, slot] = v
    if gated:
        alpha_cache[slot] = alpha
        if beta_cache is not None:
            beta_cache[slot] = beta


def _entry(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    """Entry e of a batched op's per-entry tensor (None stays None)."""
    return None if t is None else t[e]


def swa_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                   sinks: int, window: int, scale: float, slots: torch.Tensor | None = None) -> torch.Tensor:
    """One query over the sinks + ring cache after the token at ``pos`` was written.

    q: [H, D]; k_cache, v_cache: [Hkv, C, D]; pos: int64 tensor [1]. Attends slots
    [0, min(pos + 1, sinks + window)). Returns [H, D] in q.dtype.
    Batched (``slots`` int64 [B]): q [B, H, D], caches [N, Hkv, C, D], pos [N]; row b uses entry slots[b].
    """
    if slots is not None:
        return torch.stack([swa_decode_ref(q[b], k_cache[e], v_cache[e], pos[e:e + 1], sinks, window, scale)
                            for b, e in enumerate(slots.tolist())])
    p = int(pos.reshape(-1)[0])
    n = min(p + 1, sinks + window)
    H = q.shape[0]
    G = H // k_cache.shape[0]
    kf = k_cache[:, :n].float().repeat_interleave(G, dim=0)  # [H, n, D]
    vf = v_cache[:, :n].float().repeat_interleave(G, dim=0)
    scores = torch.einsum("hd,hnd->hn", q.float(), kf) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hn,hnd->hd", probs, vf).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Gated delta rule (docs/semantics.md §5)
# ----------------------------------------------------------------------------------------------
def _gdn_inputs(q, k, v, beta, alpha, scale):
    """Upcast, expand kv heads to query heads, l2-normalize q/k and scale q."""
    H = q.shape[1]
    G = H // k.shape[1]
    qf = q.float()
    kf = k.float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    qf = qf / (qf.norm(dim=-1, keepdim=True) + L2_EPS)
    kf = kf / (kf.norm(dim=-1, keepdim=True) + L2_EPS)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return qf * scale, kf, vf, beta.float(), alpha.float()


def gdn_recurrent_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                      alpha: torch.Tensor, state: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Gated delta rule, one step at a time (fla's fused_recurrent semantics).

    q: [n, H, Dk] (read queries); k: [n, Hkv, Dk], v: [n, Hkv, Dv] (written tokens); beta: [n, H];
    alpha: [n, H] log-decay (<= 0, float32); state: [H, Dk, Dv] float32, updated in place.
    Step t: S <- exp(alpha_t) S; S <- S + k^ (beta_t (v_t - S^T k^))^T; o_t = S^T (scale q^).
    Returns o: [n, H, Dv] in q.dtype.
    """
    qf, kf, vf, bf, gf = _gdn_inputs(q, k, v, beta, alpha, scale)
    S = state.clone()
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device)
    for t in range(q.shape[0]):
        S = S * gf[t].exp()[:, None, None]
        u = bf[t][:, None] * (vf[t] - torch.einsum("hk,hkv->hv", kf[t], S))
        S = S + kf[t][:, :, None] * u[:, None, :]
        out[t] = torch.einsum("hk,hkv->hv", qf[t], S)
    state.copy_(S)
    return out.to(q.dtype)


def gdn_chunk_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                  alpha: torch.Tensor, state: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Gated delta rule in the chunked (WY) form: same function as ``gdn_recurrent_ref``.

    Within a block of C steps with cumulative log-decay G_i and block-start state S0:
      (I + A) U = diag(beta) (V - diag(e^G) K S0),   A_ij = beta_i e^(G_i - G_j) k_i.k_j  (j < i)
      O = diag(e^G) Q S0 + tril((Q K^T) * e^(G_i - G_j)) U
      S_C = e^(G_C) S0 + (K * e^(G_C - G))^T U
    The python loop runs over blocks, never over tokens.
    """
    qf, kf, vf, bf, gf = _gdn_inputs(q, k, v, beta, alpha, scale)
    n = q.shape[0]
    # Work head-major: [H, n, .]
    qf, kf, vf = (t.transpose(0, 1) for t in (qf, kf, vf))
    bf, gf = bf.transpose(0, 1), gf.transpose(0, 1)
    S = state.clone()
    out = torch.empty_like(vf[..., :1].expand(-1, -1, vf.shape[-1]).contiguous())
    for s in range(0, n, GDN_CHUNK):
        e = min(n, s + GDN_CHUNK)
        Q, K, V, B = qf[:, s:e], kf[:, s:e], vf[:, s:e], bf[:, s:e]
        Gc = gf[:, s:e].cumsum(-1)                                   # [H, c]
        diff = Gc[:, :, None] - Gc[:, None, :]                       # G_i - G_j
        c = e - s
        lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
        decay = torch.where(lower, diff, torch.full_like(diff, float("-inf"))).exp()
        A = B[:, :, None] * (K @ K.transpose(1, 2)) * decay
        eye = torch.eye(c, dtype=A.dtype, device=A.device).expand_as(A)
        rhs = B[:, :, None] * (V - Gc.exp()[:, :, None] * (K @ S))
        U = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        incl = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        decay_o = torch.where(incl, diff, torch.full_like(diff, float("-inf"))).exp()
        out[:, s:e] = (Gc.exp()[:, :, None] * Q) @ S + ((Q @ K.transpose(1, 2)) * decay_o) @ U
        last = Gc[:, -1:]
        S = last.exp()[:, :, None] * S + (K * (last - Gc).exp()[:, :, None]).transpose(1, 2) @ U
    state.copy_(S)
    return out.transpose(0, 1).to(q.dtype)


def gdn_chunk_scan_ref(w: torch.Tensor, u: torch.Tensor, kd_t: torch.Tensor, qg: torch.Tensor, gl: torch.Tensor,
                       state: torch.Tensor):
    """The chunk-to-chunk recurrence of the chunked gated delta rule, one chunk at a time.

    w, qg: [H, N, C, Dk]; u: [H, N, C, Dv]; kd_t: [H, N, Dk, C]; gl: [H, N]; state: [H, Dk, Dv] (all float32;
    state updated in place); w None for a rule without the delta correction (Mamba2: v_new = u). For chunk
    n with S its start state:
      v_new[n] = u[n] - w[n] S,   o_inter[n] = qg[n] S,   S <- gl[n] S + kd_t[n] v_new[n].
    Returns (v_new, o_inter), both [H, N, C, Dv].
    """
    S = state.clone()
    v_new = torch.empty_like(u)
    o_inter = torch.empty_like(u)
    for n in range(u.shape[1]):
        v_new[:, n] = u[:, n] if w is None else u[:, n] - w[:, n] @ S
        o_inter[:, n] = qg[:, n] @ S
        S = gl[:, n, None, None] * S + kd_t[:, n] @ v_new[:, n]
    state.copy_(S)
    return v_new, o_inter


def _blocks(t: torch.Tensor, C: int) -> torch.Tensor:
    """[n, H, ...] -> [H, N, C, ...] with N = ceil(n / C), the tail zero padded: a run of pairs as the
    chunk-prep references and kernels lay it out."""
    n, H = t.shape[0], t.shape[1]
    N = (n + C - 1) // C
    t = t.transpose(0, 1)
    if N * C > n:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, N * C - n))
    return t.reshape(H, N, C, *t.shape[2:])


def gdn_chunk_prep_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor,
                       scale: float):
    """The chunk-local part of the chunked gated delta rule, every chunk at once (the compiled twin:
    ``ahn_rt.gdn_chunk_prep``).

    q: [n, H, Dk], k: [n, Hkv, Dk], v: [n, Hkv, Dv], beta, alpha: [n, H] as ``gdn_recurrent_ref`` takes them.
    The n tokens are padded to N chunks of C = 64 with q = k = v = 0, beta = 0 and alpha = 0, which leave
    the state unchanged. Per chunk, with k^, q^ the normalized rows (q^ times scale), G the cumulative
    log-decay and e = exp:
      A_ij = beta_i e^(G_i - G_j) k^_i.k^_j (j < i);  (I + A) [w | u] = [diag(beta e^G) K^ | diag(beta) V]
      kd_t = (K^ e^(G_C - G))^T,  qg = e^G Q^,  gl = e^(G_C),  P = tril((Q^ K^T) e^(G_i - G_j))
    Returns float32 (w [H, N, C, Dk], u [H, N, C, Dv], kd_t [H, N, Dk, C], qg [H, N, C, Dk], gl [H, N],
    P [H, N, C, C]): ``gdn_chunk_scan``'s inputs and P.
    """
    qf, kf, vf, bf, gf = _gdn_inputs(q, k, v, beta, alpha, scale)
    C = GDN_CHUNK
    blocks = functools.partial(_blocks, C=C)
    Q, K, V = blocks(qf), blocks(kf), blocks(vf)
    B, G = blocks(bf), blocks(gf).cumsum(-1)                               # [H, N, C]
    diff = G[..., :, None] - G[..., None, :]                               # G_i - G_j
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    kk = K @ K.transpose(-1, -2)
    A = B[..., None] * kk * torch.where(strict, diff, float("-inf")).exp()
    rhs = torch.cat([(B * G.exp())[..., None] * K, B[..., None] * V], dim=-1)
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    wu = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    Dk = K.shape[-1]
    w, u = wu[..., :Dk].contiguous(), wu[..., Dk:].contiguous()
    return (w, u, *_decay_terms(Q, K, G))


def _decay_terms(Q: torch.Tensor, K: torch.Tensor, G: torch.Tensor):
    """The decay-weighted block terms both chunk-prep references share, from the block layout Q, K
    [H, N, C, Dk] and the cumulative log-decay G [H, N, C] (in its own precision; the terms in Q's dtype):
    kd_t = (K e^(G_C - G))^T, qg = e^G Q, gl = e^(G_C), P = tril(Q K^T) e^(G_i - G_j)."""
    C, f = G.shape[-1], Q.dtype
    incl = torch.ones(C, C, dtype=torch.bool, device=Q.device).tril()
    diff = G[..., :, None] - G[..., None, :]
    last = G[..., -1:]
    kd_t = (K * (last - G).exp().to(f)[..., None]).transpose(-1, -2)
    qg = G.exp().to(f)[..., None] * Q
    P = (Q @ K.transpose(-1, -2)) * torch.where(incl, diff, float("-inf")).exp().to(f)
    return kd_t.contiguous(), qg.contiguous(), last[..., 0].exp().to(f).contiguous(), P.contiguous()


def gdn_chunk_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor,
                     state: torch.Tensor, scale: float | None = None, prep=gdn_chunk_prep_ref,
                     scan=gdn_chunk_scan_ref) -> torch.Tensor:
    """``gdn_chunk_ref`` with every chunk-local step batched over all chunks at once (``prep``:
    ``gdn_chunk_prep_ref`` or the compiled ``ahn_rt.gdn_chunk_prep``) and only the chunk-to-chunk
    recurrence left sequential (``scan``: ``gdn_chunk_scan_ref`` or the compiled ``ahn_rt.gdn_chunk_scan``).
    Same signature and function as ``gdn_chunk_ref``: ``scan`` gives v_new and o_inter per chunk, and
    o = o_inter + P v_new (docs/semantics.md §5).
    """
    w, u, kd_t, qg, gl, P = prep(q, k, v, beta, alpha, q.shape[-1] ** -0.5 if scale is None else scale)
    return _chunk_outputs(P, *scan(w, u, kd_t, qg, gl, state), q.shape[0], q.dtype)


def _chunk_outputs(P, v_new, o_inter, n, dtype):
    """o = o_inter + P v_new per chunk ([H, N, C, Dv]), as [n, H, Dv] in ``dtype`` (the padding dropped)."""
    H, N, C = P.shape[0], P.shape[1], P.shape[2]
    o = torch.baddbmm(o_inter.view(H * N, C, -1), P.view(H * N, C, C), v_new.view(H * N, C, -1))
    return o.view(H, N * C, -1)[:, :n].transpose(0, 1).to(dtype)


def gdn_gate_norm_ref(o: torch.Tensor, z: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The GatedDeltaNet output norm: per-head RMSNorm * w * swish(z) in float32, rounded once to o.dtype.
    o: [n, H, Dv]; z: [n, H] (per-head gate scalar); norm_weight: [Dv]. Returns y [n, H, Dv]."""
    of = o.float()
    zf = z.float()[:, :, None]
    y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float() * zf * torch.sigmoid(zf)
    return y.to(o.dtype)


def gdn_output_ref(o: torch.Tensor, z: torch.Tensor, norm_weight: torch.Tensor, o_proj: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """AHN output head: ``gdn_gate_norm_ref``, then the grouped o_proj.

    o: [n, H, Dv]; z: [n, H]; norm_weight: [Dv]; o_proj: [H, Dv, Dv] stored (in, out). Returns m: [n, H, Dv]
    in o.dtype.
    """
    y = gdn_gate_norm_ref(o, z, norm_weight, eps)
    return torch.einsum("nhi,hio->nho", y, o_proj.to(o.dtype))


def gdn_decode_ref(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   beta: torch.Tensor, alpha: torch.Tensor, z: torch.Tensor, norm_weight: torch.Tensor,
                   o_proj: torch.Tensor, out: torch.Tensor, pos: torch.Tensor, sinks: int, window: int,
                   eps: float, slots: torch.Tensor | None = None) -> None:
    """One fused AHN memory step for a decoded token, added into the attention output.

    Runs only when pos >= sinks + window (a token left the window); otherwise does nothing.
    state: [H, Dk, Dv] float32 (in place); q: [H, Dk] read query; k: [Hkv, Dk], v: [Hkv, Dv], beta: [H],
    alpha: [H] (float32 log-decay) of the evicted token; z: [H] gate of the reading token; out: [H, Dv], += memory.
    Batched (``slots`` int64 [B]): q [B, H, Dk], z [B, H], out [B, H, Dv] by row; state [N, H, Dk, Dv],
    k [N, Hkv, Dk], v [N, Hkv, Dv], beta, alpha [N, H] and pos [N] by entry slots[b].
    """
    if slots is not None:
        for b, e in enumerate(slots.tolist()):
            gdn_decode_ref(state[e], q[b], k[e], v[e], beta[e], alpha[e], z[b], norm_weight, o_proj, out[b],
                           pos[e:e + 1], sinks, window, eps)
        return
    if int(pos.reshape(-1)[0]) < sinks + window:
        return
    o = gdn_recurrent_ref(q[None], k[None], v[None], beta[None], alpha[None], state)
    m = gdn_output_ref(o, z[None], norm_weight, o_proj, eps)[0]
    out.copy_((out + m).to(out.dtype))


# ----------------------------------------------------------------------------------------------
# Mamba2 memory (docs/semantics.md §11.2): a per-head scalar decay, an outer-product write, no delta
# correction. The decode step has compiled twins (``mamba2_decode``); prefill runs these on every device.
# ----------------------------------------------------------------------------------------------
# torch.nn.functional.normalize's default: x / max(||x||, eps), computed in the model dtype as the official
# module does on its bf16 q/k.
M2_L2_EPS = 1e-12
# Blocks of the chunked form (any size gives the same function; the official mamba scan uses 256).
M2_CHUNK = 64


def _mamba2_inputs(q, k, v, dt, a_log):
    """Expand kv heads to query heads, normalize q/k in their own dtype, upcast; the log-decay dt * A."""
    G = q.shape[1] // k.shape[1]
    qn = F.normalize(q, dim=-1, eps=M2_L2_EPS).float()
    kn = F.normalize(k, dim=-1, eps=M2_L2_EPS).float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    dtf = dt.float()
    return qn, kn, vf, dtf, dtf * -a_log.float().exp()


def mamba2_recurrent_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor,
                         a_log: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The Mamba2 memory, one step at a time.

    q: [n, H, Dk] (read queries); k: [n, Hkv, Dk], v: [n, Hkv, Dv], dt: [n, H] float32 (written tokens);
    a_log: [H]; state: [H, Dk, Dv] float32, updated in place. q and k are l2-normalized (eps 1e-12, in their
    dtype). Step t: M <- exp(dt_t A) M + dt_t k^_t v_t^T with A = -exp(a_log); o_t = M^T q^_t (no scale).
    Returns o: [n, H, Dv] in q.dtype.
    """
    qf, kf, vf, dtf, la = _mamba2_inputs(q, k, v, dt, a_log)
    S = state.clone()
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device)
    for t in range(q.shape[0]):
        S = S * la[t].exp()[:, None, None] + (dtf[t][:, None] * kf[t])[:, :, None] * vf[t][:, None, :]
        out[t] = torch.einsum("hk,hkv->hv", qf[t], S)
    state.copy_(S)
    return out.to(q.dtype)


def mamba2_chunk_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor,
                     a_log: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The Mamba2 memory in blocks of ``M2_CHUNK`` pairs: same function as ``mamba2_recurrent_ref``.

    Within a block with cumulative log-decay G_i = sum_{j<=i} dt_j A and block-start state M0:
      O = diag(e^G) Q M0 + (tril(Q K^T) * e^(G_i - G_j)) (dt V),   M_end = e^(G_c) M0 + (K e^(G_c - G))^T (dt V)
    G and its differences are formed in float64 (elementwise), so strong decays lose nothing. The python
    loop runs over blocks, never over tokens.
    """
    qf, kf, vf, dtf, la = _mamba2_inputs(q, k, v, dt, a_log)
    n = q.shape[0]
    qf, kf = qf.transpose(0, 1), kf.transpose(0, 1)                   # [H, n, Dk]
    vf = (vf * dtf[:, :, None]).transpose(0, 1)                       # dt v  [H, n, Dv]
    la = la.double().transpose(0, 1)                                  # [H, n]
    S = state.clone()
    out = torch.empty(q.shape[1], n, v.shape[-1], dtype=torch.float32, device=q.device)
    for s in range(0, n, M2_CHUNK):
        e = min(n, s + M2_CHUNK)
        Q, K, V = qf[:, s:e], kf[:, s:e], vf[:, s:e]
        Gc = la[:, s:e].cumsum(-1)                                    # [H, c]
        c = e - s
        incl = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        diff = Gc[:, :, None] - Gc[:, None, :]
        decay = torch.where(incl, diff, torch.full_like(diff, float("-inf"))).exp().float()
        out[:, s:e] = (Gc.exp().float()[:, :, None] * Q) @ S + ((Q @ K.transpose(1, 2)) * decay) @ V
        last = Gc[:, -1:]
        S = last.exp().float()[:, :, None] * S + (K * (last - Gc).exp().float()[:, :, None]).transpose(1, 2) @ V
    state.copy_(S)
    return out.transpose(0, 1).to(q.dtype)


def mamba2_chunk_prep_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor,
                          a_log: torch.Tensor):
    """``mamba2_chunk_ref``'s chunk-local work for every block at once (the compiled twin:
    ``ahn_rt.mamba2_chunk_prep``), in the layout of ``gdn_chunk_prep_ref`` without the delta correction.

    Inputs as ``mamba2_recurrent_ref``; the n pairs are padded to N blocks of C = 64 with zeros. Per block,
    with G the cumulative dt A in float64: u = diag(dt) V, qg = e^G Q^, kd_t = (K^ e^(G_C - G))^T,
    gl = e^(G_C), P = tril(Q^ K^T) e^(G_i - G_j). Returns float32 (u, kd_t, qg, gl, P) shaped as
    ``gdn_chunk_prep_ref``'s; ``gdn_chunk_scan`` with w = None carries the state across blocks.
    """
    qf, kf, vf, dtf, la = _mamba2_inputs(q, k, v, dt, a_log)
    C = M2_CHUNK
    blocks = functools.partial(_blocks, C=C)
    Q, K, U = blocks(qf), blocks(kf), blocks(vf * dtf[:, :, None])
    G = blocks(la.double()).cumsum(-1)                                 # [H, N, C] float64
    return (U.contiguous(), *_decay_terms(Q, K, G))


def mamba2_chunk_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, a_log: torch.Tensor,
                        state: torch.Tensor, prep=mamba2_chunk_prep_ref, scan=gdn_chunk_scan_ref) -> torch.Tensor:
    """``mamba2_chunk_ref`` with the chunk-local work batched over all blocks (``prep``) and only the
    block-to-block recurrence sequential (``scan`` without w). Same signature and function."""
    u, kd_t, qg, gl, P = prep(q, k, v, dt, a_log)
    return _chunk_outputs(P, *scan(None, u, kd_t, qg, gl, state), q.shape[0], q.dtype)


def mamba2_gate_norm_ref(o: torch.Tensor, z: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Mamba2's gate and norm: y = o * silu(z), RMSNorm over ALL H*Dv lanes, * w, in float32. o: [n, H, Dv]
    (model dtype); z: [n, H] (per-head gate scalar); norm_weight: [H*Dv]. Returns y [n, H, Dv] in o.dtype."""
    n, H, Dv = o.shape
    zf = z.float()[:, :, None]
    y = o.float() * (zf * torch.sigmoid(zf))
    y = y * torch.rsqrt(y.pow(2).mean(dim=(1, 2), keepdim=True) + eps) * norm_weight.float().view(H, Dv)
    return y.to(o.dtype)


def mamba2_output_ref(o: torch.Tensor, z: torch.Tensor, norm_weight: torch.Tensor, o_proj: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """Mamba2 output head: ``mamba2_gate_norm_ref``, then the grouped o_proj (o_proj: [H, Dv, Dv] stored
    (in, out)). Returns m: [n, H, Dv] in o.dtype.
    """
    return torch.einsum("nhi,hio->nho", mamba2_gate_norm_ref(o, z, norm_weight, eps), o_proj.to(o.dtype))


def mamba2_decode_ref(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor,
                      a_log: torch.Tensor, z: torch.Tensor, norm_weight: torch.Tensor, o_proj: torch.Tensor,
                      out: torch.Tensor, pos: torch.Tensor, sinks: int, window: int, eps: float,
                      slots: torch.Tensor | None = None) -> None:
    """One Mamba2 memory step for a decoded token, added into the attention output.

    Runs only when pos >= sinks + window; otherwise does nothing. state: [H, Dk, Dv] float32 (in place);
    q: [H, Dk] read query; k: [Hkv, Dk], v: [Hkv, Dv], dt: [H] (float32) of the evicted token; a_log: [H];
    z: [H] gate of the reading token; norm_weight: [H*Dv]; out: [H, Dv], += memory. Reads pos on the host.
    Batched (``slots`` int64 [B]): q [B, H, Dk], z [B, H], out [B, H, Dv] by row; state [N, H, Dk, Dv],
    k [N, Hkv, Dk], v [N, Hkv, Dv], dt [N, H] and pos [N] by entry slots[b].
    """
    if slots is not None:
        for b, e in enumerate(slots.tolist()):
            mamba2_decode_ref(state[e], q[b], k[e], v[e], dt[e], a_log, z[b], norm_weight, o_proj, out[b],
                              pos[e:e + 1], sinks, window, eps)
        return
    if int(pos.reshape(-1)[0]) < sinks + window:
        return
    o = mamba2_recurrent_ref(q[None], k[None], v[None], dt[None], a_log, state)
    m = mamba2_output_ref(o, z[None], norm_weight, o_proj, eps)[0]
    out.copy_((out + m).to(out.dtype))


# ----------------------------------------------------------------------------------------------
# Fused decode front: after the one projection GEMM of a decoded token
# ----------------------------------------------------------------------------------------------
def rope_cos_sin_ref(pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin [T, D] for int64 positions [T]: fp32 angle = pos * inv_freq, rounded to ``dtype``
    (as Hugging Face computes them, docs/semantics.md §1)."""
    angle = pos.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((angle, angle), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def decode_prep_ref(proj: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor,
                    q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, norm_eps: float,
                    a_log: torch.Tensor | None, dt_bias: torch.Tensor | None,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, beta_cache: torch.Tensor | None,
                    alpha_cache: torch.Tensor | None, sinks: int, window: int,
                    k_evict: torch.Tensor, v_evict: torch.Tensor, beta_evict: torch.Tensor | None,
                    alpha_evict: torch.Tensor | None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """Everything between a decoded token's projection GEMM and its attention, for one layer.

    proj: [P] = [q (H*D) | k (Hkv*D) | v (Hkv*D) | memory rows] with biases already added. H, Hkv, D come
    from the caches: k_cache [Hkv, C, D], alpha_cache [C, H]; without gates H = (P - 2*Hkv*D) / D.
    The gates, by the memory (docs/semantics.md §4, §11):
      - GatedDeltaNet / DeltaNet (a_log, dt_bias, beta_* and alpha_* given): rows [a (H) | b (H) | g (H)],
        beta = sigmoid(b) (proj.dtype), alpha = -exp(a_log) * softplus(a + dt_bias) (float32);
      - Mamba2 (dt_bias and alpha_* given, no a_log, no beta_*): rows [dt (H) | g (H)], the float32 gate
        dt = softplus(dt + dt_bias) kept in alpha_cache;
      - none (no memory): nothing is evicted.
    1. optional per-head RMSNorm of q and k (Qwen3 q_norm/k_norm, eps ``norm_eps``), before RoPE;
    2. RoPE at absolute position pos[0] (int64 tensor [1]) with fp32 angles, cos/sin in proj.dtype;
    3. the gates above;
    4. ring_write_ref of (k, v, beta, alpha) at pos, evicting the slot's old token first.
    Returns q after norm + RoPE: [H, D] in proj.dtype. (The output gate z is proj's last H values.)
    Batched (``slots`` int64 [B]): proj [B, P] and q [B, H, D] by row; pos [N], the caches [N, Hkv, C, D],
    the gate caches [N, C, H] and the eviction buffers [N, ...] by entry slots[b].
    """
    if slots is not None:
        return torch.stack([
            decode_prep_ref(proj[b], inv_freq, pos[e:e + 1], q_norm, k_norm, norm_eps, a_log, dt_bias, k_cache[e],
                            v_cache[e], _entry(beta_cache, e), _entry(alpha_cache, e), sinks, window, k_evict[e],
                            v_evict[e], _entry(beta_evict, e), _entry(alpha_evict, e))
            for b, e in enumerate(slots.tolist())])
    Hkv, _, D = k_cache.shape
    gated = dt_bias is not None
    H = alpha_cache.shape[1] if gated else (proj.shape[0] - 2 * Hkv * D) // D
    q = proj[: H * D].view(H, D)
    k = proj[H * D: (H + Hkv) * D].view(Hkv, D)
    v = proj[(H + Hkv) * D: (H + 2 * Hkv) * D].view(Hkv, D)
    if q_norm is not None:
        q = rms_norm_ref(q, q_norm, norm_eps)
        k = rms_norm_ref(k, k_norm, norm_eps)
    cos, sin = rope_cos_sin_ref(pos.reshape(1), inv_freq, proj.dtype)
    q = rope_ref(q[None], cos, sin)[0]
    k = rope_ref(k[None], cos, sin)[0]
    beta = alpha = None
    if gated:
        a = proj[(H + 2 * Hkv) * D: (H + 2 * Hkv) * D + H]
        alpha = F.softplus(a.float() + dt_bias.float())
        if a_log is not None:
            b = proj[(H + 2 * Hkv) * D + H: (H + 2 * Hkv) * D + 2 * H]
            beta = torch.sigmoid(b.float()).to(proj.dtype)
            alpha = -a_log.float().exp() * alpha
    ring_write_ref(k_cache, v_cache, beta_cache, alpha_cache, k, v, beta, alpha, pos, sinks, window,
                   k_evict, v_evict, beta_evict, alpha_evict)
    return q


# ----------------------------------------------------------------------------------------------
# Decode GEMV with its neighbours fused (RMSNorm before, bias / SiLU*mul / residual after)
# ----------------------------------------------------------------------------------------------
# Rows per fp32 block, so that the LM head (151936 x 2048) never needs a full float32 copy of itself.
_ROWS_PER_BLOCK = 16384


# c10's names of the dtypes, as the compiled ops print them in their messages
_C10_DTYPE = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
              torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
              torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}


def _check_gemv(x, weight, bias, norm_weight, residual, silu_mul, x_add):
    """The compiled gemv's argument checks (csrc/host/gemv.cpp and the check_vec helpers of host.h), in its
    order and words (prefix gemv_ref), so that the reference refuses the calls the op refuses. Only the op's
    dtype dispatch (float32 / bfloat16 / float16) and its device list (CPU, CUDA) are not repeated: the
    reference is the backend for the others (ops.py: float64, other devices)."""
    op = "gemv_ref"
    name = (lambda dtype: _C10_DTYPE.get(dtype, str(dtype)))
    if x.dim() not in (1, 2):
        raise RuntimeError(f"{op}: x must be [K] or [B, K] (B sequences), got {list(x.shape)}")
    if weight.dim() != 2:
        raise RuntimeError(f"{op}: weight must be [N, K], got {list(weight.shape)}")
    N, K = weight.shape
    batched = x.dim() == 2
    if x.shape[-1] != K:
        raise RuntimeError(f"{op}: x has {x.shape[-1]} values per row but weight is [{N}, {K}]")
    if weight.device != x.device:
        raise RuntimeError(f"{op}: weight is on {weight.device} but x is on {x.device}")
    if weight.dtype != x.dtype:
        raise RuntimeError(f"{op}: weight dtype {name(weight.dtype)} must equal x dtype {name(x.dtype)}")
    if not weight.is_contiguous():
        raise RuntimeError(f"{op}: weight must be row-major contiguous, got strides {list(weight.stride())}")
    if silu_mul and N % 2:
        raise RuntimeError(f"{op}: silu_mul needs an even N ([gate; up] rows), got N={N}")
    N_out = N // 2 if silu_mul else N
    for what, t, n in (("bias", bias, N), ("norm_weight", norm_weight, K)):
        if t is None:
            continue
        if t.device != x.device:
            raise RuntimeError(f"{op}: {what} is on {t.device} but the op runs on {x.device}")
        if t.dim() != 1 or t.shape[0] != n:
            raise RuntimeError(f"{op}: {what} must be [{n}], got {list(t.shape)}")
        if t.dtype != x.dtype:
            raise RuntimeError(f"{op}: {what} dtype {name(t.dtype)} must equal x dtype {name(x.dtype)}")
    if residual is not None:
        r = residual
        if r.dim() != x.dim() or r.shape[-1] != N_out or (batched and r.shape[0] != x.shape[0]):
            raise RuntimeError(f"{op}: residual must be shaped like the output {'[B, ' if batched else '['}{N_out}], "
                               f"got {list(r.shape)}")
        if r.device != x.device or r.dtype != x.dtype:
            raise RuntimeError(f"{op}: residual must be on x's device with x's dtype")
    if x_add is not None:
        if x_add.shape != x.shape:
            raise RuntimeError(f"{op}: x_add must have x's shape {list(x.shape)}, got {list(x_add.shape)}")
        if x_add.dtype != x.dtype:
            raise RuntimeError(f"{op}: x_add dtype {name(x_add.dtype)} must equal x dtype {name(x.dtype)}")
        if x_add.device != x.device:
            raise RuntimeError(f"{op}: x_add is on {x_add.device} but x is on {x.device}")
        if x_add.stride() != x.stride():
            raise RuntimeError(f"{op}: x_add must have x's strides {list(x.stride())}, got {list(x_add.stride())}")
        if norm_weight is not None:
            raise RuntimeError(f"{op}: x_add with norm_weight is not supported (the kernels' RMSNorm path reads x "
                               "without x_add)")
        if silu_mul:
            raise RuntimeError(f"{op}: x_add with silu_mul is not supported")


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm_weight: torch.Tensor | None,
             norm_eps: float, residual: torch.Tensor | None, silu_mul: bool, out_float: bool,
             static_weight: bool = False, x_add: torch.Tensor | None = None) -> torch.Tensor:
    """One decode token through a linear layer with its neighbours fused.

    x: [K]; weight: [N, K]; bias: [N] or None; norm_weight: [K] or None (RMSNorm x first, exactly as
    ``rms_norm_ref``); residual: [N_out] or None. y = weight @ xn in float32 (+ bias). With ``silu_mul``
    rows [0, N/2) are the gate and [N/2, N) the up projection and y = silu(gate) * up ([N/2]).
    out = residual + y, all in float32 and rounded once: float32 if ``out_float`` else x.dtype.

    x may also be [B, K] (B tokens of B sequences, residual [B, N_out]): each row as above, out [B, N_out].
    ``static_weight`` changes only how the CUDA kernel is launched, never the values.
    ``x_add`` (x's shape, dtype, device and strides; not with ``norm_weight`` or ``silu_mul``): x is first
    replaced by (x + x_add) computed in float32 and rounded to x.dtype. An x_add the op refuses is refused
    here too, with the op's message (RuntimeError), not broadcast or normalized.

    Every argument the op refuses (a shape, dtype, device or layout it does not take) is refused here in its
    words, RuntimeError "gemv_ref: ...", never broadcast; only the op's dtype and device lists are not
    enforced (the reference computes float64, and on any device).

    >>> w = torch.eye(4)[:3]
    >>> gemv_ref(torch.arange(4.), w, None, None, 0.0, None, False, False)
    tensor([0., 1., 2.])
    """
    _check_gemv(x, weight, bias, norm_weight, residual, silu_mul, x_add)
    if x_add is not None:
        x = (x.float() + x_add.float()).to(x.dtype)
    if x.dim() == 2:
        return torch.stack([_gemv_row(x[b], weight, bias, norm_weight, norm_eps,
                                      None if residual is None else residual[b], silu_mul, out_float)
                            for b in range(x.shape[0])]) if x.shape[0] else \
            x.new_zeros(0, weight.shape[0] // (2 if silu_mul else 1),
                        dtype=torch.float32 if out_float else x.dtype)
    return _gemv_row(x, weight, bias, norm_weight, norm_eps, residual, silu_mul, out_float)


def _gemv_row(x, weight, bias, norm_weight, norm_eps, residual, silu_mul, out_float):
    """gemv_ref of one checked row x [K]."""
    xn = rms_norm_ref(x, norm_weight, norm_eps) if norm_weight is not None else x
    xf = xn.float()
    y = torch.cat([w.float() @ xf for w in weight.split(_ROWS_PER_BLOCK)]) if weight.shape[0] else \
        weight.new_zeros(0, dtype=torch.float32)
    if bias is not None:
        y = y + bias.float()
    if silu_mul:
        gate, up = y.chunk(2)
        y = F.silu(gate) * up
    if residual is not None:
        y = residual.float() + y
    return y if out_float else y.to(x.dtype)
