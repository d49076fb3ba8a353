"""The prefill path's ops against their references.

* ``gdn_chunk_scan`` (compiled: C++ on the CPU, CUDA) vs ``ref.gdn_chunk_scan_ref``, and opcheck;
* ``gdn_chunk_prep`` (compiled: C++ on the CPU, CUDA) vs ``ref.gdn_chunk_prep_ref`` at odd sizes, GQA,
  strided and low-precision inputs, strong decays, and opcheck;
* ``ref.gdn_chunk_blocks`` (chunk-local work batched, the scan sequential: what ``ops.gdn_chunk`` runs)
  vs the chunk-at-a-time ``ref.gdn_chunk_ref`` and the token-by-token ``ref.gdn_recurrent_ref``, at odd
  lengths, carrying the state across calls;
* ``rope`` and ``gdn_gate_norm`` (compiled, CPU and CUDA) vs ``ref.rope_ref`` / ``ref.gdn_gate_norm_ref``, and
  ``ops.gdn_output`` vs ``ref.gdn_output_ref``;
* ``ops.prefill_attention`` on CUDA (FlashAttention-2 per key range, merged by log-sum-exp) vs
  ``ref.prefill_attention_ref``, over states before, at and past the fill point, chunks longer than the
  window, chunks that are all sinks, S = 0 and W = 1.
Each tolerance test also shows that a slightly wrong input (one token's decay, a window off by one)
fails the same bound.
"""
from __future__ import annotations

import pytest
import torch

import ahn_rt._C  # noqa: F401
import ahn_rt._meta  # noqa: F401
from ahn_rt import cache, ops, ref

_NO_GPU = not torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(_NO_GPU, reason="no GPU")])]
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(_NO_GPU, reason="no GPU")]


def _scan_inputs(H, N, Dk, Dv, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = ref.GDN_CHUNK
    r = lambda *s, sc=0.1: (torch.randn(*s, generator=g) * sc).to(device)
    w, qg = r(H, N, C, Dk), r(H, N, C, Dk)
    u = r(H, N, C, Dv, sc=1.0)
    kd_t = r(H, N, Dk, C)
    gl = torch.rand(H, N, generator=g).to(device) * 0.5 + 0.5
    state = r(H, Dk, Dv, sc=0.5)
    return w, u, kd_t, qg, gl, state


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,N,Dk,Dv", [(1, 1, 4, 4), (3, 5, 12, 20), (2, 3, 128, 128), (4, 2, 64, 100),
                                     (1, 3, 16, 24), (2, 2, 48, 16)])
def test_gdn_chunk_scan_matches_reference(device, H, N, Dk, Dv):
    """Against the float32 reference at 1e-5: on CUDA, Dk a multiple of 16 takes the tensor-core kernel
    (split tf32 operands), other Dk the CUDA-core one."""
    w, u, kd_t, qg, gl, state = _scan_inputs(H, N, Dk, Dv, device)
    s_ref, s_op = state.clone(), state.clone()
    vn_ref, oi_ref = ref.gdn_chunk_scan_ref(w, u, kd_t, qg, gl, s_ref)
    vn, oi = torch.ops.ahn_rt.gdn_chunk_scan(w, u, kd_t, qg, gl, s_op)
    for got, want, what in ((vn, vn_ref, "v_new"), (oi, oi_ref, "o_inter"), (s_op, s_ref, "state")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=what)
    # The bound catches one chunk's decay being wrong (a scan that skips or repeats a gl factor).
    gl_bad = gl.clone()
    gl_bad[0, -1] *= 0.99
    s_bad = state.clone()
    ref.gdn_chunk_scan_ref(w, u, kd_t, qg, gl_bad, s_bad)
    assert (s_bad - s_ref).abs().max() > 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Dk", [64, 128])
