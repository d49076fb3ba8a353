"""``band_attention`` (compiled: C++ on the CPU, cuDNN through cudnn-frontend on CUDA) against
``ref.band_attention_ref``, and the prefill's band path (``ops._prefill_attention_band``: a whole chunk past the
fill point as one band call over a linear copy of its keys plus the sinks) against
``ref.prefill_attention_ref``. Each tolerance check also shows that a band one key narrower fails it.
"""
from __future__ import annotations

import pytest
import torch

import ahn_rt._C  # noqa: F401
import ahn_rt._meta  # noqa: F401
from ahn_rt import ops, ref

_NO_GPU = not torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(_NO_GPU, reason="no GPU")]

# (Tq, n, H, Hkv, D, left): one key; GQA; a band narrower than, equal to and wider than the keys; no
# left bound; Tq == n (plain causal); one key per query (left 1)
CASES = [(1, 1, 1, 1, 8, 0), (5, 9, 4, 2, 16, 3), (37, 100, 6, 3, 32, 40), (64, 64, 2, 1, 64, 0),
         (17, 30, 4, 4, 24, 30), (17, 30, 4, 4, 24, 500), (9, 9, 2, 1, 16, 1), (40, 71, 8, 2, 128, 12)]


def _inputs(Tq, n, H, Hkv, D, dtype=torch.float32, device="cpu", seed=0, head_major=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Tq, H, D, generator=g)
    if head_major:   # k, v as [n, Hkv, D] views of [Hkv, n, D] buffers, as the prefill passes them
        k, v = (torch.randn(Hkv, n, D, generator=g).to(device, dtype).transpose(0, 1) for _ in range(2))
    else:
        k, v = (torch.randn(n, Hkv, D, generator=g).to(device, dtype) for _ in range(2))
    return q.to(device, dtype), k, v


