"""The one place that chooses a backend for every hot op.

Model code calls only the functions here. Each dispatches to the compiled op ``torch.ops.ahn_rt.<name>``
(C++ on the CPU, CUDA kernels on the GPU; built from csrc/ into ``ahn_rt._C``) when the extension is
built and has an implementation for the tensors' device, else to the pure-torch reference
``ahn_rt.ref.<name>_ref`` of the same signature.

``AHN_RT_BACKEND=ref`` forces the references (the benchmark's "reference ops" row uses
``use_backend("ref")``); ``AHN_RT_BACKEND=ext`` makes a missing extension an error instead of a
fallback. With the default ``auto``, a missing extension is said once per process, in one line, when a
model is loaded (``note_backend``), and in the stats line.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading

import torch

from . import cache, ref, settings
from .errors import AhnError

_ext_error: str | None = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.ahn_rt.*)
    from . import _meta  # noqa: F401  (fake implementations for torch.compile / opcheck)
except ImportError as e:  # pragma: no cover - depends on the build
    _ext_error = str(e)

_backend = settings.backend()   # a bad value: settings.SettingsError, an AhnError (one line in every CLI)

BUILD_COMMAND = "pip install --no-build-isolation -e ."
_noted = False


def ext_available() -> bool:
    return _ext_error is None


def backend() -> str:
    """'ext' when compiled ops are used where they exist, 'ref' when only references are."""
    return "ref" if _backend == "ref" or not ext_available() else "ext"


def backend_note() -> str:
    """Why the references run, in a few words (for the stats line)."""
    if _backend == "ref":
        return "pure-torch reference ops (AHN_RT_BACKEND=ref)"
    return f"pure-torch reference ops, slow: the compiled extension is not built; run `{BUILD_COMMAND}`"


def note_backend():
    """At load: once per process, one line on stderr when the compiled ops are missing (auto mode)."""
    global _noted
    if _noted or _backend != "auto" or ext_available():
        return
    _noted = True
    print(f"ahn_rt: the compiled extension ahn_rt._C is not built, so the slow pure-torch reference ops "
          f"run; build it with `{BUILD_COMMAND}`", file=sys.stderr)


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily force 'ref' (or 'auto'/'ext') for the ops called inside the block. Process-wide, not per
    thread: for benchmarks and tests that run nothing else meanwhile (a model serving other threads would run
    their ops, and capture their graphs, on the backend set here); a service sets AHN_RT_BACKEND instead."""
    global _backend
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def _use_ext(t: torch.Tensor) -> bool:
    if _backend == "ref":
        return False
    if not ext_available():
        if _backend == "ext":
            raise AhnError(f"the compiled extension ahn_rt._C is missing ({_ext_error}); "
                           "build it with: pip install --no-build-isolation -e .")
        return False
    return t.device.type in ("cpu", "cuda")


# ---- ops with a compiled implementation ------------------------------------------------------
def rms_norm(x, weight, eps):
    if _use_ext(x):
        shape = x.shape
        return torch.ops.ahn_rt.rms_norm(x.reshape(-1, shape[-1]), weight, eps).view(shape)
    return ref.rms_norm_ref(x, weight, eps)


def decode_prep(proj, inv_freq, pos, q_norm, k_norm, norm_eps, a_log, dt_bias, k_cache, v_cache,
                beta_cache, alpha_cache, sinks, window, k_evict, v_evict, beta_evict, alpha_evict, slots=None):
    fn = torch.ops.ahn_rt.decode_prep if _use_ext(proj) else ref.decode_prep_ref
    return fn(proj, inv_freq, pos, q_norm, k_norm, norm_eps, a_log, dt_bias, k_cache, v_cache,
              beta_cache, alpha_cache, sinks, window, k_evict, v_evict, beta_evict, alpha_evict, slots)


def swa_decode(q, k_cache, v_cache, pos, sinks, window, scale, slots=None):
    fn = torch.ops.ahn_rt.swa_decode if _use_ext(q) else ref.swa_decode_ref
    return fn(q, k_cache, v_cache, pos, sinks, window, scale, slots)


def gdn_decode(state, q, k, v, beta, alpha, z, norm_weight, o_proj, out, pos, sinks, window, eps, slots=None):
    fn = torch.ops.ahn_rt.gdn_decode if _use_ext(q) else ref.gdn_decode_ref
    fn(state, q, k, v, beta, alpha, z, norm_weight, o_proj, out, pos, sinks, window, eps, slots)


def gemv(x, weight, bias, norm_weight, norm_eps, residual, silu_mul, out_float, static_weight=False, x_add=None):
    """The fused decode GEMV: x [K] (one token) or [B, K] (one token of each of B sequences; residual
    shaped like the output) -> [N_out] / [B, N_out]. Each weight row is read once for all B, and row b
    equals the call on x[b] alone bit for bit (its reduction order never depends on B or the other rows).
    ``static_weight``: no kernel still running writes the weights (the model's own weights in the decode
    step), so on CUDA the GEMV may start streaming them before the previous kernel ends (programmatic
    dependent launch); the values are the same either way. ``x_add`` (shaped, typed and strided like x; not
    with norm_weight or silu_mul): the GEMV multiplies x + x_add, rounded to x's dtype, as if the caller had
    added it into x first (bit for bit); it lets two producers of x write separate buffers."""
    fn = torch.ops.ahn_rt.gemv if _use_ext(x) else ref.gemv_ref
    return fn(x, weight, bias, norm_weight, norm_eps, residual, silu_mul, out_float, static_weight, x_add)