def test_gdn_chunk_scan_long_prompt(device, Dk):
    """A 40-chunk scan (2560 evicted tokens) of real GatedDeltaNet inputs (gdn_chunk_prep_ref of normalized
    keys, so the state stays bounded as in a model) against the reference at 1e-5: the error of the
    tensor-core kernel's split tf32 products does not grow along the recurrence."""
    n, H, Dv = 40 * ref.GDN_CHUNK, 2, 128
    q, k, v, beta, alpha = _prep_inputs(n, H, H, Dk, Dv, torch.float32, "cpu")
    w, u, kd_t, qg, gl, _ = ref.gdn_chunk_prep_ref(q, k, v, beta, alpha, Dk ** -0.5)
    w, u, kd_t, qg, gl = (t.to(device) for t in (w, u, kd_t, qg, gl))
    state = (torch.randn(H, Dk, Dv, generator=torch.Generator().manual_seed(5)) * 0.1).to(device)
    s_ref, s_op = state.clone(), state.clone()
    vn_ref, oi_ref = ref.gdn_chunk_scan_ref(w, u, kd_t, qg, gl, s_ref)
    vn, oi = torch.ops.ahn_rt.gdn_chunk_scan(w, u, kd_t, qg, gl, s_op)
    assert s_ref.abs().max() < 100   # bounded: the check below is at the scale of the values
    for got, want, what in ((vn, vn_ref, "v_new"), (oi, oi_ref, "o_inter"), (s_op, s_ref, "state")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("device", DEVICES)
def test_gdn_chunk_scan_opcheck(device):
    w, u, kd_t, qg, gl, state = _scan_inputs(2, 3, 16, 8, device)
    torch.library.opcheck(torch.ops.ahn_rt.gdn_chunk_scan.default, (w, u, kd_t, qg, gl, state))


def test_gdn_chunk_scan_rejects_bad_shapes():
    w, u, kd_t, qg, gl, state = _scan_inputs(2, 3, 8, 8, "cpu")
    with pytest.raises(RuntimeError, match="kd_t must be"):
        torch.ops.ahn_rt.gdn_chunk_scan(w, u, kd_t.transpose(-1, -2).contiguous()[..., :5], qg, gl, state)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.ahn_rt.gdn_chunk_scan(w.double(), u, kd_t, qg, gl, state)


def _prep_inputs(n, H, Hkv, Dk, Dv, dtype, device, decay=0.3, seed=0):
    """q as a strided view of a wider projection (the model passes such views), k/v/beta in the model
    dtype, alpha float32 (the gates' dtypes in the ring)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(n, H * Dk + 8, generator=g).to(device, dtype)
    q = proj[:, 8:].view(n, H, Dk)
    k = torch.randn(n, Hkv, Dk, generator=g).to(device, dtype)
    v = torch.randn(n, Hkv, Dv, generator=g).to(device, dtype)
    beta = torch.rand(n, H, generator=g).to(device, dtype)
    alpha = (-torch.rand(n, H, generator=g) * decay).to(device)
    return q, k, v, beta, alpha


PREP_NAMES = ("w", "u", "kd_t", "qg", "gl", "P")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,H,Hkv,Dk,Dv,dtype,decay", [
    (1, 1, 1, 4, 4, torch.float32, 0.3), (63, 4, 2, 12, 20, torch.float32, 0.3),
    (64, 2, 2, 16, 8, torch.float32, 0.3), (65, 3, 1, 48, 40, torch.bfloat16, 0.3),
    (200, 4, 2, 128, 128, torch.bfloat16, 0.3), (130, 2, 1, 64, 100, torch.float16, 0.3),
    (129, 2, 2, 32, 32, torch.float32, 8.0)])   # strong decay: e^G underflows inside a chunk
def test_gdn_chunk_prep_matches_reference(device, n, H, Hkv, Dk, Dv, dtype, decay):
    q, k, v, beta, alpha = _prep_inputs(n, H, Hkv, Dk, Dv, dtype, device, decay)
    scale = Dk ** -0.5
    want = ref.gdn_chunk_prep_ref(q, k, v, beta, alpha, scale)
    got = torch.ops.ahn_rt.gdn_chunk_prep(q, k, v, beta, alpha, scale)
    for g_, w_, what in zip(got, want, PREP_NAMES):
        assert g_.dtype == torch.float32 and g_.shape == w_.shape, what
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5, msg=what)
    # The bound catches one token's decay off by 1% (u and P move past it).
    alpha_bad = alpha.clone()
    alpha_bad[n // 2] *= 1.01
    bad = ref.gdn_chunk_prep_ref(q, k, v, beta, alpha_bad, scale)
    assert max((b - w_).abs().max().item() for b, w_ in zip(bad, want)) > 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_gdn_chunk_prep_opcheck(device):
    q, k, v, beta, alpha = _prep_inputs(70, 4, 2, 16, 8, torch.float32, device)
    torch.library.opcheck(torch.ops.ahn_rt.gdn_chunk_prep.default, (q, k, v, beta, alpha, 0.25))


def test_gdn_chunk_prep_rejects_bad_inputs():
    q, k, v, beta, alpha = _prep_inputs(10, 4, 2, 16, 8, torch.float32, "cpu")
    op = torch.ops.ahn_rt.gdn_chunk_prep
    with pytest.raises(RuntimeError, match="must be \\[n, H, Dk\\]"):
        op(q, k[:9], v, beta, alpha, 0.25)
    with pytest.raises(RuntimeError, match="share one dtype"):
        op(q, k.bfloat16(), v, beta, alpha, 0.25)
    with pytest.raises(RuntimeError, match="multiple of the kv heads"):
        op(q[:, :3], k, v, beta[:, :3], alpha[:, :3], 0.25)
    with pytest.raises(RuntimeError, match="beta must be"):
        op(q, k, v, beta[:, :2], alpha, 0.25)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,nh,D", [(1, 1, 2), (37, 3, 48), (130, 16, 128)])
def test_rope_matches_reference_bit_for_bit(device, dtype, T, nh, D):
    """Every op rounded as torch rounds it: the compiled RoPE equals the reference exactly (the decode
    front's RoPE is tested against the same reference, so prefill and decode keys agree bit for bit)."""
    g = torch.Generator().manual_seed(T)
    proj = torch.randn(T, nh * D + 6, generator=g).to(device, dtype)
    x = proj[:, 6:].view(T, nh, D)                                      # strided, as the model passes it
    pos = torch.arange(1000, 1000 + T, device=device)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=device).float() / D))
    cos, sin = ref.rope_cos_sin_ref(pos, inv_freq, dtype)
    got = torch.ops.ahn_rt.rope(x, cos, sin)
    want = ref.rope_ref(x, cos, sin)
    assert got.is_contiguous() and torch.equal(got, want)
    # A rotation of the wrong half (pairs i with i + 1) is caught.
    assert not torch.equal(ref.rope_ref(x.roll(1, -1), cos, sin), want)


def test_rope_rejects_bad_inputs():
    x = torch.randn(4, 2, 8)
    cos, sin = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="D even"):
        torch.ops.ahn_rt.rope(torch.randn(4, 2, 7), cos[:, :7], sin[:, :7])
    with pytest.raises(RuntimeError, match="cos must be"):
        torch.ops.ahn_rt.rope(x, cos[:3], sin)
    with pytest.raises(RuntimeError, match="x's dtype"):
        torch.ops.ahn_rt.rope(x, cos.bfloat16(), sin)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,H,D", [(1, 1, 8), (45, 3, 40), (70, 16, 128)])