@pytest.mark.parametrize("Tq,n,H,Hkv,D,left", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_band_attention_cpu_matches_reference(Tq, n, H, Hkv, D, left, dtype):
    q, k, v = _inputs(Tq, n, H, Hkv, D, dtype, head_major=Tq % 2 == 1)
    out, lse = torch.ops.ahn_rt.band_attention(q, k, v, left, D ** -0.5)
    want, want_lse = ref.band_attention_ref(q.double(), k.double(), v.double(), left, D ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    assert (out.double() - want).abs().max().item() < tol
    assert (lse.double() - want_lse).abs().max().item() < 1e-4
    if 1 < left < n:   # a band one key narrower fails the same bound
        narrow, _ = ref.band_attention_ref(q.double(), k.double(), v.double(), left - 1, D ** -0.5)
        assert (narrow - want).abs().max().item() > tol


def test_band_attention_reference_is_the_window_rule():
    """The reference's band is the sinks + window rule without sinks: query i at position n - Tq + i sees the
    ``left`` positions ending at its own (ref.window_attention_ref, an independent formulation)."""
    Tq, n, H, Hkv, D, left = 13, 40, 4, 2, 16, 9
    q, k, v = _inputs(Tq, n, H, Hkv, D)
    out, _ = ref.band_attention_ref(q, k, v, left, D ** -0.5)
    q_pos = torch.arange(n - Tq, n)
    want = ref.window_attention_ref(q, k, v, q_pos, torch.arange(n), 0, left, D ** -0.5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_band_attention_opcheck_and_errors():
    q, k, v = _inputs(6, 10, 4, 2, 16, head_major=True)
    torch.library.opcheck(torch.ops.ahn_rt.band_attention.default, (q, k, v, 4, 0.25))
    with pytest.raises(RuntimeError, match="more queries"):
        torch.ops.ahn_rt.band_attention(q, k[:5], v[:5], 4, 0.25)
    with pytest.raises(RuntimeError, match="multiple of the key heads"):
        torch.ops.ahn_rt.band_attention(q[:, :3], k, v, 4, 0.25)
    with pytest.raises(RuntimeError, match="share one dtype"):
        torch.ops.ahn_rt.band_attention(q, k.double(), v, 4, 0.25)


@pytest.mark.parametrize("Tq,n,H,Hkv,D,left", CASES[1:] + [(256, 767, 16, 2, 128, 512), (256, 5000, 16, 2, 128, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["rows", "head_major", "padded", "padded_q"])
@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
def test_band_attention_cuda_matches_reference(Tq, n, H, Hkv, D, left, dtype, layout):
    """cuDNN's band call against the float64 reference: the alignment and the left bound are the reference's
    (a band one key narrower fails the same bound); "padded": head-major buffers with 37 more (finite) rows
    than keys, and kv_len; "padded_q": that and 11 more query rows than queries, and q_len. Skips only where
    this build has no cuDNN band path."""
    if D % 8:
        pytest.skip("cuDNN takes head dims that are multiples of 8")
    pad = 37 if layout.startswith("padded") else 0
    q, kp, vp = _inputs(Tq, n + pad, H, Hkv, D, dtype, "cuda", seed=Tq, head_major=layout != "rows")
    k, v = kp[:n], vp[:n]
    try:
        if layout == "padded_q":
            qp = torch.cat([q, torch.randn(11, H, D, dtype=dtype, device="cuda")])
            out, lse = torch.ops.ahn_rt.band_attention(qp, kp, vp, left, D ** -0.5,
                                                       torch.tensor([n], dtype=torch.int32, device="cuda"),
                                                       torch.tensor([Tq], dtype=torch.int32, device="cuda"))
            out, lse = out[:Tq], lse[:, :Tq]
        elif pad:
            out, lse = torch.ops.ahn_rt.band_attention(q, kp, vp, left, D ** -0.5,
                                                       torch.tensor([n], dtype=torch.int32, device="cuda"))
        else:
            out, lse = torch.ops.ahn_rt.band_attention(q, k, v, left, D ** -0.5)
    except RuntimeError as e:
        if "without cudnn-frontend" in str(e):
            pytest.skip("this build has no cuDNN band attention")
        raise
    want, want_lse = ref.band_attention_ref(q.double(), k.double(), v.double(), left, D ** -0.5)
    # relative to the output's scale where that is below 1: wide bands average thousands of values, and one
    # key more or less then moves the output by less than an absolute bound sized for O(1) outputs
    tol = (1.6e-2 if dtype == torch.bfloat16 else 4e-3) * min(1.0, want.abs().max().item())
    assert (out.double() - want).abs().max().item() < tol
    assert (lse.double() - want_lse).abs().max().item() < 2e-3
    if 1 < left < n:
        narrow, _ = ref.band_attention_ref(q.double(), k.double(), v.double(), left - 1, D ** -0.5)
        assert (narrow - want).abs().max().item() > tol


def _prefill_case(S, W, p0, T, H, Hkv, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)
    return r(T, H, D), r(T, Hkv, D), r(T, Hkv, D), r(Hkv, S + W, D), r(Hkv, S + W, D)


# (S, W, p0, T) of chunks the band takes (p0 >= S + W - 1): the first one past the fill point, the ring wrapped
# at several offsets, a chunk longer than the window, one token, no sinks, W = 1, wide windows
BAND_CASES = [(4, 16, 19, 6), (4, 16, 20, 5), (4, 16, 23, 16), (4, 16, 37, 11), (4, 16, 45, 40), (0, 8, 7, 5),
              (0, 8, 30, 3), (3, 1, 3, 5), (5, 7, 11, 1), (16, 64, 200, 64), (2, 300, 1000, 257),
              (128, 1000, 1127, 300), (128, 1000, 2500, 1000)]


@pytest.mark.parametrize("S,W,p0,T", BAND_CASES)
def test_band_prefill_path_matches_reference_cpu(monkeypatch, S, W, p0, T):
    """The band path on the CPU (the C++ band kernel; the sinks through ``_dense`` in place of the CUDA-only
    FlashAttention-2 call): the linear copy of the cache and the chunk, the band and the merge give the
    reference's attention, and a window one key narrower fails the bound."""
    first = ops._band_first(p0, T, S, W)
    assert first == p0 - W + 1
    monkeypatch.setattr(ops, "_flash", ops._dense)
    q, k, v, kc, vc = _prefill_case(S, W, p0, T, 4, 2, 16, torch.float32, "cpu", seed=p0)
    got = ops._prefill_attention_band(q, k, v, kc, vc, p0, S, W, 0.25, first)
    want = ref.prefill_attention_ref(q.double(), k.double(), v.double(), kc.double(), vc.double(), p0, S, W, 0.25)
    assert (got.double() - want).abs().max().item() < 1e-5
    if W > 1:
        narrow = ref.prefill_attention_ref(q.double(), k.double(), v.double(), kc.double(), vc.double(), p0, S,
                                           W - 1, 0.25)
        assert (narrow - want).abs().max().item() > 1e-5


# (S, W, p0, T) of chunks that fill the cache in order (p0 + T <= S + W): from position 0, inside the sinks,
# across the sinks' end, the last one before the fill point, one token, no sinks, W = 1
FILL_CASES = [(4, 16, 0, 20), (4, 16, 0, 1), (4, 16, 2, 5), (4, 16, 6, 14), (4, 16, 19, 1), (0, 8, 3, 5),
              (3, 1, 0, 4), (128, 1000, 300, 828), (128, 1000, 0, 512)]


@pytest.mark.parametrize("S,W,p0,T", FILL_CASES)
def test_fill_path_matches_reference_cpu(S, W, p0, T):
    """A chunk that fills the cache in order, written first to slots [p0, p0 + T), as one causal band call over
    the cache's first p0 + T rows (the C++ kernel): the reference's attention. The rows past them hold NaN
    and never count; one key fewer leaves the earlier queries as they are and moves the last one's output."""
    q, k, v, kc, vc = _prefill_case(S, W, p0, T, 4, 2, 16, torch.float32, "cpu", seed=p0 + T)
    want = ref.prefill_attention_ref(q.double(), k.double(), v.double(), kc.double(), vc.double(), p0, S, W, 0.25)
    kc[:, p0:p0 + T], vc[:, p0:p0 + T] = k.transpose(0, 1), v.transpose(0, 1)
    kc[:, p0 + T:], vc[:, p0 + T:] = float("nan"), float("nan")
    got = ops._prefill_attention_fill(q, kc, vc, p0 + T, 0.25)
    assert (got.double() - want).abs().max().item() < 1e-5
    if T > 1:   # the earlier queries do not see the last key
        short = ops._prefill_attention_fill(q[:-1], kc, vc, p0 + T - 1, 0.25)
        assert (short.double() - want[:-1]).abs().max().item() < 1e-5
    if p0 + T > 1:
        kc[:, p0 + T - 1] = 0   # the last key changed: the last query's output must move
        assert (ops._prefill_attention_fill(q, kc, vc, p0 + T, 0.25)[-1].double() - want[-1]).abs().max() > 1e-5


def test_band_first():
    """Which chunks the band path takes: those whose every query looks past the sinks (p0 >= S + W - 1), from
    the window's start; the ladder (None) while the window fills, around the fill point, and for no tokens."""
    S, W = 4, 16
    assert ops._band_first(S + W - 1, 8, S, W) == S
    assert ops._band_first(40, 8, S, W) == 40 - W + 1
    assert ops._band_first(40, 8, 0, W) == 40 - W + 1
    assert ops._band_first(W - 1, 1, 0, W) == 0
    for p0, T in [(0, 16), (10, 6), (10, 7), (S + W - 2, 8), (2, 20), (0, 100), (100, 0)]:
        assert ops._band_first(p0, T, S, W) is None, (p0, T)


def test_band_attention_kv_len_uses_the_leading_rows():
    """With kv_len the keys are the first kv_len rows (rows past them, even NaN, never count); the CPU kernel
    refuses a kv_len outside the rows or below the query count."""
    q, k, v = _inputs(5, 12, 4, 2, 16)
    k[9:], v[9:] = float("nan"), float("nan")
    kv_len = torch.tensor([9], dtype=torch.int32)
    out, lse = torch.ops.ahn_rt.band_attention(q, k, v, 4, 0.25, kv_len)
    want, want_lse = ref.band_attention_ref(q, k[:9], v[:9], 4, 0.25)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.band_attention_ref(q, k, v, 4, 0.25, kv_len)[0], want)
    torch.library.opcheck(torch.ops.ahn_rt.band_attention.default, (q, k, v, 4, 0.25, kv_len))
    for bad in (13, 4, -1):
        with pytest.raises(RuntimeError, match="kv_len|more queries"):
            torch.ops.ahn_rt.band_attention(q, k, v, 4, 0.25, torch.tensor([bad], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.ahn_rt.band_attention(q, k, v, 4, 0.25, torch.tensor([9]))


def test_band_attention_q_len_uses_the_leading_rows():
    """With q_len the queries are the first q_len rows of q, the diagonal at the corner of q_len x kv_len (rows
    past them give 0 and -inf on the CPU, even from NaN queries); the CPU kernel refuses a q_len outside q's rows
    or above the key count."""
    q, k, v = _inputs(8, 12, 4, 2, 16)
    q[5:] = float("nan")
    kv_len, q_len = torch.tensor([9], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
    out, lse = torch.ops.ahn_rt.band_attention(q, k, v, 4, 0.25, kv_len, q_len)
    want, want_lse = ref.band_attention_ref(q[:5], k[:9], v[:9], 4, 0.25)
    torch.testing.assert_close(out[:5], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:, :5], want_lse, rtol=1e-5, atol=1e-5)
    assert (out[5:] == 0).all() and (lse[:, 5:] == float("-inf")).all()
    for got in (ref.band_attention_ref(q, k, v, 4, 0.25, kv_len, q_len), ):
        torch.testing.assert_close(got[0], out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], lse, rtol=1e-5, atol=1e-5)
    # without kv_len: q_len rows over all 12 keys; a q_len of every row is the plain call
    torch.testing.assert_close(torch.ops.ahn_rt.band_attention(q[:5], k, v, 4, 0.25, None, q_len)[0],
                               ref.band_attention_ref(q[:5], k, v, 4, 0.25)[0], rtol=1e-5, atol=1e-5)
    # the rule moves with q_len: the same rows as the first 5 of 8 queries (no q_len) see other keys
    assert (torch.ops.ahn_rt.band_attention(q.nan_to_num(), k, v, 4, 0.25, kv_len)[0][:5] - want).abs().max() > 1e-3
    torch.library.opcheck(torch.ops.ahn_rt.band_attention.default, (q, k, v, 4, 0.25, kv_len, q_len))
    for bad_q, bad_kv in ((9, 9), (-1, 9), (6, 5)):
        with pytest.raises(RuntimeError, match="q_len|more queries"):
            torch.ops.ahn_rt.band_attention(q, k, v, 4, 0.25, torch.tensor([bad_kv], dtype=torch.int32),
                                            torch.tensor([bad_q], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.ahn_rt.band_attention(q, k, v, 4, 0.25, kv_len, torch.tensor([5]))


@pytest.mark.parametrize("S,W,p0,T,rows", [(4, 16, 0, 5, 8), (4, 16, 0, 1, 20), (4, 16, 3, 9, 16), (0, 8, 2, 3, 8),
                                           (128, 1000, 0, 300, 512), (128, 1000, 600, 300, 512)])
def test_fill_path_short_chunk_cpu(S, W, p0, T, rows):
    """A chunk shorter than the warmed fill plan's query rows: its queries in the first T rows of a buffer of
    that many, T as q_len (the C++ kernel): the reference's attention, and the output has the chunk's rows."""
    q, k, v, kc, vc = _prefill_case(S, W, p0, T, 4, 2, 16, torch.float32, "cpu", seed=p0 + rows)
    want = ref.prefill_attention_ref(q.double(), k.double(), v.double(), kc.double(), vc.double(), p0, S, W, 0.25)
    kc[:, p0:p0 + T], vc[:, p0:p0 + T] = k.transpose(0, 1), v.transpose(0, 1)
    got = ops._prefill_attention_fill(q, kc, vc, p0 + T, 0.25, rows)
    assert got.shape == q.shape and (got.double() - want).abs().max().item() < 1e-5


def test_fill_rows_takes_the_smallest_warmed_plan(monkeypatch):
    kc = torch.zeros(2, 64, 16)
    q = torch.zeros(40, 4, 16)
    warmed = {ops._fill_key(q, kc, kc, 32), ops._fill_key(q, kc, kc, 16), ops._band_key(q, q[:, :2], 8),
              ops._fill_key(q.double(), kc, kc, 64)}
    monkeypatch.setattr(ops._cudnn_warm, "band", warmed, raising=False)
    assert [ops._fill_rows(q[:t], kc, kc) for t in (1, 10, 16, 17, 32, 33)] == [16, 16, 16, 32, 32, None]
    assert ops._fill_rows(q, kc[:, :32], kc[:, :32]) is None   # another cache layout: none warmed
    monkeypatch.setattr(ops._cudnn_warm, "band", set(), raising=False)
    assert ops._fill_rows(q, kc, kc) is None


def _warm_band_path(monkeypatch, H, Hkv, D, T, S, W):
    """The band and fill plans of ``T``-token chunks built on CUDA (bf16) with both switches on; skips on a
    build without the cuDNN band path (the one reason to skip)."""
    monkeypatch.setenv("AHN_RT_PREFILL_CUDNN", "1")
    monkeypatch.setenv("AHN_RT_PREFILL_BAND", "1")
    monkeypatch.setattr(ops, "_cudnn_ok", True)
    monkeypatch.setattr(ops._cudnn_warm, "band", set(), raising=False)
    try:
        torch.ops.ahn_rt.band_attention(*_inputs(4, 8, 2, 1, 64, torch.bfloat16, "cuda"), 0, 0.125)
    except RuntimeError as e:
        if "without cudnn-frontend" in str(e):
            pytest.skip("this build has no cuDNN band attention")
        raise
    assert ops.warm_prefill_attention(H, Hkv, D, torch.bfloat16, "cuda", T, S, W)


@pytest.mark.parametrize("p0", [0, 2048, 3000, 3100, 4223, 5000, 9000, 20000])
@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
def test_band_prefill_path_cuda_matches_reference(monkeypatch, p0):
    """On CUDA through ``prefill_attention`` once ``warm_prefill_attention`` has built the band plan: a chunk
    whose every window lies past the sinks (p0 >= S + W - 1) takes the band path (spied), the others (from
    position 0, around the fill point) the ladder; each matches the reference within the bf16 bound of
    test_prefill.py's cuDNN test, and a window narrower by W/8 fails that bound where the window cuts."""
    S, W, T, H, Hkv, D = 128, 4096, 1024, 8, 2, 128
    _warm_band_path(monkeypatch, H, Hkv, D, T, S, W)
    probe_q, probe_k = torch.empty(T, H, D, dtype=torch.bfloat16, device="cuda"), torch.empty(T, Hkv, D)
    assert ops._band_key(probe_q, probe_k, W) in ops._cudnn_warm.band
    calls, real = [], ops._prefill_attention_band
    monkeypatch.setattr(ops, "_prefill_attention_band", lambda *a: calls.append(a[5]) or real(*a))
    q, k, v, kc, vc = _prefill_case(S, W, p0, T, H, Hkv, D, torch.bfloat16, "cuda", seed=p0)
    got = ops.prefill_attention(q, k, v, kc, vc, p0, S, W, D ** -0.5).float()
    # the band ran and did not fail over to the ladder (a failure takes its plan out of the warmed set)
    assert calls == ([p0] if p0 >= S + W - 1 else []) and ops._band_key(probe_q, probe_k, W) in \
        ops._cudnn_warm.band
    want = ref.prefill_attention_ref(q.float(), k.float(), v.float(), kc.float(), vc.float(), p0, S, W, D ** -0.5)
    err = (got - want).abs().max().item()
    rel_err = ((got - want).norm() / want.norm()).item()
    assert err < 5e-2 and rel_err < 1e-2, f"max error {err:.2e}, relative {rel_err:.2e}"
    if p0 + T > W:
        narrow = ref.prefill_attention_ref(q.float(), k.float(), v.float(), kc.float(), vc.float(), p0, S,
                                           W - W // 8, D ** -0.5)
        assert ((narrow - want).norm() / want.norm()).item() > 1e-2


@pytest.mark.parametrize("p0,T", [(0, 1024), (1024, 1024), (2048, 1024), (3000, 1024), (3200, 1024), (0, 700),
                                  (0, 1), (2500, 333), (4223, 1)])
@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
def test_fill_path_cuda_matches_reference(monkeypatch, p0, T):
    """On CUDA through ``prefill_attention(cached=True)`` once ``warm_prefill_attention`` has built the fill plan:
    a chunk that fills the cache in order (written first) is one cuDNN call over the cache's first p0 + T rows
    (spied; the rows past them hold 1e4 and never count: finite, as cuDNN's last tile reads them and masks
    their scores, so NaN there would give 0 x NaN), within the bf16 bound of the band test; a window half as
    wide as its keys fails that bound. A chunk shorter than the warmed 1024 rows runs the same plan with its
    length as q_len."""
    S, W, H, Hkv, D = 128, 4096, 8, 2, 128
    _warm_band_path(monkeypatch, H, Hkv, D, 1024, S, W)
    calls, real = [], ops._prefill_attention_fill
    monkeypatch.setattr(ops, "_prefill_attention_fill", lambda *a: calls.append(a[3]) or real(*a))
    q, k, v, kc, vc = _prefill_case(S, W, p0, T, H, Hkv, D, torch.bfloat16, "cuda", seed=p0)
    want = ref.prefill_attention_ref(q.float(), k.float(), v.float(), kc.float(), vc.float(), p0, S, W, D ** -0.5)
    kc[:, p0:p0 + T], vc[:, p0:p0 + T] = k.transpose(0, 1), v.transpose(0, 1)
    kc[:, p0 + T:], vc[:, p0 + T:] = 1e4, 1e4
    got = ops.prefill_attention(q, k, v, kc, vc, p0, S, W, D ** -0.5, cached=True).float()
    assert calls == [p0 + T] and ops._fill_key(q, kc, vc, 1024) in ops._cudnn_warm.band
    err = (got - want).abs().max().item()
    rel_err = ((got - want).norm() / want.norm()).item()
    assert err < 5e-2 and rel_err < 1e-2, f"max error {err:.2e}, relative {rel_err:.2e}"
    if p0 > 0:
        kc32, vc32 = kc.float(), vc.float()
        narrow = ref.prefill_attention_ref(q.float(), k.float(), v.float(), kc32, vc32, p0, 0, (p0 + T) // 2,
                                           D ** -0.5)
        assert ((narrow - want).norm() / want.norm()).item() > 1e-2


@pytest.mark.parametrize("error", ["oom", "cudnn"])
@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
def test_band_failure_falls_back_to_the_ladder(monkeypatch, capsys, error):
    """A band call that fails leaves the chunk to the ladder (the same result as the reference); an out-of-memory
    error keeps the band on, a cuDNN error takes that plan out for the thread and says so on stderr once."""
    S, W, T, H, Hkv, D, p0 = 16, 256, 128, 4, 2, 64, 1000
    monkeypatch.setenv("AHN_RT_PREFILL_BAND", "1")
    monkeypatch.setattr(ops, "_cudnn_ok", True)
    q, k, v, kc, vc = _prefill_case(S, W, p0, T, H, Hkv, D, torch.bfloat16, "cuda", seed=7)
    key = ops._band_key(q, k, W)
    monkeypatch.setattr(ops._cudnn_warm, "band", {key}, raising=False)

    def fail(*a):
        raise torch.OutOfMemoryError("no memory") if error == "oom" else RuntimeError("cuDNN: boom\nmore")

    monkeypatch.setattr(ops, "_prefill_attention_band", fail)
    got = ops.prefill_attention(q, k, v, kc, vc, p0, S, W, D ** -0.5).float()
    want = ref.prefill_attention_ref(q.float(), k.float(), v.float(), kc.float(), vc.float(), p0, S, W, D ** -0.5)
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    assert (key in ops._cudnn_warm.band) == (error == "oom")
    assert ("cuDNN: boom); the prefill uses the ladder" in capsys.readouterr().err) == (error == "cudnn")


@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
def test_band_path_model_prefill_matches_fp32_cpu(monkeypatch):
    """A whole model's chunked prefill on the GPU (bf16, chunks of 16 past a window of 64 and 4 sinks: chunks
    from position 0 through the fill point to wrapped rings) with the band path on: the chunks that fill the
    cache in order took the fill call, the one across the fill point the ladder, the rest the band (spied); and
    its logits are as close to the float32 CPU model's as the CPU bf16 model's are (the calibrated budget of
    test_cuda_model.py), and close to the ladder's."""
    from ahn_rt.init_weights import random_state_dict
    from ahn_rt.runtime import from_state_dict
    try:
        torch.ops.ahn_rt.band_attention(*_inputs(4, 8, 2, 1, 64, torch.bfloat16, "cuda"), 0, 0.125)
    except RuntimeError as e:
        if "without cudnn-frontend" in str(e):
            pytest.skip("this build has no cuDNN band attention")
        raise
    cfg = dict(model_type="qwen2", hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
               num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=1000,
               tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=4096,
               _ahn_implementation="GatedDeltaNet", eos_token_id=[])
    W, S, C = 64, 4, 16
    sd = random_state_dict(cfg, seed=0, dtype=torch.float32, ahn=True, std=0.05)
    ids = torch.randint(0, cfg["vocab_size"], (C * 20,), generator=torch.Generator().manual_seed(3))

    def logits(dtype, device):
        m = from_state_dict(cfg, {k: v.to(device) for k, v in sd.items()}, window=W, sinks=S, mode="ahn",
                            dtype=dtype, device=device)
        if device == "cuda":
            m.decoder.warm_attention(C)
        return m.new_session(chunk_size=C).forward(ids).float().cpu()

    rel = lambda a, b: float((a - b).norm() / b.norm())
    monkeypatch.setattr(ops, "_cudnn_ok", True)
    monkeypatch.setenv("AHN_RT_PREFILL_BAND", "0")
    ladder = logits("bf16", "cuda")
    monkeypatch.setenv("AHN_RT_PREFILL_BAND", "1")
    calls, real = [], ops._prefill_attention_band
    monkeypatch.setattr(ops, "_prefill_attention_band", lambda *a: calls.append(a[5]) or real(*a))
    fills, real_fill = [], ops._prefill_attention_fill
    monkeypatch.setattr(ops, "_prefill_attention_fill", lambda *a: fills.append(a[3]) or real_fill(*a))
    band = logits("bf16", "cuda")
    assert len(calls) == 3 * 15   # every layer's chunks from p0 = 80 on (p0 >= S + W - 1 = 67)
    # the warm-up's call (16 keys), then every layer's chunks that fill in order (p0 + 16 <= S + W = 68)
    assert fills == [16] + [n for n in (16, 32, 48, 64) for _ in range(3)]
    ref32, ref16 = logits("float32", "cpu"), logits("bf16", "cpu")
    err, err_cpu = rel(band, ref32), rel(ref16, ref32)
    assert err < 1.25 * err_cpu + 2e-3 and err < 5e-2, (err, err_cpu)
    assert rel(band, ladder) < 2e-2