# ---- prefill path: torch implementations -------------------------------------------------------
@functools.cache
def _cpu_bf16_gemm() -> bool:
    """Whether this CPU has a fast bf16 GEMM (oneDNN's: AVX-512 or AMX on x86, BF16 on Arm). Without one,
    torch's bf16 GEMM is scalar code: 6-9x slower than float32 on an AVX2 machine (bench/README.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_UPCAST_ROWS = 32   # below this many rows a half-precision GEMM beats converting the weights to float32


def _gemm_in_float32(x) -> bool:
    """A CPU GEMM of half-precision rows that runs faster in float32: float16 (torch has no fast float16
    GEMM on the CPU) and bf16 where the CPU has no fast bf16 GEMM, given enough rows to pay for converting
    the weights (one row, a prompt's last-position LM head: 16x faster without the conversion)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return (x.dtype == torch.float16 or not _cpu_bf16_gemm()) and x.numel() >= _UPCAST_ROWS * x.shape[-1]


def linear(x, weight, bias=None):
    """x @ weight^T (+ bias). On the CPU a half-precision GEMM may run in float32 (``_gemm_in_float32``),
    a block of weight rows at a time (no float32 copy of a whole LM head), rounded once: the same values
    up to summation order."""
    if _gemm_in_float32(x):
        y = _linear_float32(x, weight)
        return (y if bias is None else y + bias.float()).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def _linear_float32(x, weight):
    """x @ weight^T in float32, a block of weight rows at a time (``linear``'s CPU path)."""
    xf = x.float()
    ys = [torch.nn.functional.linear(xf, w.float()) for w in weight.split(16384)]
    return torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]


def linear_add_(h, x, weight, bias=None):
    """h += x @ weight^T (+ bias), in place; returns h. Without a bias the GEMM adds h itself: on CUDA in
    cuBLAS's epilogue (no [rows, out] product written and read back; cuBLAS rounds as it does, the product
    possibly first), on the CPU before one rounding of the sum, as the decode GEMV adds its residual. With a
    bias, the biased product is rounded, then added."""
    if bias is not None:
        return h.add_(linear(x, weight, bias))
    if _gemm_in_float32(x):
        return h.copy_(_linear_float32(x, weight).add_(h))
    return h.addmm_(x, weight.t())


_MERGE_PARTS = 16   # the most parts the attn_merge kernel takes in one call (csrc/common.h kMergeMaxParts)


def attn_merge(outs, lses, offsets, rows):
    fn = torch.ops.ahn_rt.attn_merge if _use_ext(outs[0]) and len(outs) <= _MERGE_PARTS else ref.attn_merge_ref
    return fn(outs, lses, offsets, rows)


def band_attention(q, k, v, left, scale, kv_len=None, q_len=None):
    """Attention with the diagonal at the bottom-right corner and ``left`` keys per query (0: no left bound):
    ref.band_attention_ref's semantics (``kv_len``, int32 [1] on q's device: only that many leading rows of
    k, v are keys; ``q_len`` likewise for the queries, the rows past it not written on CUDA; on CUDA the caller
    keeps q_len <= kv_len <= k's rows, unchecked there, and the rows past kv_len finite: cuDNN's last tile reads
    them and masks their scores, and 0 x NaN is NaN). Returns (out [Tq, H, D],
    logsumexp [H, Tq] float32). On CUDA through cuDNN (where the build found cudnn-frontend), on the CPU the C++
    kernel."""
    fn = torch.ops.ahn_rt.band_attention if _use_ext(q) else ref.band_attention_ref
    return fn(q, k, v, left, scale, kv_len, q_len)


def silu_mul(x):
    fn = torch.ops.ahn_rt.silu_mul if _use_ext(x) else ref.silu_mul_ref
    return fn(x)


def gdn_chunk_scan(w, u, kd_t, qg, gl, state):
    """The chunk-to-chunk recurrence (w None: no delta correction, Mamba2)."""
    cuda_ok = not qg.is_cuda or (qg.shape[2] == ref.GDN_CHUNK and qg.shape[3] % 4 == 0 and qg.shape[3] <= 128)
    fn = torch.ops.ahn_rt.gdn_chunk_scan if _use_ext(qg) and cuda_ok else ref.gdn_chunk_scan_ref
    return fn(w, u, kd_t, qg, gl, state)


def _prep_ok(q, k, v) -> bool:
    """Inputs the chunk-prep kernels take (else the reference runs): float32/bf16/fp16 rows with a contiguous
    last dim; on CUDA Dk a multiple of 4 and at most 256 (its tiles live in shared memory)."""
    return (q.dtype in (torch.float32, torch.bfloat16, torch.float16) and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and (not q.is_cuda or (q.shape[-1] % 4 == 0 and q.shape[-1] <= 256)))


def gdn_chunk_prep(q, k, v, beta, alpha, scale):
    """The chunk-local work of every chunk in one kernel (CPU and CUDA); float64 inputs take the reference."""
    ok = _prep_ok(q, k, v)
    fn = torch.ops.ahn_rt.gdn_chunk_prep if _use_ext(q) and ok else ref.gdn_chunk_prep_ref
    return fn(q, k, v, beta, alpha, scale)


# Tokens per call of a chunked memory prefill (a multiple of ref.GDN_CHUNK). Its float32 chunk terms take
# about 60 bytes per token and head dim (w, u, kd^T, qg, v_new, o_inter, P): for the 8192 evicted tokens of an
# 8192-token chunk at the 3B shape about 0.5 GB at once, which would be the largest transient of the prefill.
_MEMORY_BLOCK = 2048


def _token_blocks(run, q, k, v, *seqs):
    """``run(q, k, v, *seqs)`` for tensors whose first dim is the token, over blocks of ``_MEMORY_BLOCK``
    tokens, the outputs written into one tensor. The blocks end on chunk boundaries and ``run`` carries its
    state in place from one to the next, so the chunks and the order of every sum are those of one call:
    the same bits on the CPU kernels; on CUDA the product P v_new of ref._chunk_outputs is one batched GEMM
    per call whose kernel may change with the batch count (float32 rounding). Only where the compiled prep
    runs (the reference's batched triangular solve depends on how many chunks it is given)."""
    seqs = (q, k, v, *seqs)
    n = q.shape[0]
    if n <= _MEMORY_BLOCK or not (_use_ext(q) and _prep_ok(q, k, v)):
        return run(*seqs)
    out = None
    for lo in range(0, n, _MEMORY_BLOCK):
        o = run(*(t[lo:lo + _MEMORY_BLOCK] for t in seqs))
        if out is None:
            out = o.new_empty((n, *o.shape[1:]))
        out[lo:lo + o.shape[0]] = o
    return out