def test_gdn_gate_norm_and_output_match_reference(device, dtype, n, H, D):
    g = torch.Generator().manual_seed(n)
    o = (torch.randn(n, H, D + 3, generator=g) * 3).to(device, dtype)[..., :D]   # strided rows
    z = torch.randn(n, H, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(device, dtype)
    o_proj = (torch.randn(H, D, D, generator=g) * D ** -0.5).to(device, dtype)
    eps = 1e-5
    want = ref.gdn_gate_norm_ref(o, z, w, eps)
    got = torch.ops.ahn_rt.gdn_gate_norm(o, z, w, eps)
    # float32: summation order only; bf16/fp16: at most one rounding step of the output dtype.
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=torch.finfo(dtype).eps, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    # The bound catches a norm over the wrong extent (all heads of a row, Mamba2's rule).
    of = o.float()
    wrong = (of * torch.rsqrt(of.pow(2).mean((-2, -1), keepdim=True) + eps) * w.float()
             * z.float()[..., None] * torch.sigmoid(z.float()[..., None])).to(dtype)
    if H > 1:
        assert not torch.allclose(wrong.float(), want.float(), **tol)
    m_want = ref.gdn_output_ref(o, z, w, o_proj, eps)
    m_got = ops.gdn_output(o, z, w, o_proj, eps)
    assert m_got.shape == m_want.shape and m_got.dtype == m_want.dtype
    torch.testing.assert_close(m_got.float(), m_want.float(), rtol=4 * tol["rtol"], atol=4 * tol["atol"] + 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,H,D", [(1, 1, 8), (45, 3, 40), (70, 16, 128)])
@pytest.mark.parametrize("cpu_fast_bf16", [False, True])
def test_memory_output_heads_match_reference(monkeypatch, device, dtype, n, H, D, cpu_fast_bf16):
    """The grouped o_proj of both output heads (ops.gdn_output, ops.mamba2_output: float32 on a CPU
    without a fast half-precision GEMM, else in the input dtype) against the references' einsum: float32
    within summation order, bf16/fp16 within a few roundings. Negative control: each head's o_proj
    transposed fails the bound."""
    monkeypatch.setattr(ops, "_cpu_bf16_gemm", lambda: cpu_fast_bf16)
    g = torch.Generator().manual_seed(n)
    o = (torch.randn(n, H, D, generator=g) * 3).to(device, dtype)
    z = torch.randn(n, H, generator=g).to(device, dtype)
    o_proj = (torch.randn(H, D, D, generator=g) * D ** -0.5).to(device, dtype)
    eps = 1e-5
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=4 * torch.finfo(dtype).eps,
                                                                         atol=2e-2)
    for w, got_fn, want_fn in ((1 + 0.1 * torch.randn(D, generator=g), ops.gdn_output, ref.gdn_output_ref),
                               (1 + 0.1 * torch.randn(H * D, generator=g), ops.mamba2_output,
                                ref.mamba2_output_ref)):
        w = w.to(device, dtype)
        want = want_fn(o, z, w, o_proj, eps)
        got = got_fn(o, z, w, o_proj, eps)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), **tol)
        if D > 1:
            wrong = got_fn(o, z, w, o_proj.transpose(1, 2), eps)
            assert not torch.allclose(wrong.float(), want.float(), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_fused_opcheck(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, generator=g).to(device)
    cos, sin = torch.randn(5, 8, generator=g).to(device), torch.randn(5, 8, generator=g).to(device)
    torch.library.opcheck(torch.ops.ahn_rt.rope.default, (x, cos, sin))
    o, z, w = torch.randn(6, 2, 8).to(device), torch.randn(6, 2).to(device), torch.randn(8).to(device)
    torch.library.opcheck(torch.ops.ahn_rt.gdn_gate_norm.default, (o, z, w, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,H,Hkv,Dk,Dv,dtype,dt_scale", [
    (1, 1, 1, 4, 4, torch.float32, 1.0), (63, 4, 2, 12, 20, torch.float32, 1.0),
    (130, 4, 2, 128, 128, torch.float32, 1.0), (65, 3, 1, 48, 40, torch.bfloat16, 1.0),
    (10, 2, 1, 16, 16, torch.float16, 1.0),      # fp16: eps rounds to 0, the padding rows must stay 0
    (129, 2, 2, 32, 32, torch.float32, 40.0)])   # strong decay: e^G underflows in float32 inside a block
def test_mamba2_chunk_prep_matches_reference(device, n, H, Hkv, Dk, Dv, dtype, dt_scale):
    q, k, v, _, _ = _prep_inputs(n, H, Hkv, Dk, Dv, dtype, device)
    g = torch.Generator().manual_seed(n)
    dt = (dt_scale * torch.rand(n, H, generator=g)).to(device)
    a_log = torch.log(1 + 3 * torch.rand(H, generator=g)).to(device)
    want = ref.mamba2_chunk_prep_ref(q, k, v, dt, a_log)
    got = torch.ops.ahn_rt.mamba2_chunk_prep(q, k, v, dt, a_log)
    # float32: summation order only. bf16: q/k are normalized in bf16 as F.normalize does, and a norm whose
    # float32 sum lands on a bf16 rounding boundary may round the other way (one bf16 step in that row).
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-4)
    for g_, w_, what in zip(got, want, PREP_NAMES[1:]):
        assert g_.dtype == torch.float32 and g_.shape == w_.shape and torch.isfinite(g_).all(), what
        torch.testing.assert_close(g_, w_, msg=what, **tol)
    # The bound catches one token's dt off by 5% (u, the decays and P move past it).
    dt_bad = dt.clone()
    dt_bad[n // 2] *= 1.05
    bad = ref.mamba2_chunk_prep_ref(q, k, v, dt_bad, a_log)
    assert any(not torch.allclose(b, w_, **tol) for b, w_ in zip(bad, want))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory", ["gdn", "mamba2"])
@pytest.mark.parametrize("n", [300, 256, 129])
def test_memory_prefill_in_token_blocks_is_bit_exact(monkeypatch, device, memory, n):
    """ops.gdn_chunk / mamba2_chunk run a long run of tokens in blocks of ops._MEMORY_BLOCK (chunk aligned,
    the state carried in place): outputs and final state equal one call, a last partial block included:
    bit for bit on the CPU, within float32 rounding of one batched GEMM on CUDA. Blocks that drop the
    state between them fail the check."""
    assert ops._MEMORY_BLOCK % ref.GDN_CHUNK == 0
    q, k, v, beta, alpha = _prep_inputs(n, 4, 2, 32, 16, torch.bfloat16, device, seed=n)
    g = torch.Generator().manual_seed(1)
    state0 = (torch.randn(4, 32, 16, generator=g) * 0.1).to(device)
    a_log = torch.log(1 + 3 * torch.rand(4, generator=g)).to(device)
    dt = torch.rand(n, 4, generator=g).to(device)

    def run(block, lo=0, hi=n, state=None):
        monkeypatch.setattr(ops, "_MEMORY_BLOCK", block)
        state = state0.clone() if state is None else state
        if memory == "gdn":
            o = ops.gdn_chunk(q[lo:hi], k[lo:hi], v[lo:hi], beta[lo:hi], alpha[lo:hi], state)
        else:
            o = ops.mamba2_chunk(q[lo:hi], k[lo:hi], v[lo:hi], dt[lo:hi], a_log, state)
        return o, state

    o1, s1 = run(1 << 30)
    b = 2 * ref.GDN_CHUNK
    o2, s2 = run(b)
    assert o2.shape == o1.shape and o2.dtype == o1.dtype
    if device == "cpu":
        assert torch.equal(o2, o1) and torch.equal(s2, s1)
    else:   # one bf16 step of the output at most, the float32 state to rounding
        torch.testing.assert_close(o2.float(), o1.float(), rtol=8e-3, atol=1e-5)
        torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-6)
    # Blocks that do not carry the state from one to the next fail the check.
    o3 = torch.cat([run(1 << 30, lo, min(n, lo + b))[0] for lo in range(0, n, b)])
    assert not torch.equal(o3, o1)


@pytest.mark.parametrize("device", DEVICES)
def test_gdn_chunk_scan_without_delta(device):
    """w = None (Mamba2's rule): v_new = u, and the state and o_inter as the reference computes them."""
    w, u, kd_t, qg, gl, state = _scan_inputs(3, 4, 16, 24, device)
    s_ref, s_op = state.clone(), state.clone()
    vn_ref, oi_ref = ref.gdn_chunk_scan_ref(None, u, kd_t, qg, gl, s_ref)
    vn, oi = torch.ops.ahn_rt.gdn_chunk_scan(None, u, kd_t, qg, gl, s_op)
    assert torch.equal(vn, u) and torch.equal(vn_ref, u)
    torch.testing.assert_close(oi, oi_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_op, s_ref, rtol=1e-5, atol=1e-5)
    # with the delta correction the state differs: the flag is not a no-op
    s_delta = state.clone()
    ref.gdn_chunk_scan_ref(w, u, kd_t, qg, gl, s_delta)
    assert (s_delta - s_ref).abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_mamba2_chunk_prep_opcheck(device):
    q, k, v, _, _ = _prep_inputs(70, 4, 2, 16, 8, torch.float32, device)
    dt = torch.rand(70, 4).to(device)
    a_log = torch.rand(4).to(device)
    torch.library.opcheck(torch.ops.ahn_rt.mamba2_chunk_prep.default, (q, k, v, dt, a_log))


def test_mamba2_chunk_prep_rejects_bad_inputs():
    q, k, v, _, _ = _prep_inputs(10, 4, 2, 16, 8, torch.float32, "cpu")
    op = torch.ops.ahn_rt.mamba2_chunk_prep
    with pytest.raises(RuntimeError, match="a_log must be \\[4\\]"):
        op(q, k, v, torch.rand(10, 4), torch.rand(10, 4))
    with pytest.raises(RuntimeError, match="dt must be"):
        op(q, k, v, torch.rand(10, 3), torch.rand(4))