def gdn_chunk(q, k, v, beta, alpha, state, scale=None):
    """The gated delta rule over a run of tokens (a prefill): the chunk-local work of all chunks in
    ``gdn_chunk_prep``, the chunk-to-chunk recurrence in ``gdn_chunk_scan`` (ref.gdn_chunk_blocks), in
    blocks of ``_MEMORY_BLOCK`` tokens."""
    if _backend == "ref":
        return ref.gdn_chunk_ref(q, k, v, beta, alpha, state, scale)
    return _token_blocks(lambda *t: ref.gdn_chunk_blocks(*t, state, scale, prep=gdn_chunk_prep, scan=gdn_chunk_scan),
                         q, k, v, beta, alpha)


def prefill_attention(q, k, v, k_cache, v_cache, p0, sinks, window, scale, cached=False):
    """A chunk's attention over the ring cache (read in place) and its own keys; ref.prefill_attention_ref
    is the reference. On CUDA in fp16/bf16 through torch's bundled FlashAttention-2 forward, one call per
    key range with that range's window bounds, merged by log-sum-exp (the unmasked blocks of whole chunks
    through cuDNN where enabled and warmed: ``_kernel_calls``; whole chunks past the fill point as one cuDNN
    band call: ``_prefill_attention_band``). ``cached``: the chunk's keys are already in slots [p0, p0 + T)
    of the cache, written in order (``ChunkPlan.in_order``); the result is the same, and on CUDA such a
    chunk may run as one cuDNN call over the cache (``_prefill_attention_fill``)."""
    if q.is_cuda and _backend != "ref":
        if _flash_ok(q.dtype, q.shape[-1]):
            return _prefill_attention_flash(q, k, v, k_cache, v_cache, p0, sinks, window, scale, cached)
        return _prefill_attention_sdpa(q, k, v, k_cache, v_cache, p0, sinks, window, scale)
    if q.device.type == "cpu" and _backend != "ref":
        return _prefill_attention_blocks(q, k, v, k_cache, v_cache, p0, sinks, window, scale)
    return ref.prefill_attention_ref(q, k, v, k_cache, v_cache, p0, sinks, window, scale)


_BLOCK_QUERIES = 128   # the CPU path's query block (bounded further by _BLOCK_SCORES): 128 measured best of 32-256
_BLOCK_SCORES = 1 << 24   # at most this many float32 scores at once


def _prefill_attention_blocks(q, k, v, k_cache, v_cache, p0, sinks, window, scale):
    """The CPU path: the reference's keys (``ref.chunk_keys``), attended a block of queries at a time over
    only the keys the rule can let through to that block (the sinks and the block's window span), in
    float32; the query heads of a kv head share its keys (no copies per head). The reference scores every
    query against every key."""
    k_all, v_all, q_pos, k_pos = ref.chunk_keys(k, v, k_cache, v_cache, p0, sinks, window)
    T, H, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    kf, vf = k_all.float().transpose(0, 1), v_all.float().transpose(0, 1)       # [Hkv, n, D]
    reach = min(k_pos.numel(), sinks + window + _BLOCK_QUERIES)                 # keys a block may see
    block = max(1, min(_BLOCK_QUERIES, _BLOCK_SCORES // (H * reach)))
    out = torch.empty(T, H, Dv, dtype=q.dtype, device=q.device)
    for a in range(0, T, block):
        b = min(T, a + block)
        near = ((k_pos < sinks) | (k_pos > p0 + a - window)) & (k_pos < p0 + b)
        idx = near.nonzero().squeeze(1)
        kp, qp = k_pos[idx][None, :], q_pos[a:b, None]
        allowed = (kp <= qp) & ((qp - kp < window) | (kp < sinks))              # [b - a, m]
        qb = q[a:b].float().view(b - a, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * (b - a), D)
        scores = torch.bmm(qb, kf[:, idx].transpose(1, 2)) * scale              # [Hkv, G * (b - a), m]
        scores = scores.view(Hkv, G, b - a, -1).masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(Hkv, G * (b - a), -1)
        o = torch.bmm(probs, vf[:, idx])                                        # [Hkv, G * (b - a), Dv]
        out[a:b] = o.view(Hkv, G, b - a, Dv).permute(2, 0, 1, 3).reshape(b - a, H, Dv)
    return out


def _flash_ok(dtype, head_dim: int) -> bool:
    """What the FlashAttention-2 (and cuDNN) prefill path takes: fp16/bf16, D a multiple of 8, at most 256."""
    return dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def _flash(q, k, v, left: int, right: int, scale: float):
    """One FlashAttention-2 forward: q [Tq, H, D], k/v [n, Hkv, D] (any row and head strides). Query i
    sees key j iff i + (n - Tq) - left <= j <= i + (n - Tq) + right (-1: unbounded on that side).
    Returns (out [Tq, H, D], logsumexp [H, Tq] float32)."""
    out = torch.ops.aten._flash_attention_forward(
        q[None], k[None], v[None], None, None, q.shape[0], k.shape[0], 0.0, False, False,
        scale=scale, window_size_left=left, window_size_right=right)
    return out[0][0], out[1][0]


_DENSE_KEYS = 256   # a window call over at most this many keys with more queries than keys runs dense
_DENSE_ROWS = 1024  # queries per block of ``_dense``: its float32 scores stay [H, 1024, n] (16 MiB at H = 16,
                    # n = 256) however many queries come; one block of a whole 8192-token chunk held three
                    # [H, 8192, 256] float32 tensors, 0.375 GiB and the largest transient of a 128k prefill


def _dense(q, k, v, left: int, right: int, scale: float):
    """``_flash``'s function in plain torch (float32 scores [H, rows, n] per block of ``_DENSE_ROWS``
    queries): for short key ranges."""
    Tq, H, D = q.shape
    n, Hkv = k.shape[0], k.shape[1]
    kf = k.float().repeat_interleave(H // Hkv, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(H // Hkv, dim=1).transpose(0, 1)
    out = torch.empty(Tq, H, v.shape[2], dtype=q.dtype, device=q.device)
    lse = torch.empty(H, Tq, dtype=torch.float32, device=q.device)
    j = torch.arange(n, device=q.device)[None, :]
    for a in range(0, Tq, _DENSE_ROWS):
        b = min(Tq, a + _DENSE_ROWS)
        i = torch.arange(a, b, device=q.device)[:, None]
        ok = torch.ones(b - a, n, dtype=torch.bool, device=q.device)
        if left >= 0:
            ok &= j >= i + (n - Tq) - left
        if right >= 0:
            ok &= j <= i + (n - Tq) + right
        s = torch.einsum("thd,hnd->htn", q[a:b].float(), kf).mul_(scale)
        s.masked_fill_(~ok[None], float("-inf"))
        lse[:, a:b] = torch.logsumexp(s, dim=-1)                       # [H, rows]
        out[a:b] = torch.einsum("htn,hnd->thd", s.sub_(lse[:, a:b, None]).exp_(), vf)
    return out, lse


_cudnn_ok = True   # cleared (once per process) if torch's cuDNN attention refuses these calls
_cudnn_gqa = True  # cleared (once per process) if it refuses fewer key / value heads than query heads


def _cudnn_reversed(q, k, v, scale: float):
    """An upper triangle, query i seeing keys i .. n - 1 (n == Tq), as cuDNN's causal call with the rows of
    q, k and v reversed (query Tq - 1 - i then sees keys up to Tq - 1 - i); the output and log-sum-exp are
    reversed back. Returns (out [Tq, H, D], logsumexp [H, Tq] float32) as ``_cudnn``."""
    out, lse = _cudnn(q.flip(0).contiguous(), k.flip(0), v.flip(0), True, scale)
    return out.flip(0), lse.flip(-1)


def _cudnn(q, k, v, causal: bool, scale: float, stacked: dict | None = None):
    """cuDNN's fused attention (bundled with torch): q [Tq, H, D], k/v [n, Hkv, D]. Without a mask the
    G = H / Hkv query heads of a kv head are stacked along the query axis (one kv head, G*Tq queries: no
    copy of the keys); causal calls (a chunk's own keys, n == Tq) give cuDNN the Hkv heads as they are (or,
    where it refuses fewer key heads than query heads, repeated per query head). All but the cache's keys
    go in contiguous, so that the plan (cached by torch per shape and strides) is the one
    ``warm_prefill_attention`` built. ``stacked`` (a dict kept by the caller for one chunk) holds
    the stacked queries of each query range, so that the key blocks of one range copy them once.
    Returns (out [Tq, H, D], logsumexp [H, Tq] float32)."""
    global _cudnn_gqa
    Tq, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    if causal:
        qq = q.contiguous().transpose(0, 1)[None]
        if _cudnn_gqa:
            # cuDNN takes the Hkv key / value heads as they are (query head h reads head h // G: the same
            # bits as the keys repeated per query head, measured on an H100, without writing G copies)
            try:
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    qq, k.contiguous().transpose(0, 1)[None], v.contiguous().transpose(0, 1)[None], None, True,
                    0.0, True, False, scale=scale)
                return res[0][0].transpose(0, 1), res[1].reshape(H, Tq)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                if G == 1:
                    raise
                _cudnn_gqa = False   # an older cuDNN: the keys repeated, as below
        kk = k.repeat_interleave(G, dim=1).contiguous().transpose(0, 1)[None]
        vv = v.repeat_interleave(G, dim=1).contiguous().transpose(0, 1)[None]
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qq, kk, vv, None, True, 0.0, True, False, scale=scale)
        return res[0][0].transpose(0, 1), res[1].reshape(H, Tq)
    key = (q.data_ptr(), Tq)
    qq = stacked.get(key) if stacked is not None else None
    if qq is None:
        qq = q.view(Tq, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, G * Tq, D).contiguous()
        if stacked is not None:
            stacked[key] = qq
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        qq, k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, True, 0.0, False, False, scale=scale)
    out = res[0].reshape(Hkv, G, Tq, D).permute(2, 0, 1, 3).reshape(Tq, H, D)
    return out, res[1].reshape(H, Tq)


@functools.lru_cache(maxsize=256)   # every layer of a chunk asks for the same plan
def _attention_calls(p0: int, T: int, sinks: int, window: int) -> tuple:
    """The kernel calls of a chunk's attention: (i_lo, i_hi, source, lo, n, kind, left, right) with the
    queries [i_lo, i_hi] of the chunk, keys rows [lo, lo + n) of ``source`` ("cache" or "chunk"), and kind
    "full" (every query sees every key), "causal" (a square block of the chunk's own keys) or "window"
    (FlashAttention-2 with bounds left/right, each below n: FlashAttention-2 reads a bound of n or more as
    no bound). Each range of ``cache.key_ranges`` is cut so that the part
    every query sees in full goes to the fastest kernel and only the band at the window's edge is masked."""
    W = window
    calls = []

    def add(r_source, lo, a, n, sink):
        i_lo = max(0, a - p0)
        i_hi = T - 1 if sink else min(T - 1, a + n + W - 2 - p0)
        if i_lo > i_hi:
            return
        tq = i_hi - i_lo + 1
        d = p0 + i_lo - a         # query i_lo + i sees key j iff j <= i + d and (sink or j >= i + d - W + 1)
        if r_source == "cache" and (sink or tq + d - W <= 0):
            calls.append((i_lo, i_hi, r_source, lo, n, "full", -1, -1))
        elif r_source == "cache":
            jf = min(n, tq + d - W)      # keys [jf, n) are seen by every query; [0, jf) is the edge band
            if jf < n:
                calls.append((i_lo, i_hi, r_source, lo + jf, n - jf, "full", -1, -1))
            # the band: its own query span and bounds
            b_hi = min(T - 1, a + jf + W - 2 - p0)
            if b_hi >= i_lo:
                btq = b_hi - i_lo + 1
                calls.append((i_lo, b_hi, r_source, lo, jf, "window", jf - btq - (d - W + 1), d - jf + btq))
        elif sink:                 # the chunk's sink rows (d == 0): causal on their own rows, then full
            calls.append((i_lo, i_lo + n - 1, r_source, lo, n, "causal", -1, 0))
            if i_lo + n <= i_hi:
                calls.append((i_lo + n, i_hi, r_source, lo, n, "full", -1, -1))
        elif d == 0 and n == tq and n <= W:
            calls.append((i_lo, i_hi, r_source, lo, n, "causal", -1, 0))
        else:                      # the chunk's own keys when the chunk is longer than the window
            calls.append((i_lo, i_hi, r_source, lo, n, "window", n - tq - (d - W + 1), d - n + tq))

    for r in cache.key_ranges(p0, T, sinks, window):
        add(r.source, r.lo, r.pos, r.n, r.sink)
    # Full blocks of the cache next to each other in memory (the sinks and the newest ring slots) for the
    # same queries are one call: which key is where does not matter without a mask.
    full = sorted(c for c in calls if c[5] == "full" and c[2] == "cache")
    merged = []
    for c in full:
        last = merged[-1] if merged else None
        if last and last[:2] == c[:2] and last[3] + last[4] == c[3]:
            merged[-1] = (*last[:4], last[4] + c[4], *last[5:])
        else:
            merged.append(c)
    return tuple(merged + [c for c in calls if not (c[5] == "full" and c[2] == "cache")])