def _gdn_feed(n, H, Hkv, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, H, D, generator=g, dtype=dtype)
    k = torch.randn(n, Hkv, D, generator=g, dtype=dtype)
    v = torch.randn(n, Hkv, D, generator=g, dtype=dtype)
    beta = torch.rand(n, H, generator=g, dtype=dtype)
    alpha = -torch.rand(n, H, generator=g, dtype=torch.float64).to(torch.float32) * 0.3
    return q, k, v, beta, alpha


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", [[1], [63, 1, 65], [200], [64, 64, 7]])
def test_gdn_chunk_blocks_matches_recurrence(device, lengths):
    """ops.gdn_chunk (batched chunk-local work + the compiled scan) carries the state across calls and
    equals the token-by-token recurrence in float32."""
    H, Hkv, D = 4, 2, 16
    q, k, v, beta, alpha = (t.float() for t in _gdn_feed(sum(lengths), H, Hkv, D, seed=len(lengths)))
    s_rec = torch.zeros(H, D, D)
    want = ref.gdn_recurrent_ref(q, k, v, beta, alpha, s_rec)
    s_op = torch.zeros(H, D, D, device=device)
    outs, at = [], 0
    for n in lengths:
        sl = slice(at, at + n)
        outs.append(ops.gdn_chunk(*(t[sl].to(device) for t in (q, k, v, beta, alpha)), s_op))
        at += n
    got = torch.cat(outs).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_op.cpu(), s_rec, rtol=1e-5, atol=1e-5)
    # One token's write strength off by 1% moves the outputs past the same bound.
    beta_bad = beta.clone()
    beta_bad[-1] *= 1.01
    bad = ref.gdn_recurrent_ref(q, k, v, beta_bad, alpha, torch.zeros(H, D, D))
    assert (bad - want).abs().max() > 1e-4


def test_gdn_chunk_blocks_matches_chunk_reference():
    """The batched form and the chunk-at-a-time reference are the same algebra: both float32, they agree
    far inside the recurrence bound (here at the 3B head size over 3 chunks and a tail)."""
    H, Hkv, D, n = 2, 1, 128, 200
    q, k, v, beta, alpha = (t.float() for t in _gdn_feed(n, H, Hkv, D, seed=5))
    s1, s2 = torch.zeros(H, D, D), torch.zeros(H, D, D)
    want = ref.gdn_chunk_ref(q, k, v, beta, alpha, s1)
    got = ref.gdn_chunk_blocks(q, k, v, beta, alpha, s2)
    assert (got - want).abs().max() < 2e-6 and (s2 - s1).abs().max() < 2e-6