# The key counts of the "full" cache blocks cuDNN runs (``_kernel_calls``): 512 * 2^i, up to 16384.
_CUDNN_LADDER = tuple(512 << i for i in range(6))


@functools.lru_cache(maxsize=256)
def _kernel_calls(p0: int, T: int, sinks: int, window: int, cudnn: bool, chunk: int,
                  ladder: tuple = _CUDNN_LADDER) -> tuple:
    """``_attention_calls`` with the kernel that runs each: (i_lo, i_hi, source, lo, n, kind, left, right,
    backend), backend "cudnn", "cudnn_rev" or "flash" (FlashAttention-2, or ``_dense`` for short window
    ranges).

    cuDNN's fused attention runs the unmasked blocks about 1.6x as fast as FlashAttention-2 (H200), but it
    builds an execution plan for every new call shape, and the ring's split point moves with every chunk:
    the key count of a "full" cache call is new nearly every chunk, a plan build each time (a 32k prompt
    took 2.10 s against 0.85 s with FlashAttention-2 alone). So with ``cudnn`` only calls of exactly
    ``chunk`` queries (a whole chunk) go to cuDNN: each "full" call over cache keys is cut into pieces whose
    key counts are rungs of a fixed ladder (greedy: the largest rung that fits, as often as it fits), and
    the "causal" call of the chunk's own keys is chunk x chunk; the rest of a full call (fewer keys than
    the lowest rung) and every other call stay on FlashAttention-2. The band at the window's far edge of a
    whole chunk (chunk - 1 queries, each seeing the keys from its own offset on: an upper triangle) goes to
    cuDNN as a causal call on reversed rows, backend "cudnn_rev" (FlashAttention-2 ran it about 2.8x slower
    per pair than cuDNN's causal call on an H200). That is at most ``len(ladder) + 2`` shapes for a chunk
    size, whatever the position: ``warm_prefill_attention`` builds their plans at load, and no plan is
    built while serving."""
    out = []
    for c in _attention_calls(p0, T, sinks, window):
        i_lo, i_hi, source, lo, n, kind, left, right = c
        tq = i_hi - i_lo + 1
        if (cudnn and chunk > 1 and tq == chunk - 1 and (kind, source) == ("window", "cache") and left == 0
                and (right < 0 or right >= n) and n >= tq):
            # The band at the window's far edge of a whole chunk: query i sees keys i + n - tq .. n - 1 of it,
            # an upper triangle of tq x tq. Rows reversed, that is cuDNN's causal call (``_cudnn_reversed``).
            out.append((i_lo, i_hi, source, lo + n - tq, tq, kind, 0, tq, "cudnn_rev"))   # right: no bound
            continue
        fits = cudnn and tq == chunk
        if not fits or (kind, source) not in (("causal", "chunk"), ("full", "cache")):
            out.append((*c, "flash"))
        elif kind == "causal":
            out.append((*c, "cudnn" if n == chunk else "flash"))
        else:
            a, end = lo, lo + n
            for m in reversed(ladder):
                while end - a >= m:
                    out.append((i_lo, i_hi, source, a, m, kind, -1, -1, "cudnn"))
                    a += m
            if a < end:
                out.append((i_lo, i_hi, source, a, end - a, kind, -1, -1, "flash"))
    return tuple(out)


_band_refused: list = []   # the first refusal of a band plan at warm-up (AHN_RT_PREFILL_BAND=1), said once


def _first_line(e: BaseException) -> str:
    """An error's first line, for the one stderr line that says the band attention is off."""
    return (str(e).splitlines() or [type(e).__name__])[0]
_cudnn_warm = threading.local()   # .keys: the layouts whose cuDNN plans this thread has built; .reversed:
                                  # those whose reversed far-edge band plan it has built too; .band: the
                                  # ``_band_key``s and ``_fill_key``s of the band plans it has built
                                  # (AHN_RT_PREFILL_BAND=1)


def _cudnn_key(q, k, k_cache, v_cache) -> tuple:
    """What a chunk's cuDNN plans depend on beyond the call shapes of ``_kernel_calls`` (torch caches them
    per thread, by sizes, strides, dtype and device; ``_cudnn`` makes all but the cache's keys contiguous)."""
    return (tuple(q.shape), k.shape[1], tuple(k_cache.shape), k_cache.stride(), v_cache.stride(), q.dtype,
            q.device)


def warm_prefill_attention(num_heads: int, num_kv_heads: int, head_dim: int, dtype, device, chunk: int,
                           sinks: int, window: int) -> bool:
    """Build cuDNN's plans for the prefill attention of ``chunk``-token chunks over a sinks + window ring
    cache ([Hkv, S + W, D] per layer, as cache.allocate lays it out): each rung of the ladder and the causal
    chunk x chunk call, run once on zeros shaped and strided as the real calls (slices of the ring). Torch
    keeps the plans per thread, so every thread that prefills calls this first; the prefill attention uses
    cuDNN only on layouts its thread has warmed. Returns whether it will; False where cuDNN is off
    (AHN_RT_PREFILL_CUDNN), does not apply (not CUDA fp16/bf16) or refuses (then FlashAttention-2 runs)."""
    global _cudnn_ok
    device = torch.device(device)
    if not (_cudnn_ok and settings.prefill_cudnn() and device.type == "cuda" and _backend != "ref"
            and _flash_ok(dtype, head_dim)):
        return False
    C = sinks + window
    with torch.cuda.device(device):
        q = torch.zeros(chunk, num_heads, head_dim, dtype=dtype, device=device)
        k = torch.zeros(chunk, num_kv_heads, head_dim, dtype=dtype, device=device)
        k_cache = torch.zeros(num_kv_heads, C, head_dim, dtype=dtype, device=device)
        try:
            for m in _CUDNN_LADDER:
                if m <= C:
                    kk = k_cache[:, :m].transpose(0, 1)
                    _cudnn(q, kk, kk, False, head_dim ** -0.5)
            if chunk <= window:
                _cudnn(q, k, k, True, head_dim ** -0.5)
            torch.cuda.synchronize()
        except RuntimeError:
            _cudnn_ok = False
            return False
        key = _cudnn_key(q, k, k_cache, k_cache)
        _cudnn_warm.keys = getattr(_cudnn_warm, "keys", set()) | {key}
        if settings.prefill_band() and _use_ext(q):   # cuDNN's band calls: a steady chunk's (all W - 1 + T keys
            # of a linear copy), a filling chunk's (the cache itself, its first p0 + T rows); a refusal leaves
            # those chunks to the ladder. Never the reference: it scores [H, Tq, n] at once.
            kb = torch.zeros(num_kv_heads, window - 1 + chunk, head_dim, dtype=dtype, device=device)
            calls = [(_band_key(q, k, window), lambda: band_attention(q, kb.transpose(0, 1), kb.transpose(0, 1),
                                                                      window, head_dim ** -0.5))]
            if chunk <= C:
                calls.append((_fill_key(q, k_cache, k_cache), lambda: _prefill_attention_fill(
                    q, k_cache, k_cache, chunk, head_dim ** -0.5)))
            for band_key, call in calls:
                try:
                    call()
                    torch.cuda.synchronize()
                    _cudnn_warm.band = getattr(_cudnn_warm, "band", set()) | {band_key}
                except RuntimeError as e:   # said once per process, unless this build simply has no band path
                    if not _band_refused and "without cudnn-frontend" not in str(e):
                        _band_refused.append(_first_line(e))
                        print(f"ahn_rt: cuDNN refused the band attention ({_band_refused[0]}); those chunks use "
                              "the ladder", file=sys.stderr)
            del kb, calls
        if 1 < chunk < window:   # the far-edge band, reversed (``_kernel_calls``); a refusal turns off only it
            try:
                _cudnn_reversed(q[1:], k[1:], k[1:], head_dim ** -0.5)
                torch.cuda.synchronize()
                _cudnn_warm.reversed = getattr(_cudnn_warm, "reversed", set()) | {key}
            except RuntimeError:
                pass
    return True


def _band_first(p0: int, T: int, sinks: int, window: int):
    """The position of the first key of a chunk's band call, or None where the ladder runs the chunk. The band
    takes a chunk of T > 0 tokens at p0 whose every query looks past the sinks (p0 >= S + W - 1): its window
    keys, positions [p0 - W + 1, p0 + T), fill the whole linear buffer of W - 1 + T rows that ``_band_keys``
    lays out, under one bottom-right band of W keys, and the sinks (if any) are a second call. While the window
    fills, that buffer would be mostly padding, which costs more than the one call saves (H100: pp2048 33 ms
    against the ladder's 29, pp32768 0.645 s against 0.635 s; bench/README.md), so those chunks take the fill
    call over the cache itself where they fill it in order (``_prefill_attention_fill``), else the ladder."""
    return p0 - window + 1 if T > 0 and p0 >= sinks + window - 1 else None


def _band_key(q, k, window) -> tuple:
    """What a band call's cuDNN plan depends on (its linear key buffers are laid out by ``_band_keys``)."""
    return (tuple(q.shape), k.shape[1], window, q.dtype, q.device)


def _fill_key(q, k_cache, v_cache, rows=None) -> tuple:
    """What a filling chunk's cuDNN plan depends on (``_prefill_attention_fill``: its query rows, ``rows`` or
    q's, and the cache's layout)."""
    shape = (q.shape[0] if rows is None else rows, *q.shape[1:])
    return ("fill", shape, tuple(k_cache.shape), k_cache.stride(), v_cache.stride(), q.dtype, q.device)


def _fill_rows(q, k_cache, v_cache):
    """The query rows of the warmed fill plan that takes a chunk of len(q) tokens (the smallest of at least
    as many rows; a shorter chunk passes its length as ``q_len``), or None (the ladder runs it)."""
    T = q.shape[0]
    rows = [key[1][0] for key in getattr(_cudnn_warm, "band", ())
            if key[0] == "fill" and key[1][0] >= T and key == _fill_key(q, k_cache, v_cache, key[1][0])]
    return min(rows, default=None)


def _prefill_attention_fill(q, k_cache, v_cache, n, scale, rows=None):
    """A chunk of T tokens that fills the cache in order (``ChunkPlan.in_order``: its keys written first, to
    slots [p0, p0 + T)): every query sees every earlier key, sinks included, so the chunk is one causal call
    with the diagonal at the bottom-right corner of the cache's first ``n`` = p0 + T rows, read in place (no
    copy, no merge; one plan for every p0, the key count a device scalar). ``rows`` > T: the plan of that many
    queries, the chunk in the first T rows of a zeroed buffer and T as ``q_len`` (one plan for every chunk
    length too)."""
    kv_len = torch.full((1,), n, dtype=torch.int32, device=q.device)   # a fill kernel, no sync
    T, q_len = q.shape[0], None
    if rows is not None and rows > T:
        qb = q.new_zeros(rows, *q.shape[1:])
        qb[:T] = q
        q, q_len = qb, torch.full((1,), T, dtype=torch.int32, device=q.device)
    out, _ = band_attention(q if q.is_contiguous() else q.contiguous(), k_cache.transpose(0, 1),
                            v_cache.transpose(0, 1), 0, scale, kv_len, q_len)
    return out[:T]