# ---- prefill attention -------------------------------------------------------------------------
def _attention_case(S, W, p0, T, H=4, Hkv=2, D=64, dtype=torch.bfloat16, device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    C = S + W
    k_cache = torch.randn(Hkv, C, D, generator=g).to(device, dtype)
    v_cache = torch.randn(Hkv, C, D, generator=g).to(device, dtype)
    q = torch.randn(T, H, D, generator=g).to(device, dtype)
    k = torch.randn(T, Hkv, D, generator=g).to(device, dtype)
    v = torch.randn(T, Hkv, D, generator=g).to(device, dtype)
    return q, k, v, k_cache, v_cache


ATTN_CASES = [  # (S, W, p0, T)
    (0, 8, 0, 5), (4, 16, 0, 3), (4, 16, 0, 30), (4, 16, 2, 9), (4, 16, 19, 6), (4, 16, 20, 5),
    (4, 16, 37, 11), (4, 16, 45, 40), (0, 1, 9, 4), (3, 1, 3, 5), (2, 300, 1000, 257), (128, 1000, 5000, 700),
    (16, 64, 70, 1),
]


def test_prefill_attention_reference_matches_window_attention():
    """The reference reads the ring through held_positions: the same as window_attention_ref over the
    concatenation the State used to build (CPU, float32)."""
    for S, W, p0, T in ATTN_CASES[:9]:
        q, k, v, kc, vc = _attention_case(S, W, p0, T, dtype=torch.float32, device="cpu")
        held = cache.held_positions(p0, S, W)
        n = held.numel()
        qp = torch.arange(p0, p0 + T)
        want = ref.window_attention_ref(q, torch.cat([kc[:, :n].transpose(0, 1), k]),
                                        torch.cat([vc[:, :n].transpose(0, 1), v]), qp, torch.cat([held, qp]),
                                        S, W, 0.125)
        got = ref.prefill_attention_ref(q, k, v, kc, vc, p0, S, W, 0.125)
        assert torch.equal(got, want)


@pytest.mark.parametrize("block", [3, 128])
@pytest.mark.parametrize("S,W,p0,T", ATTN_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("H,Hkv", [(4, 2), (3, 1)])
def test_prefill_attention_cpu_blocks_match_reference(monkeypatch, S, W, p0, T, dtype, block, H, Hkv):
    """The CPU path (query blocks over only the keys the rule can let through, heads of a kv head sharing
    its keys) against the reference, which scores every query against every key: float32 within 1e-5, bf16
    within one rounding of the output. Blocks of 3 queries cut every case's windows and sinks at odd
    places. Negative control: the same comparison with the window one key narrower fails wherever a
    query's window is full."""
    monkeypatch.setattr(ops, "_BLOCK_QUERIES", block)
    q, k, v, kc, vc = _attention_case(S, W, p0, T, H=H, Hkv=Hkv, D=16, dtype=dtype, device="cpu")
    got = ops.prefill_attention(q, k, v, kc, vc, p0, S, W, 0.25)
    want = ref.prefill_attention_ref(q, k, v, kc, vc, p0, S, W, 0.25)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **tol)
    if W > 1 and p0 + T > W + S:
        narrow = ops._prefill_attention_blocks(q, k, v, kc, vc, p0, S, W - 1, 0.25)
        assert not torch.allclose(narrow.float(), want.float(), **tol)


@pytest.mark.parametrize("S,W,p0,T", ATTN_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
def test_prefill_attention_cuda_matches_reference(S, W, p0, T, dtype, D):
    q, k, v, kc, vc = _attention_case(S, W, p0, T, D=D, dtype=dtype, seed=p0 + T)
    scale = D ** -0.5
    got = ops.prefill_attention(q, k, v, kc, vc, p0, S, W, scale).float()
    want = ref.prefill_attention_ref(q.float(), k.float(), v.float(), kc.float(), vc.float(), p0, S, W, scale)
    # The ops tests' tolerance rows (tests/test_ops.py TOL): the kernels round P to the dtype before P @ V
    # and each partial output once more before the merge.
    atol, rel = {torch.bfloat16: (5e-2, 1e-2), torch.float16: (5e-3, 3e-3), torch.float32: (1e-3, 1e-4)}[dtype]
    err = (got - want).abs().max().item()
    rel_err = ((got - want).norm() / want.norm()).item()
    assert err < atol and rel_err < rel, f"max error {err:.2e}, relative {rel_err:.2e}"
    # A window narrower by W/8 (at least one token) fails the same bound (the check can fail).
    if p0 + T > S + W and W > 1:
        narrow = ref.prefill_attention_ref(q.float(), k.float(), v.float(), kc.float(), vc.float(), p0, S,
                                           W - max(1, W // 8), scale)
        assert ((narrow - want).norm() / want.norm()).item() > rel


@pytest.mark.parametrize("p0", [0, 1024, 3000, 4224, 5000, 9000])
@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
def test_prefill_attention_cudnn_matches_reference(monkeypatch, p0):
    """With AHN_RT_PREFILL_CUDNN=1 and the plans warmed (``warm_prefill_attention``): a whole chunk's unmasked
    blocks run through cuDNN, in no shape (or stride) the warm-up did not build, and the result matches the
    reference within the bf16 bound of test_prefill_attention_cuda_matches_reference, before and after the
    ring's fill point (S + W = 4224) and wrapped."""
    S, W, T, H, Hkv, D = 128, 4096, 1024, 8, 2, 128
    monkeypatch.setenv("AHN_RT_PREFILL_CUDNN", "1")
    monkeypatch.setenv("AHN_RT_PREFILL_BAND", "0")   # the ladder (the band path: tests/test_band_attention.py)
    monkeypatch.setattr(ops, "_cudnn_ok", True)
    monkeypatch.setattr(ops._cudnn_warm, "keys", set(), raising=False)
    monkeypatch.setattr(ops._cudnn_warm, "reversed", set(), raising=False)
    seen, real = [], ops._cudnn

    def spy(q, k, v, causal, scale, stacked=None):
        # what reaches cuDNN: a causal call makes q, k and v contiguous first, so only their shapes count
        strides = () if causal else (q.stride(), k.stride(), v.stride())
        seen.append((q.shape, k.shape, strides, causal))
        return real(q, k, v, causal, scale, stacked)

    monkeypatch.setattr(ops, "_cudnn", spy)
    assert ops.warm_prefill_attention(H, Hkv, D, torch.bfloat16, "cuda", T, S, W)
    warmed = set(seen)
    # the rungs that fit, the causal chunk and the reversed far-edge band
    assert len(warmed) == sum(m <= S + W for m in ops._CUDNN_LADDER) + 2
    seen.clear()
    q, k, v, kc, vc = _attention_case(S, W, p0, T, H=H, Hkv=Hkv, D=D, seed=p0 + 1)
    got = ops.prefill_attention(q, k, v, kc, vc, p0, S, W, D ** -0.5).float()
    assert ops._cudnn_ok and set(seen) <= warmed
    planned = sum(c[-1] in ("cudnn", "cudnn_rev") for c in ops._kernel_calls(p0, T, S, W, True, T))
    assert len(seen) == planned and (planned > 0) == (p0 > 0)
    want = ref.prefill_attention_ref(q.float(), k.float(), v.float(), kc.float(), vc.float(), p0, S, W, D ** -0.5)
    err = (got - want).abs().max().item()
    rel_err = ((got - want).norm() / want.norm()).item()
    assert err < 5e-2 and rel_err < 1e-2, f"max error {err:.2e}, relative {rel_err:.2e}"
    if p0 + T > S + W:   # a window narrower by W/8 fails the same bound (the check can fail)
        narrow = ref.prefill_attention_ref(q.float(), k.float(), v.float(), kc.float(), vc.float(), p0, S,
                                           W - W // 8, D ** -0.5)
        assert ((narrow - want).norm() / want.norm()).item() > 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
def test_cudnn_causal_takes_the_kv_heads_as_they_are(monkeypatch):
    """The causal cuDNN call (a chunk's own keys) passes the Hkv key / value heads without repeating them:
    the same bits as the keys repeated per query head (the fallback where cuDNN refuses that), and not those
    of the other head mapping (query head h reading kv head h % Hkv), so the check can fail."""
    T, H, Hkv, D = 256, 8, 2, 128
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(T, h, D, generator=g, device="cuda").to(torch.bfloat16) for h in (H, Hkv, Hkv))
    monkeypatch.setattr(ops, "_cudnn_gqa", True)
    try:
        out, lse = ops._cudnn(q, k, v, True, D ** -0.5)
    except RuntimeError:
        pytest.skip("this torch's cuDNN attention refuses these calls")
    if not ops._cudnn_gqa:
        pytest.skip("this cuDNN refuses fewer key heads than query heads (the repeated keys ran)")
    monkeypatch.setattr(ops, "_cudnn_gqa", False)
    out_r, lse_r = ops._cudnn(q, k, v, True, D ** -0.5)
    assert torch.equal(out, out_r) and torch.equal(lse, lse_r)
    other, _ = ops._cudnn(q, k.repeat(1, H // Hkv, 1), v.repeat(1, H // Hkv, 1), True, D ** -0.5)   # h % Hkv
    assert not torch.equal(out, other)


def test_warm_prefill_attention_is_off_where_it_does_not_apply(monkeypatch):
    """No cuDNN plans on the CPU, in float32, or with the switch off: the warm-up says so."""
    monkeypatch.setattr(ops, "_cudnn_ok", True)
    monkeypatch.setenv("AHN_RT_PREFILL_CUDNN", "1")
    assert not ops.warm_prefill_attention(4, 2, 64, torch.bfloat16, "cpu", 64, 4, 100)
    if not _NO_GPU:
        assert not ops.warm_prefill_attention(4, 2, 64, torch.float32, "cuda", 64, 4, 100)
        monkeypatch.setenv("AHN_RT_PREFILL_CUDNN", "0")
        assert not ops.warm_prefill_attention(4, 2, 64, torch.bfloat16, "cuda", 64, 4, 100)


# ---- the two fused elementwise steps -----------------------------------------------------------
def _merge_case(dtype, device, H=3, D=40, rows=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    spans = [(0, 23), (5, 10), (0, 9), (20, 3), (7, 16)]     # (offset, n): rows covered 1 to 4 times
    outs = [torch.randn(n, H, D, generator=g).to(device, dtype) for _, n in spans]
    lses = [(torch.randn(H, n, generator=g) * 3).to(device) for _, n in spans]
    return outs, lses, [o for o, _ in spans], rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [40, 36, 128])
def test_attn_merge_matches_reference(device, dtype, D):
    """D = 40 and 128 take the CUDA kernel's 16-byte vectors; D = 36 in bf16 / fp16 its one-element path."""
    outs, lses, offs, rows = _merge_case(dtype, device, D=D)
    got = torch.ops.ahn_rt.attn_merge(outs, lses, offs, rows).float()
    want = ref.attn_merge_ref([o.double() for o in outs], [l.double() for l in lses], offs, rows).float()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    assert (got - want).abs().max().item() < tol
    # A part placed one row off fails the same bound.
    bad = ref.attn_merge_ref([o.double() for o in outs], [l.double() for l in lses], [offs[0], offs[1] + 1,
                             *offs[2:]], rows + 1)[:rows].float()
    assert (bad - want).abs().max().item() > tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["head_major", "odd_strides"])
def test_attn_merge_strided_parts_and_opcheck(device, layout):
    """Parts may be strided views: a [H, n, D] result seen as [n, H, D] (16-byte vectors on CUDA), or rows
    padded by one element (odd strides: the CUDA kernel's one-element path); opcheck the schema."""
    outs, lses, offs, rows = _merge_case(torch.float32, device)
    if layout == "head_major":
        outs = [o.transpose(0, 1).contiguous().transpose(0, 1) for o in outs]
    else:
        outs = [torch.nn.functional.pad(o, (0, 1))[..., :-1] for o in outs]
        assert outs[0].stride(1) % 2 == 1
    got = torch.ops.ahn_rt.attn_merge(outs, lses, offs, rows)
    torch.testing.assert_close(got, ref.attn_merge_ref(outs, lses, offs, rows), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.ahn_rt.attn_merge.default, (outs, lses, offs, rows))


@pytest.mark.parametrize("device", DEVICES)
def test_attn_merge_takes_as_many_parts_as_the_plan_gives(device):
    """A steady chunk of the 3B geometry is 9 to 11 kernel calls (ladder pieces, the band, the causal block):
    one merge takes them all (``_MERGE_PARTS``), every row covered by up to 16 parts; one part more is
    refused in one line."""
    g = torch.Generator().manual_seed(5)
    P, H, D, rows = ops._MERGE_PARTS, 2, 40, 19
    spans = [(0, rows)] * (P - 4) + [(3, 9), (0, 1), (18, 1), (7, 12)]
    outs = [torch.randn(n, H, D, generator=g).to(device) for _, n in spans]
    lses = [(torch.randn(H, n, generator=g) * 3).to(device) for _, n in spans]
    offs = [o for o, _ in spans]
    got = torch.ops.ahn_rt.attn_merge(outs, lses, offs, rows)
    want = ref.attn_merge_ref([o.double() for o in outs], [l.double() for l in lses], offs, rows).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dropped = ref.attn_merge_ref([o.double() for o in outs[:-1]], [l.double() for l in lses[:-1]], offs[:-1],
                                 rows).float()
    assert not torch.allclose(dropped, want, rtol=1e-3, atol=1e-3)   # the last part counts
    if device == "cpu":   # the host's check (a C++ exception from this extension kills a CUDA test process)
        with pytest.raises(RuntimeError, match=f"takes 1 to {P} parts"):
            torch.ops.ahn_rt.attn_merge(outs + outs[:1], lses + lses[:1], offs + offs[:1], rows)


def test_attn_merge_rejects_parts_outside_the_rows():
    outs, lses, offs, rows = _merge_case(torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.ahn_rt.attn_merge(outs, lses, offs, rows - 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, pad", [(45, 0), (64, 0), (64, 1)])
def test_silu_mul_matches_torch(device, dtype, n, pad):
    """N = 64 rows of 16-byte multiples take the CUDA kernel's vector path; N = 45, or rows padded by one
    element, its one-element path."""
    x = (torch.randn(7, 2 * n + pad, generator=torch.Generator().manual_seed(1)) * 4).to(device, dtype)
    x = x[:, :2 * n]
    got = torch.ops.ahn_rt.silu_mul(x)
    want = ref.silu_mul_ref(x)
    # Both round silu to the dtype, then the product: equal to an ulp of the dtype (exp may differ in
    # the last float bit).
    ulp = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=ulp)
    assert not torch.allclose(ref.silu_mul_ref(x.flip(1)).float(), want.float(), rtol=ulp, atol=ulp)
    torch.library.opcheck(torch.ops.ahn_rt.silu_mul.default, (x,))


def _check_calls(calls, S, W, p0, T):
    """Every (query, key) pair the rule allows is computed by exactly one of ``calls`` (entries of
    ``ops._attention_calls`` or ``ops._kernel_calls``), no call computes a pair the rule forbids, 'full' calls
    see every key for every query, 'causal' calls are square blocks of the chunk's own keys, and each
    'window' call's bounds are what FlashAttention-2 takes (0 or more, or -1). Raises AssertionError."""
    held = cache.held_positions(p0, S, W).tolist()
    n_keys = len(held) + T
    key_pos = held + list(range(p0, p0 + T))
    q_pos = torch.arange(p0, p0 + T)[:, None]
    kp = torch.tensor(key_pos)[None, :]
    allowed = (kp <= q_pos) & ((q_pos - kp < W) | (kp < S))
    count = torch.zeros(T, n_keys, dtype=torch.int64)
    for i_lo, i_hi, source, lo, n, kind, left, right, *_ in calls:
        base = 0 if source == "cache" else len(held)
        tq = i_hi - i_lo + 1
        i = torch.arange(tq)[:, None]
        j = torch.arange(n)[None, :]
        if kind == "full":
            sees = torch.ones(tq, n, dtype=torch.bool)
        elif kind == "causal":
            assert source == "chunk" and tq == n
            sees = j <= i
        else:
            assert left >= -1 and right >= 0
            # FlashAttention-2 reads a bound of n or more as no bound at all: model that here.
            left = -1 if left >= n else left
            right = -1 if right >= n else right
            lower = torch.full_like(i, -10**9) if left == -1 else i + (n - tq) - left
            upper = torch.full_like(i, 10**9) if right == -1 else i + (n - tq) + right
            sees = (j >= lower) & (j <= upper)
        assert bool(sees.any(1).all()), "a call has a query row that sees nothing"
        count[i_lo:i_hi + 1, base + lo: base + lo + n] += sees.long()
    assert int(count.max()) <= 1, "a pair is computed twice"
    assert torch.equal(count.bool(), allowed), "calls and rule disagree"


@pytest.mark.parametrize("S,W,p0,T", ATTN_CASES + [(4, 16, 60, 16), (4, 16, 61, 3), (0, 7, 100, 30), (5, 3, 0, 20)])
def test_attention_calls_cover_exactly_the_rule(S, W, p0, T):
    """The CUDA attention's kernel calls (CPU-checkable bookkeeping) against the rule: ``_check_calls``."""
    _check_calls(ops._attention_calls(p0, T, S, W), S, W, p0, T)


# (S, W, p0, T, chunk): odd sizes, the ring before, at and after its fill point and wrapped at several
# slots, T == chunk and T < chunk; the ladder below is the default one scaled down (rungs 8 * 2^i).
KERNEL_CASES = [
    (4, 100, 0, 64, 64), (4, 100, 3, 64, 64), (4, 100, 64, 64, 64), (4, 100, 104, 64, 64),
    (4, 100, 150, 64, 64), (4, 100, 1000, 64, 64), (4, 100, 1000, 40, 64), (4, 100, 1037, 64, 64),
    (0, 100, 333, 64, 64), (3, 37, 200, 30, 30), (3, 37, 200, 50, 50), (5, 61, 61, 61, 61),
    (7, 200, 517, 96, 96), (7, 200, 517, 95, 96), (1, 250, 7, 100, 100), (16, 129, 290, 129, 129),
    (2, 300, 1000, 257, 257), (128, 1000, 5000, 700, 700), (128, 1000, 5000, 700, 1024), (0, 8, 0, 5, 5),
    (4, 300, 1000, 64, 64),
]
SMALL_LADDER = (8, 16, 32, 64)


@pytest.mark.parametrize("cudnn", [False, True])
@pytest.mark.parametrize("S,W,p0,T,chunk", KERNEL_CASES)
def test_kernel_calls_cover_exactly_the_rule(S, W, p0, T, chunk, cudnn):
    """The final per-kernel plan (ladder pieces and all) covers the rule exactly (``_check_calls``); every
    cuDNN call is a whole chunk's (chunk queries) 'full' block of a ladder rung of cache keys, its
    chunk x chunk causal block, or the (chunk - 1)-square band at the window's far edge (reversed causal);
    without cuDNN the plan is ``_attention_calls`` on FlashAttention-2."""
    calls = ops._kernel_calls(p0, T, S, W, cudnn, chunk, SMALL_LADDER)
    _check_calls(calls, S, W, p0, T)
    for i_lo, i_hi, source, lo, n, kind, left, right, backend in calls:
        assert backend in ("cudnn", "cudnn_rev", "flash")
        if backend == "cudnn_rev":   # the far-edge band: an upper triangle of chunk - 1 queries and keys
            assert cudnn and i_hi - i_lo + 1 == chunk - 1 == T - 1 == n
            assert (kind, source, left) == ("window", "cache", 0) and right >= n   # no upper bound
        elif backend == "cudnn":
            assert cudnn and i_hi - i_lo + 1 == chunk == T
            assert (kind, source) == ("full", "cache") and n in SMALL_LADDER or (kind, n) == ("causal", chunk)
        elif kind == "full" and source == "cache" and i_hi - i_lo + 1 == chunk and cudnn:
            assert n < SMALL_LADDER[0], "a remainder that a rung would take runs on FlashAttention-2"
    if not cudnn:
        assert tuple(c[:8] for c in calls) == ops._attention_calls(p0, T, S, W)


def test_kernel_calls_check_can_fail():
    """``_check_calls`` rejects a plan with a ladder piece dropped, doubled or shifted by one key."""
    calls = list(ops._kernel_calls(1000, 64, 4, 300, True, 64, SMALL_LADDER))
    pieces = [i for i, c in enumerate(calls) if c[-1] == "cudnn" and c[5] == "full"]
    assert len(pieces) >= 2
    _check_calls(calls, 4, 300, 1000, 64)
    i = pieces[1]
    shifted = calls[:i] + [(*calls[i][:3], calls[i][3] + 1, *calls[i][4:])] + calls[i + 1:]
    for bad in (calls[:i] + calls[i + 1:], calls + [calls[i]], shifted):
        with pytest.raises(AssertionError):
            _check_calls(bad, 4, 300, 1000, 64)


@pytest.mark.parametrize("C", [4096, 8192])
def test_kernel_calls_few_cudnn_shapes_over_a_long_prompt(C):
    """A 131072-token prompt in C-token chunks (W=32640, S=128, the default ladder; 4096 is the default
    chunk): cuDNN sees at most len(ladder) + 2 shapes in all (the plans warm_prefill_attention builds), and
    the unmasked blocks of the steady chunks go to it nearly whole (a plan that sent everything to
    FlashAttention-2 fails here)."""
    S, W = 128, 32640
    shapes = set()
    for p0 in range(0, 131072 + 1, C):
        calls = ops._kernel_calls(p0, C, S, W, True, C)
        shapes |= {(c[5], c[1] - c[0] + 1, c[4]) for c in calls if c[-1] in ("cudnn", "cudnn_rev")}
        if p0 >= S + W:   # steady: the ring wrapped
            full = sum(c[4] for c in calls if c[5] == "full" and c[2] == "cache")
            fast = sum(c[4] for c in calls if c[5] == "full" and c[-1] == "cudnn")
            assert fast >= full - 2 * ops._CUDNN_LADDER[0]
            assert any(c[5] == "causal" and c[-1] == "cudnn" for c in calls)
    assert len(shapes) <= len(ops._CUDNN_LADDER) + 2, sorted(shapes)
    assert ("window", C - 1, C - 1) in shapes   # the far-edge band went to cuDNN
    assert {n for kind, _, n in shapes if kind == "full"} <= set(ops._CUDNN_LADDER)


@pytest.mark.parametrize("dense_rows", [3, 1024])
@pytest.mark.parametrize("dense_keys", [0, 3, 256])
@pytest.mark.parametrize("S,W,p0,T", ATTN_CASES + [(4, 16, 60, 16), (0, 7, 100, 30), (5, 3, 0, 20)])
def test_prefill_attention_plan_on_the_cpu(monkeypatch, S, W, p0, T, dense_keys, dense_rows):
    """The CUDA attention's whole plan (calls, the query blocks of window calls with more queries than
    keys, the log-sum-exp merge) run on the CPU with ``ops._dense`` standing in for FlashAttention-2 (it
    implements the same bounds), against the reference in float32; ``_dense`` in blocks of 3 queries too."""
    monkeypatch.setattr(ops, "_flash", ops._dense)
    monkeypatch.setattr(ops, "_DENSE_KEYS", dense_keys)
    monkeypatch.setattr(ops, "_DENSE_ROWS", dense_rows)
    q, k, v, kc, vc = _attention_case(S, W, p0, T, D=16, dtype=torch.float32, device="cpu")
    got = ops._prefill_attention_flash(q, k, v, kc, vc, p0, S, W, 0.25)
    want = ref.prefill_attention_ref(q, k, v, kc, vc, p0, S, W, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("left,right", [(-1, -1), (0, -1), (-1, 0), (2, 1), (9, 0)])
def test_dense_in_query_blocks_matches_the_bounds(monkeypatch, left, right):
    """``_dense`` in blocks of 4 queries (23 queries, 7 keys, GQA 4/2) against the window rule written out
    in float64: query i sees key j iff i + (n - Tq) - left <= j <= i + (n - Tq) + right. The mask of each
    block taken as if the block were the whole call (the bug blocks invite) fails the same comparison."""
    monkeypatch.setattr(ops, "_DENSE_ROWS", 4)
    g = torch.Generator().manual_seed(7)
    Tq, n, H, Hkv, D = 23, 7, 4, 2, 8
    q, k, v = (torch.randn(m, h, D, generator=g) for m, h in ((Tq, H), (n, Hkv), (n, Hkv)))
    i, j = torch.arange(Tq)[:, None], torch.arange(n)[None, :]
    ok = torch.ones(Tq, n, dtype=torch.bool)
    ok &= (j >= i + (n - Tq) - left) if left >= 0 else ok
    ok &= (j <= i + (n - Tq) + right) if right >= 0 else ok
    keep = ok.any(1)   # rows that see no key at all are undefined in every kernel

    def want(mask):
        kk, vv = (t.double().repeat_interleave(H // Hkv, 1).transpose(0, 1) for t in (k, v))
        s = torch.einsum("thd,hnd->htn", q.double(), kk).mul(0.3).masked_fill(~mask[None], float("-inf"))
        return torch.einsum("htn,hnd->thd", s.softmax(-1), vv).float(), torch.logsumexp(s, -1).float()

    out, lse = ops._dense(q, k, v, left, right, 0.3)
    w_out, w_lse = want(ok)
    torch.testing.assert_close(out[keep], w_out[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:, keep], w_lse[:, keep], rtol=1e-5, atol=1e-5)
    if (left, right) != (-1, -1):
        local = torch.arange(Tq)[:, None] % 4   # the row within its block of 4, as if the block were the call
        bad = torch.ones(Tq, n, dtype=torch.bool)
        bad &= (j >= local + (n - 4) - left) if left >= 0 else bad
        bad &= (j <= local + (n - 4) + right) if right >= 0 else bad
        b_keep = keep & bad.any(1)
        assert not torch.allclose(out[b_keep], want(bad)[0][b_keep], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("reversed_warm", [True, False])
@pytest.mark.parametrize("merge_parts", [8, 2])
@pytest.mark.parametrize("S,W,p0,T,chunk", [c for c in KERNEL_CASES if c[3] == c[4] and c[3] <= 257])
def test_prefill_attention_plan_with_cudnn_on_the_cpu(monkeypatch, S, W, p0, T, chunk, merge_parts, reversed_warm):
    """The plan with cuDNN (ladder pieces, the merge of more parts than the kernel takes, first by rows, the
    reversed far-edge band) run on the CPU with ``ops._dense`` standing in for both kernels, against the
    reference in float32; the layout is marked warmed as ``warm_prefill_attention`` would mark it, with or
    without the reversed band's plan (without it, the band runs on FlashAttention-2)."""
    calls = []

    def cudnn(q, k, v, causal, scale, stacked=None):
        calls.append((q.shape[0], k.shape[0], causal))
        return ops._dense(q, k, v, -1, 0 if causal else -1, scale)

    q, k, v, kc, vc = _attention_case(S, W, p0, T, D=16, dtype=torch.float32, device="cpu")
    monkeypatch.setenv("AHN_RT_PREFILL_CUDNN", "1")
    monkeypatch.setattr(ops, "_flash", ops._dense)
    monkeypatch.setattr(ops, "_cudnn", cudnn)
    monkeypatch.setattr(ops, "_cudnn_ok", True)
    monkeypatch.setattr(ops, "_CUDNN_LADDER", SMALL_LADDER)
    monkeypatch.setattr(ops, "_MERGE_PARTS", merge_parts)
    monkeypatch.setattr(ops._cudnn_warm, "keys", {ops._cudnn_key(q, k, kc, vc)}, raising=False)
    monkeypatch.setattr(ops._cudnn_warm, "reversed", {ops._cudnn_key(q, k, kc, vc)} if reversed_warm else set(),
                        raising=False)
    got = ops._prefill_attention_flash(q, k, v, kc, vc, p0, S, W, 0.25)
    want = ref.prefill_attention_ref(q, k, v, kc, vc, p0, S, W, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    on = ("cudnn", "cudnn_rev") if reversed_warm else ("cudnn",)
    planned = [c for c in ops._kernel_calls(p0, T, S, W, True, T, SMALL_LADDER) if c[-1] in on]
    assert len(calls) == len(planned)
    assert all(tq == T and (n in SMALL_LADDER or causal) or (tq == n == T - 1 and causal) for tq, n, causal in calls)


def test_prefill_mlp_in_row_blocks_equals_whole(monkeypatch):
    """The prefill's MLP runs _MLP_ROWS rows at a time (a lower peak): a chunk cut into row blocks gives
    the logits and state of the whole-chunk MLP (float32, up to GEMM summation order), and a chunk that is
    not a multiple of the block size is covered to its last row. Negative control: a block that skipped
    its residual would be seen."""
    from ahn_rt import model as model_mod
    from ahn_rt.init_weights import preset_config, random_state_dict
    from ahn_rt.runtime import from_state_dict

    cfg = preset_config("tiny", True, torch.float32)
    cfg["vocab_size"] = 64
    m = from_state_dict(cfg, random_state_dict(cfg, ahn=True, dtype=torch.float32), window=6, sinks=2,
                        mode="ahn", dtype="float32", device="cpu")
    ids = torch.randint(0, 64, (21,), generator=torch.Generator().manual_seed(3)).tolist()

    def run(rows):
        monkeypatch.setattr(model_mod, "_MLP_ROWS", rows)
        s = m.new_session(chunk_size=64)
        return s.forward(ids), s.state.memory.clone()

    whole, mem_whole = run(10 ** 9)
    blocks, mem_blocks = run(8)
    torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mem_blocks, mem_whole, rtol=1e-5, atol=1e-6)
    real_add = ops.linear_add_

    def drop_residual(h, x, weight, bias=None):   # the last, short block loses its residual
        if h.shape[0] == 5:
            return h.copy_(ops.linear(x, weight, bias))
        return real_add(h, x, weight, bias)
    monkeypatch.setattr(ops, "linear_add_", drop_residual)
    broken, _ = run(8)
    assert not torch.allclose(broken, whole, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("T", [4096, 8192])
def test_prefill_attention_plan_fits_the_merge_kernel_at_the_3b_geometry(monkeypatch, T):
    """Every chunk of a 131072-token prompt at W = 32640, S = 128, chunks of 4096 (the default) and 8192
    (the default until 2026-12-06), planned with cuDNN warmed: the merge kernel takes each call's parts (at most
    ``_MERGE_PARTS``), so the reference merge, with its float32 copies of every part, never runs on the GPU,
    and a steady chunk's parts are merged in one call. The last chunk's window call over 384 keys runs
    FlashAttention-2 in query blocks; as that many parts they were 25 in one merge. The kernels are
    stand-ins that return zeros: this checks the plan's structure, not values."""
    S, W, H, Hkv, D = 128, 32640, 2, 1, 8

    def zeros(q, k, v, *args, **kwargs):
        return torch.zeros(q.shape[0], q.shape[1], v.shape[2]), torch.zeros(q.shape[1], q.shape[0])

    merges, real = [], ops.attn_merge

    def spy(outs, lses, offsets, rows):
        merges.append(len(outs))
        return real(outs, lses, offsets, rows)

    kc, q, k = torch.zeros(Hkv, S + W, D), torch.zeros(T, H, D), torch.zeros(T, Hkv, D)
    key = ops._cudnn_key(q, k, kc, kc)
    monkeypatch.setenv("AHN_RT_PREFILL_CUDNN", "1")
    for name, fn in (("_flash", zeros), ("_dense", zeros), ("_cudnn", zeros), ("attn_merge", spy)):
        monkeypatch.setattr(ops, name, fn)
    monkeypatch.setattr(ops, "_cudnn_ok", True)
    monkeypatch.setattr(ops._cudnn_warm, "keys", {key}, raising=False)
    monkeypatch.setattr(ops._cudnn_warm, "reversed", {key}, raising=False)
    for p0 in range(0, 131072, T):
        before = len(merges)
        ops._prefill_attention_flash(q, k, k, kc, kc, p0, S, W, 0.3)
        if p0 >= S + W:   # a steady chunk (the ring full): its parts in one merge, none merged twice
            assert len(merges) == before + 1, (p0, merges[before:])
    assert merges and max(merges) <= ops._MERGE_PARTS, merges