def _band_try(band_key, run):
    """``run()``, a chunk's band call, where its plan is warmed; None where it is not or fails (the ladder then
    runs the chunk). Out of memory keeps the band on; a cuDNN error takes that plan out for the thread, said
    on stderr."""
    if band_key not in getattr(_cudnn_warm, "band", ()):
        return None
    try:
        return run()
    except torch.OutOfMemoryError:
        return None   # this chunk through the ladder (smaller buffers); the band stays on
    except RuntimeError as e:
        _cudnn_warm.band = _cudnn_warm.band - {band_key}
        print(f"ahn_rt: the band attention failed ({_first_line(e)}); the prefill uses the ladder", file=sys.stderr)
        return None


def _band_keys(k, v, k_cache, v_cache, p0: int, first: int, sinks: int, window: int):
    """The W - 1 + T keys of positions [first, p0 + T) in order, copied from the cache and the chunk into fresh
    head-major buffers; returned as [W - 1 + T, Hkv, D] views."""
    T, Hkv, D = k.shape
    kb = torch.empty(Hkv, window - 1 + T, D, dtype=k.dtype, device=k.device)
    vb = torch.empty(Hkv, window - 1 + T, v.shape[2], dtype=v.dtype, device=v.device)
    for r in cache.key_ranges(p0, T, sinks, window):
        skip = max(0, first - r.pos)
        m = r.n - skip
        if m <= 0:
            continue
        dst = r.pos + skip - first
        if r.source == "cache":
            kb[:, dst:dst + m].copy_(k_cache[:, r.lo + skip:r.lo + skip + m])
            vb[:, dst:dst + m].copy_(v_cache[:, r.lo + skip:r.lo + skip + m])
        else:
            kb[:, dst:dst + m].copy_(k[r.lo + skip:r.lo + skip + m].transpose(0, 1))
            vb[:, dst:dst + m].copy_(v[r.lo + skip:r.lo + skip + m].transpose(0, 1))
    return kb.transpose(0, 1), vb.transpose(0, 1)


def _prefill_attention_band(q, k, v, k_cache, v_cache, p0, sinks, window, scale, first):
    """A chunk through the band (``_band_first`` gives ``first``): its window as one cuDNN call over a linear
    copy of its keys (``band_attention``, left bound W), the cached sinks as a second call (FlashAttention-2,
    no mask), merged by log-sum-exp."""
    kb, vb = _band_keys(k, v, k_cache, v_cache, p0, first, sinks, window)
    out, lse = band_attention(q if q.is_contiguous() else q.contiguous(), kb, vb, window, scale)
    if sinks == 0:
        return out
    ks, vs = k_cache[:, :sinks].transpose(0, 1), v_cache[:, :sinks].transpose(0, 1)
    o2, l2 = _flash(q, ks, vs, -1, -1, scale)
    return attn_merge([out, o2], [lse, l2], [0, 0], q.shape[0])


def _rows_aligned(t):
    """The attention kernels load rows 16 bytes at a time: every stride but the last a multiple of
    16 bytes, and the start too. A view of the fused projection output (v) can fail this when the
    projection's width is odd in 16-byte units (small test models)."""
    e = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * e) % 16 == 0 for s in t.stride()[:-1])


def _prefill_attention_flash(q, k, v, k_cache, v_cache, p0, sinks, window, scale, cached=False):
    global _cudnn_ok
    T, H, D = q.shape
    q, k, v = (t if _rows_aligned(t) else t.contiguous() for t in (q, k, v))
    if _cudnn_ok and settings.prefill_cudnn() and settings.prefill_band():
        out = None
        rows = _fill_rows(q, k_cache, v_cache) if cached else None
        if rows is not None:
            out = _band_try(_fill_key(q, k_cache, v_cache, rows),
                            lambda: _prefill_attention_fill(q, k_cache, v_cache, p0 + T, scale, rows))
        first = _band_first(p0, T, sinks, window)
        if out is None and first is not None:
            out = _band_try(_band_key(q, k, window),
                            lambda: _prefill_attention_band(q, k, v, k_cache, v_cache, p0, sinks, window, scale,
                                                            first))
        if out is not None:
            return out
    key = _cudnn_key(q, k, k_cache, v_cache)
    cudnn = _cudnn_ok and settings.prefill_cudnn() and key in getattr(_cudnn_warm, "keys", ())
    reversed_ok = cudnn and key in getattr(_cudnn_warm, "reversed", ())
    parts, stacked = [], {}
    for i_lo, i_hi, source, lo, n, kind, left, right, backend in _kernel_calls(p0, T, sinks, window, cudnn, T,
                                                                             _CUDNN_LADDER):
        if source == "cache":
            kk, vv = k_cache[:, lo:lo + n].transpose(0, 1), v_cache[:, lo:lo + n].transpose(0, 1)
        else:
            kk, vv = k[lo:lo + n], v[lo:lo + n]
        qq = q[i_lo:i_hi + 1]
        tq = i_hi - i_lo + 1
        if kind == "window" and tq > n:
            # FlashAttention-2's window bounds are wrong with more queries than keys (measured on the
            # H200): a short range runs dense, a longer one in blocks of at most n queries, written into
            # one part (as many parts as blocks would pass the merge kernel's limit: the reference merge
            # then ran, holding float32 copies of every part, at the peak of a 128k prefill).
            step, run = (n, _flash) if n > _DENSE_KEYS else (tq, _dense)
            out = lse = None
            for b0 in range(0, tq, step):
                m = min(tq - b0, step)
                lb = left + tq - m - b0 if 0 <= left < n else -1
                rb = right + tq - m - b0 if 0 <= right < n else -1
                o, l = run(qq[b0:b0 + m], kk, vv, lb, rb, scale)
                if m == tq:
                    out, lse = o, l
                    break
                if out is None:
                    out = torch.empty(tq, H, o.shape[2], dtype=o.dtype, device=o.device)
                    lse = torch.empty(H, tq, dtype=l.dtype, device=l.device)
                out[b0:b0 + m], lse[:, b0:b0 + m] = o, l
            parts.append((i_lo, tq, out, lse))
            continue
        res = None
        if backend == "cudnn_rev" and not reversed_ok:
            backend = "flash"   # its bounds (left 0, none on the right) are FlashAttention-2's as they stand
        if backend in ("cudnn", "cudnn_rev") and _cudnn_ok:
            try:
                if backend == "cudnn_rev":
                    res = _cudnn_reversed(qq, kk, vv, scale)
                else:
                    res = _cudnn(qq, kk, vv, kind == "causal", scale, stacked)
            except torch.OutOfMemoryError:
                res = None   # this call falls back to FlashAttention-2 (less workspace); cuDNN stays on
            except RuntimeError:
                _cudnn_ok = False
        if res is None:
            res = _flash(qq, kk, vv, left, right, scale)
        parts.append((i_lo, tq, *res))
    return _merge(parts, T)


def _merge(parts, T):
    """The chunk's output from its parts (row offset, rows, out, lse) by log-sum-exp. Past the kernel's
    ``_MERGE_PARTS`` (ladder pieces add parts), the parts of the same rows are merged first, with their
    joint log-sum-exp, into one part."""
    while len(parts) > _MERGE_PARTS:
        same = {}
        for p in parts:
            same.setdefault(p[:2], []).append(p)
        group = max(same.values(), key=len)[:_MERGE_PARTS]
        if len(group) < 2:
            break
        lses = [p[3] for p in group]
        out = attn_merge([p[2] for p in group], lses, [0] * len(group), group[0][1])
        parts = [p for p in parts if all(p is not g for g in group)]
        parts.append((*group[0][:2], out, torch.logsumexp(torch.stack(lses), dim=0)))
    if len(parts) == 1 and parts[0][1] == T:
        return parts[0][2]
    return attn_merge([o for _, _, o, _ in parts], [lse for _, _, _, lse in parts], [lo for lo, *_ in parts], T)


def _prefill_attention_sdpa(q, k, v, k_cache, v_cache, p0, sinks, window, scale):
    """float32 on CUDA (no FlashAttention kernel): the cached keys are gathered and SDPA runs with the
    rule as a mask."""
    k_all, v_all, q_pos, k_pos = ref.chunk_keys(k, v, k_cache, v_cache, p0, sinks, window)
    qp, kp = q_pos[:, None], k_pos[None, :]
    allowed = (kp <= qp) & ((qp - kp < window) | (kp < sinks))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k_all.transpose(0, 1)[None], v_all.transpose(0, 1)[None],
        attn_mask=allowed, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1).contiguous()   # [T, H, D]


rope_cos_sin = ref.rope_cos_sin_ref


def rope(x, cos, sin):
    """Rotate-half RoPE of a prefill chunk, x [T, heads, D] (one kernel; ref.rope_ref)."""
    fn = torch.ops.ahn_rt.rope if _use_ext(x) and x.stride(-1) == 1 and x.dtype != torch.float64 else ref.rope_ref
    return fn(x, cos, sin)


def gdn_gate_norm(o, z, norm_weight, eps):
    fn = torch.ops.ahn_rt.gdn_gate_norm if _use_ext(o) and o.dtype != torch.float64 else ref.gdn_gate_norm_ref
    return fn(o, z, norm_weight, eps)


def gdn_output(o, z, norm_weight, o_proj, eps):
    """The GatedDeltaNet output head over a prefill chunk (ref.gdn_output_ref): the norm and gate in one
    kernel, the grouped o_proj as one batched matmul over the heads."""
    return grouped_o_proj(gdn_gate_norm(o, z, norm_weight, eps), o_proj)


def grouped_o_proj(y, o_proj):
    """A memory's grouped o_proj over a prefill chunk: y [n, H, Dv] by o_proj [H, Dv, Dv] (in, out) per
    head, one batched matmul, in y's dtype; on the CPU in float32 where that is faster (``_gemm_in_float32``),
    rounded once."""
    yt = y.transpose(0, 1)
    if _gemm_in_float32(y):
        return torch.bmm(yt.float(), o_proj.float()).to(y.dtype).transpose(0, 1)
    return torch.bmm(yt, o_proj.to(y.dtype)).transpose(0, 1)


# ---- the Mamba2 memory -------------------------------------------------------------------------------
# Its decode step and its prefill's chunk-local work are compiled ops (CPU and CUDA); the prefill's
# block-to-block recurrence is GatedDeltaNet's scan kernel without the delta correction.
def mamba2_output(o, z, norm_weight, o_proj, eps):
    """Mamba2's output head over a prefill chunk (ref.mamba2_output_ref): the reference's gate and norm,
    then the grouped o_proj."""
    return grouped_o_proj(ref.mamba2_gate_norm_ref(o, z, norm_weight, eps), o_proj)


def mamba2_chunk_prep(q, k, v, dt, a_log):
    """Mamba2's chunk-local work of every block in one kernel (CPU and CUDA); float64 takes the reference."""
    ok = _prep_ok(q, k, v)
    fn = torch.ops.ahn_rt.mamba2_chunk_prep if _use_ext(q) and ok else ref.mamba2_chunk_prep_ref
    return fn(q, k, v, dt, a_log)


def mamba2_chunk(q, k, v, dt, a_log, state):
    """The Mamba2 memory over a run of tokens (a prefill): ``mamba2_chunk_prep`` and the shared scan kernel
    without w (ref.mamba2_chunk_blocks), in blocks of ``_MEMORY_BLOCK`` tokens."""
    if _backend == "ref":
        return ref.mamba2_chunk_ref(q, k, v, dt, a_log, state)
    return _token_blocks(lambda q, k, v, dt: ref.mamba2_chunk_blocks(q, k, v, dt, a_log, state, prep=mamba2_chunk_prep,
                                                                     scan=gdn_chunk_scan), q, k, v, dt)


def mamba2_decode(state, q, k, v, dt, a_log, z, norm_weight, o_proj, out, pos, sinks, window, eps, slots=None):
    fn = torch.ops.ahn_rt.mamba2_decode if _use_ext(q) else ref.mamba2_decode_ref
    fn(state, q, k, v, dt, a_log, z, norm_weight, o_proj, out, pos, sinks, window, eps, slots)
