"""The fused decode GEMV ``torch.ops.ahn_rt.gemv`` (csrc/gemv.cpp, cpu/gemv.cpp, cuda/gemv.cu) against
``ahn_rt.ref.gemv_ref``, both called by keyword.

CPU cases run everywhere; the same cases on CUDA, the Qwen2.5-3B decode shapes (151936-row LM head
included), the misaligned / scalar paths and CUDA-graph replay (with and without programmatic dependent
launch) are marked `cuda` (`pytest -m cuda tests/test_gemv.py` on a GPU machine; skipped without one).
x_add (the GEMV of T(x + x_add)) has its own section at the end.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

import ahn_rt._C  # noqa: F401  (registers torch.ops.ahn_rt.*)
import ahn_rt._meta  # noqa: F401  (fake kernels, needed by opcheck)
from ahn_rt.ref import gemv_ref

# tolerance table: rtol, atol for assert_close and the bound on ||out - ref|| / ||ref||, per INPUT dtype (x, weight). Both
# sides accumulate in float32 (in different orders) and round once; bf16 / fp16 outputs may differ by an
# ulp, and a normalized x element may round the other way (rsqrt vs 1 / sqrt), which also moves a float32
# output (out_float) of fp16 / bf16 inputs by more than float32 rounding (seen: 1.3e-4 for fp16 on an H200).
# Sizes: rtol and the norm-wise rel are a few ulps of the dtype (bf16 ulp 2^-8 = 3.9e-3, fp16 2^-11 =
# 4.9e-4; the float32 row leaves room for K up to 18944 summed in another order), atol the same for outputs
# near zero (|y| = O(1) here).
TOL = {
    torch.float32: dict(rtol=3e-4, atol=1e-3, rel=1e-4),
    torch.float16: dict(rtol=3e-3, atol=5e-3, rel=3e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=5e-2, rel=1e-2),
}
# The norm-relative bound is for vectors of at least REL_MIN_NUMEL outputs: a single output is one dot
# product whose relative error grows with cancellation (seen on an H200: 1.24e-4 for fp32, N=1); the
# element-wise rtol / atol check still holds for every size. Everything else here is exact (torch.equal).
REL_MIN_NUMEL = 8
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_NO_GPU = not torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(_NO_GPU, reason="no GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
EPS = 1e-6

# name -> (norm, bias, residual, silu_mul, out_float)
OPTIONS = {
    "plain": (False, False, False, False, False),
    "norm": (True, False, False, False, False),
    "bias": (False, True, False, False, False),
    "res": (False, False, True, False, False),
    "silu": (False, False, False, True, False),
    "f32out": (False, False, False, False, True),
    "norm_bias": (True, True, False, False, False),  # q|k|v|a|b|g projection
    "bias_res": (False, True, True, False, False),  # o_proj with bias
    "norm_silu": (True, False, False, True, False),  # gate|up
    "silu_res": (False, False, True, True, False),
    "norm_f32out": (True, False, False, False, True),  # LM head
    "all": (True, True, True, True, True),
}
BIG_OPTIONS = ["plain", "norm_bias", "bias_res", "norm_silu", "res", "all"]
SMALL_SHAPES = [(k, n) for k in (1, 7, 64) for n in (1, 3, 129, 2048, 2608)] + \
               [(k, n) for k in (2048, 11008) for n in (1, 3, 129)]
BIG_SHAPES = [(k, n) for k in (2048, 11008) for n in (2048, 2608)]


def dname(dtype):
    return str(dtype).replace("torch.", "")


def make_case(K, N_out, dtype, device, option, gen=None):
    """Fresh random inputs (y ~ O(1)); with silu_mul the weight has 2 * N_out rows."""
    norm, bias, res, silu, f32 = OPTIONS[option]
    N = 2 * N_out if silu else N_out
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(dtype).to(device)
    return dict(
        x=r(K, scale=3.0),
        weight=r(N, K, scale=K ** -0.5),
        bias=r(N) if bias else None,
        norm_weight=(torch.rand(K, generator=gen) + 0.5).to(dtype).to(device) if norm else None,
        norm_eps=EPS,
        residual=r(N_out) if res else None,
        silu_mul=silu,
        out_float=f32,
    )


def to_cpu(args):
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def run_op(args):
    """The op with a NaN-poisoned output block: the caching allocator hands the freed NaN block of the
    same size to the op's output on CUDA, so an unwritten element shows up as NaN."""
    w, x = args["weight"], args["x"]
    if x.is_cuda:
        n_out = w.shape[0] // 2 if args["silu_mul"] else w.shape[0]
        dt = torch.float32 if args["out_float"] else x.dtype
        torch.full((n_out,), float("nan"), dtype=dt, device=x.device)  # freed at once, block reused
    return torch.ops.ahn_rt.gemv(**args)


def assert_close(out, expect, what, in_dtype=None):
    assert out.shape == expect.shape and out.dtype == expect.dtype, \
        f"{what}: {out.shape} {out.dtype} vs {expect.shape} {expect.dtype}"
    o, r = out.double().cpu(), expect.double().cpu()
    assert bool(torch.isfinite(o).all()), f"{what}: non-finite values ({int((~torch.isfinite(o)).sum())})"
    diff = (o - r).abs()
    rel = (diff.norm() / r.norm().clamp_min(1e-30)).item()
    print(f"{what}: max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}, rel {rel:.3g}")
    tol = TOL[in_dtype or out.dtype]
    if r.numel() >= REL_MIN_NUMEL:            # the norm-relative bound is for vectors (see the table)
        assert rel <= tol["rel"], f"{what}: relative error {rel:.3g} > {tol['rel']}"
    torch.testing.assert_close(out.cpu(), expect.cpu(), rtol=tol["rtol"], atol=tol["atol"], msg=what)


def check(args, what):
    out = run_op(args)
    expect = gemv_ref(**to_cpu(args))
    assert_close(out, expect, what, args["x"].dtype)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("K,N", SMALL_SHAPES, ids=[f"K{k}-N{n}" for k, n in SMALL_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_gemv_small(dtype, K, N, option, device):
    check(make_case(K, N, dtype, device, option), f"{dname(dtype)} K={K} N={N} {option} {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", BIG_OPTIONS)
@pytest.mark.parametrize("K,N", BIG_SHAPES, ids=[f"K{k}-N{n}" for k, n in BIG_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_gemv_big(dtype, K, N, option, device):
    check(make_case(K, N, dtype, device, option), f"{dname(dtype)} K={K} N={N} {option} {device}")


def misaligned(t, offset):
    """The same values in a buffer that starts `offset` elements in (16-byte misaligned for odd offsets)."""
    flat = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device).fill_(float("nan"))
    view = flat[offset:].view(t.shape)
    view.copy_(t)
    return view


def strided_vec(t, step=3):
    """The same values as a non-contiguous 1-D view (element stride `step`), NaN in between."""
    big = torch.full((t.numel() * step,), float("nan"), dtype=t.dtype, device=t.device)
    view = big[::step]
    view.copy_(t)
    return view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["x", "weight", "x_weight", "side_strides"])
@pytest.mark.parametrize("K,N", [(2048, 129), (64, 2048), (11008, 3)], ids=["K2048-N129", "K64-N2048", "K11008-N3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_gemv_misaligned_and_strided(dtype, K, N, where, device):
    """x at an odd offset (scalar staging), weight at an odd offset (scalar GEMV path on CUDA), strided
    bias / norm_weight / residual."""
    args = make_case(K, N, dtype, device, "all" if where == "side_strides" else "norm_bias")
    if where in ("x", "x_weight"):
        args["x"] = misaligned(args["x"], 3)
    if where in ("weight", "x_weight"):
        args["weight"] = misaligned(args["weight"], 1)
    if where == "side_strides":
        for name in ("bias", "norm_weight", "residual"):
            args[name] = strided_vec(args[name])
    check(args, f"{dname(dtype)} K={K} N={N} {where} {device}")


def test_gemv_errors():
    x, w = torch.randn(8), torch.randn(6, 8)
    with pytest.raises(RuntimeError, match="x has 7 values"):
        torch.ops.ahn_rt.gemv(torch.randn(7), w, None, None, EPS, None, False, False)
    with pytest.raises(RuntimeError, match="weight dtype"):
        torch.ops.ahn_rt.gemv(x, w.half(), None, None, EPS, None, False, False)
    with pytest.raises(RuntimeError, match="even N"):
        torch.ops.ahn_rt.gemv(x, torch.randn(5, 8), None, None, EPS, None, True, False)
    with pytest.raises(RuntimeError, match="residual must be"):
        torch.ops.ahn_rt.gemv(x, w, None, None, EPS, torch.randn(6), True, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.ahn_rt.gemv(x, torch.randn(8, 6).t(), None, None, EPS, None, False, False)
    with pytest.raises(RuntimeError, match="norm_weight dtype"):
        torch.ops.ahn_rt.gemv(x, w, None, torch.randn(8).double(), EPS, None, False, False)


def test_gemv_empty():
    out = torch.ops.ahn_rt.gemv(torch.randn(8), torch.randn(0, 8), None, None, EPS, None, False, False)
    assert out.shape == (0,)
    bias = torch.randn(4)
    out = torch.ops.ahn_rt.gemv(torch.randn(0), torch.randn(4, 0), bias, None, EPS, None, False, True)
    assert out.dtype == bias.dtype and torch.equal(out, bias)   # K = 0: y = 0 + bias, exactly


@pytest.mark.parametrize("option", ["plain", "norm_bias", "silu_res", "all", "bias_res"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_gemv_opcheck(dtype, option):
    args = make_case(64, 10, dtype, "cpu", option)
    torch.library.opcheck(torch.ops.ahn_rt.gemv, args=(), kwargs=args)
    torch.library.opcheck(torch.ops.ahn_rt.gemv, args=(), kwargs=dict(args, static_weight=True))
    if args["norm_weight"] is None and not args["silu_mul"]:   # x_add is refused with either
        torch.library.opcheck(torch.ops.ahn_rt.gemv, args=(), kwargs=dict(args, x_add=torch.randn_like(args["x"])))
        x = torch.randn(3, 64).to(dtype)
        res = None if args["residual"] is None else torch.randn(3, 10).to(dtype)
        torch.library.opcheck(torch.ops.ahn_rt.gemv.default,
                              (x, args["weight"], args["bias"], None, 0.0, res, False, False, True, torch.randn_like(x)))


# ---- CUDA: the Qwen2.5-3B decode shapes -----------------------------------------------------------
# (name, K, N_out, option): q|k|v|a|b|g, o_proj (+ residual), gate|up (+ SiLU), down (+ residual), LM head.
SHAPES_3B = [
    ("qkvabg", 2048, 2608, "norm_bias"),
    ("o_proj", 2048, 2048, "res"),
    ("gate_up", 2048, 11008, "norm_silu"),
    ("down", 11008, 2048, "res"),
    ("lm_head", 2048, 151936, "norm_f32out"),
    ("down_7b", 18944, 3584, "res"),  # K > 12288: over 48 KiB of staged x (opt-in shared memory)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("name,K,N,option", SHAPES_3B, ids=[s[0] for s in SHAPES_3B])
@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
def test_gemv_3b_shapes(name, K, N, option, dtype):
    if dtype != torch.bfloat16 and name == "lm_head":
        N = 32771  # keep the fp32 / fp16 runs short; odd row count
    check(make_case(K, N, dtype, "cuda", option), f"{name} {dname(dtype)}")


@pytest.mark.parametrize("pdl", ["off", "static", "forced"])
@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
def test_gemv_graph_chain(pdl, monkeypatch):
    """A decode-like chain (each GEMV reads the previous output) captured in a CUDA graph and replayed
    with new inputs, equal to the eager chain: with programmatic dependent launch (calls that declare
    static weights, as the decode step does, or every call under AHN_RT_GEMV_PDL=1) the next kernel's
    weight prefetch overlaps the previous kernel, and its reads of x / residual must still wait for it."""
    if pdl == "static":
        monkeypatch.delenv("AHN_RT_GEMV_PDL", raising=False)
    else:
        monkeypatch.setenv("AHN_RT_GEMV_PDL", "1" if pdl == "forced" else "0")
    static = pdl == "static"
    dt, K, F = torch.bfloat16, 2048, 5504
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(3):
        layers.append(dict(
            w_in=make_case(K, 2608, dt, "cuda", "norm_bias", g),
            w_o=(torch.randn(K, K, generator=g) * K ** -0.5).to(dt).cuda(),
            w_gu=make_case(K, F, dt, "cuda", "norm_silu", g),
            w_down=(torch.randn(K, F, generator=g) * F ** -0.5).to(dt).cuda(),
        ))

    def step(h, fn):
        if static:
            fn = functools.partial(fn, static_weight=True)
        for lw in layers:
            a = lw["w_in"]
            proj = fn(x=h, weight=a["weight"], bias=a["bias"], norm_weight=a["norm_weight"], norm_eps=EPS,
                      residual=None, silu_mul=False, out_float=False)
            h = fn(x=proj[:K], weight=lw["w_o"], bias=None, norm_weight=None, norm_eps=0.0, residual=h,
                   silu_mul=False, out_float=False)
            gu = lw["w_gu"]
            act = fn(x=h, weight=gu["weight"], bias=None, norm_weight=gu["norm_weight"], norm_eps=EPS,
                     residual=None, silu_mul=True, out_float=False)
            h = fn(x=act, weight=lw["w_down"], bias=None, norm_weight=None, norm_eps=0.0, residual=h,
                   silu_mul=False, out_float=False)
        return h

    h_in = torch.randn(K, device="cuda").to(dt)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(h_in, torch.ops.ahn_rt.gemv)  # warm-up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            h_out = step(h_in, torch.ops.ahn_rt.gemv)
    torch.cuda.current_stream().wait_stream(stream)
    for trial in range(3):
        h_in.copy_(torch.randn(K, generator=g).to(dt))
        graph.replay()
        eager = step(h_in, torch.ops.ahn_rt.gemv)
        torch.cuda.synchronize()
        assert torch.equal(h_out, eager), f"graph replay {trial} differs from eager"
        cpu_ref = step(h_in.cpu(), lambda **kw: gemv_ref(**to_cpu(kw)))
        assert_close(h_out, cpu_ref, f"chain vs reference, replay {trial}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", ["plain", "norm_bias_res", "silu"])
def test_gemv_rows_equal_single_rows_bit_for_bit(dtype, fused, device):
    """x [B, K]: each output row equals gemv of that row alone (same reduction order: no dependence on B
    or on the other rows), matches the reference, and passes opcheck."""
    g = torch.Generator().manual_seed(11)
    B, N, K = 5, 38, 70
    x = torch.randn(B, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) * 0.1).to(dtype).to(device)
    bias = nw = res = None
    silu = fused == "silu"
    if fused == "norm_bias_res":
        bias, nw = torch.randn(N, generator=g).to(dtype).to(device), torch.randn(K, generator=g).to(dtype).to(device)
        res = torch.randn(B, N, generator=g).to(dtype).to(device)
    out = torch.ops.ahn_rt.gemv(x, w, bias, nw, 1e-6, res, silu, False)
    for b in range(B):
        one = torch.ops.ahn_rt.gemv(x[b], w, bias, nw, 1e-6, None if res is None else res[b], silu, False)
        assert torch.equal(out[b], one), b
    want = gemv_ref(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in (x, w, bias, nw, 1e-6, res, silu, False)))
    torch.testing.assert_close(out.float().cpu(), want.float(), rtol=1e-2, atol=2e-2)
    torch.library.opcheck(torch.ops.ahn_rt.gemv.default, (x, w, bias, nw, 1e-6, res, silu, False))


@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
@pytest.mark.parametrize("dtype, kernel", [(torch.bfloat16, "mma"), (torch.float16, "mma"), (torch.bfloat16, "simt"),
                                           (torch.float32, "simt")], ids=["bf16", "fp16", "bf16-simt", "fp32"])
@pytest.mark.parametrize("name, K, N, option", [("qkvabg", 2048, 2608, "norm_bias"), ("down", 11008, 2048, "res"),
                                                ("gate_up", 2048, 11008, "norm_silu"), ("head", 2048, 4099, "norm_f32out"),
                                                ("odd", 70, 37, "all")])
def test_gemv_batch_invariance_on_cuda(name, K, N, option, dtype, kernel, monkeypatch):
    """Both CUDA kernels at the decode shapes (the tensor-core one for bf16 / fp16; the SIMT one for fp32,
    and for bf16 under AHN_RT_GEMV_SIMT=1): for every batch size (1 .. 40: every batch bucket, K = 11008
    staged piece by piece at the larger ones, and a second launch group past 32), row b of gemv(x[:B]) is
    bit for bit gemv(x[b]) alone, also when the other rows hold huge values; the rows agree with the
    reference. Negative control: the bit-for-bit comparison does see a one-ulp change of one input."""
    monkeypatch.setenv("AHN_RT_GEMV_SIMT", "1" if kernel == "simt" else "0")
    g = torch.Generator().manual_seed(7)
    case = make_case(K, N, dtype, "cuda", option, g)
    Bmax = 40
    x = (torch.randn(Bmax, K, generator=g) * 3).to(dtype).cuda()
    res = None if case["residual"] is None else torch.randn(Bmax, N, generator=g).to(dtype).cuda()
    args = {k: v for k, v in case.items() if k not in ("x", "residual")}
    alone = [torch.ops.ahn_rt.gemv(x=x[b], residual=None if res is None else res[b], **args) for b in range(Bmax)]
    for B in (1, 2, 7, 8, 9, 16, 17, 31, 32, 33, 40):
        out = torch.ops.ahn_rt.gemv(x=x[:B], residual=None if res is None else res[:B], **args)
        for b in range(B):
            assert torch.equal(out[b], alone[b]), f"{name}: row {b} of a batch of {B} differs from the row alone"
    noisy = x.clone()
    noisy[1:] = 1e4
    out = torch.ops.ahn_rt.gemv(x=noisy[:9], residual=None if res is None else res[:9], **args)
    assert torch.equal(out[0], alone[0]), f"{name}: row 0 depends on its neighbours"
    want = gemv_ref(**to_cpu(dict(x=x[:3], residual=None if res is None else res[:3], **args)))
    assert_close(torch.ops.ahn_rt.gemv(x=x[:3], residual=None if res is None else res[:3], **args), want,
                 f"{name} B=3 vs reference", dtype)
    bumped = x[:2].clone()
    bumped[0, K // 2] += 1.0
    out = torch.ops.ahn_rt.gemv(x=bumped, residual=None if res is None else res[:2], **args)
    assert not torch.equal(out[0], alone[0]), "the comparison cannot see a changed input"


@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "misaligned"])
@pytest.mark.parametrize("name, K, N, option", [("qkvabg", 2048, 2608, "norm_bias"), ("head", 2048, 4099, "norm_f32out"),
                                                ("gate_up", 2048, 1100, "norm_silu"), ("odd", 70, 37, "all"),
                                                ("k_odd", 1003, 64, "norm"), ("wide_head", 2048, 40000, "norm_f32out")])
def test_gemv_staged_x_equals_unstaged(name, K, N, option, layout, dtype, monkeypatch):
    """The tensor-core kernel stages the RMS-normalized x of every sequence in shared memory (B x K up to
    about 72 KiB) where that measured faster: blocks of several row tiles (wide_head: 2500 tiles, four per
    block) at every B that fits, blocks of one tile (the other shapes) at B <= 2. AHN_RT_GEMV_X_UNSTAGED=1
    makes every warp normalize its own slice instead. Both must give the same bits for every batch size
    (1, 2: staged everywhere; 5, 16: staged for wide_head; 32: too big to stage at K = 2048), with vector
    loads (contiguous) and element loads (a strided or misaligned x, K not a multiple of 8). Negative
    control: torch.equal sees a changed input element."""
    g = torch.Generator().manual_seed(5)
    case = make_case(K, N, dtype, "cuda", option, g)
    args = {k: v for k, v in case.items() if k not in ("x", "residual")}
    for B in (1, 2, 5, 16, 32):
        base = (torch.randn(B, 2 * K + 1, generator=g) * 3).to(dtype).cuda()
        x = {"contiguous": base[:, :K], "strided": base[:, : 2 * K : 2], "misaligned": base[:, 1:K + 1]}[layout]
        if layout == "contiguous":
            x = x.contiguous()
        res = None if case["residual"] is None else torch.randn(B, N, generator=g).to(dtype).cuda()
        monkeypatch.setenv("AHN_RT_GEMV_X_UNSTAGED", "0")
        staged = torch.ops.ahn_rt.gemv(x=x, residual=res, **args)
        monkeypatch.setenv("AHN_RT_GEMV_X_UNSTAGED", "1")
        unstaged = torch.ops.ahn_rt.gemv(x=x, residual=res, **args)
        assert torch.equal(staged, unstaged), f"{name} {layout} B={B}: staged x differs from unstaged"
        assert_close(staged, gemv_ref(**to_cpu(dict(x=x, residual=res, **args))), f"{name} {layout} B={B}", dtype)
        bumped = x.clone()
        bumped[0, K // 2] += 0.5
        monkeypatch.setenv("AHN_RT_GEMV_X_UNSTAGED", "0")
        assert not torch.equal(torch.ops.ahn_rt.gemv(x=bumped, residual=res, **args), staged), \
            "the comparison cannot see a changed input"


# ---- x_add: the GEMV multiplies x_eff = T(float(x) + float(x_add)) ----------------------------------------
# The decode step's o_proj: the attention output (x) and the memory term (x_add) come from two streams; the
# op adds them as it loads x, and must give the bits of adding them into x first (x_add is refused with
# norm_weight and silu_mul, so the cases below have neither).
XADD_OPTIONS = ["plain", "bias", "res", "f32out", "bias_res"]
XADD_SHAPES = [(1, 3), (7, 129), (64, 33), (70, 37), (1003, 64), (2048, 129)]   # K % 8 != 0: element-wise loads


def add_rounded(x, x_add):
    """What the memory kernel did in place before x_add existed: T(float(x) + float(x_add))."""
    return (x.float() + x_add.float()).to(x.dtype)


def xadd_case(K, N, dtype, device, option, B=None, gen=None):
    """make_case with x [K] (B None) or [B, K] (residual likewise) and an x_add of x's shape, dtype and
    strides, of the same size as x (so the rounding of the sum matters)."""
    args = make_case(K, N, dtype, device, option, gen)
    shape = (K,) if B is None else (B, K)
    args["x"] = (torch.randn(*shape, generator=gen) * 3).to(dtype).to(device)
    if args["residual"] is not None:
        args["residual"] = torch.randn(*shape[:-1], N, generator=gen).to(dtype).to(device)
    args["x_add"] = (torch.randn(*shape, generator=gen) * 2).to(dtype).to(device)
    return args


def check_x_add(args, what):
    """gemv(x, x_add) is gemv(T(x + x_add)) bit for bit, matches the reference (with the file's tolerance:
    the op and the reference sum in different orders), and differs from gemv(x) without x_add."""
    out = run_op(args)
    folded = run_op(dict(args, x=add_rounded(args["x"], args["x_add"]), x_add=None))
    assert torch.equal(out, folded), f"{what}: gemv(x, x_add) differs from gemv(T(x + x_add))"
    expect = gemv_ref(**to_cpu(args))
    assert torch.equal(expect, gemv_ref(**to_cpu(dict(args, x=add_rounded(args["x"], args["x_add"]), x_add=None))))
    assert_close(out, expect, what, args["x"].dtype)
    ignored = run_op(dict(args, x_add=None))
    assert not torch.equal(out, ignored), f"{what}: the test cannot tell x_add from no x_add"
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B", [None, 1, 3, 5], ids=["1d", "B1", "B3", "B5"])
@pytest.mark.parametrize("option", XADD_OPTIONS)
@pytest.mark.parametrize("K,N", XADD_SHAPES, ids=[f"K{k}-N{n}" for k, n in XADD_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_gemv_x_add(dtype, K, N, option, B, device):
    g = torch.Generator().manual_seed(K * 131 + N)
    check_x_add(xadd_case(K, N, dtype, device, option, B, g), f"{dname(dtype)} K={K} N={N} {option} B={B} {device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["x_misaligned", "x_add_misaligned", "strided_1d", "strided_2d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
def test_gemv_x_add_layouts(dtype, layout, device):
    """x_add read with x's strides: a 16-byte misaligned x (aligned x_add) or x_add (aligned x) takes the
    element-wise loads on CUDA; strided 1-D and 2-D views (the same strides for both, as the op asks)."""
    g = torch.Generator().manual_seed(3)
    K, N, B = 2048, 129, 3
    args = xadd_case(K, N, dtype, device, "bias_res", B, g)
    x, a = args["x"], args["x_add"]
    if layout == "x_misaligned":
        x = misaligned(x, 3)
    elif layout == "x_add_misaligned":
        a = misaligned(a, 1)
    elif layout == "strided_1d":
        x, a = strided_vec(x[0]), strided_vec(a[0])
        args["residual"] = args["residual"][0]
    else:
        big_x = torch.full((B, 2 * K), float("nan"), dtype=dtype, device=device)
        big_a = torch.full((B, 2 * K), float("nan"), dtype=dtype, device=device)
        big_x[:, ::2], big_a[:, ::2] = x, a
        x, a = big_x[:, ::2], big_a[:, ::2]
    assert x.stride() == a.stride()
    check_x_add(dict(args, x=x, x_add=a), f"{dname(dtype)} {layout} {device}")


def test_gemv_x_add_errors():
    x, w = torch.randn(8), torch.randn(6, 8)
    gemv = torch.ops.ahn_rt.gemv
    with pytest.raises(RuntimeError, match=r"ahn_rt.gemv: x_add must have x's shape"):
        gemv(x, w, None, None, EPS, None, False, False, False, torch.randn(7))
    with pytest.raises(RuntimeError, match=r"ahn_rt.gemv: x_add must have x's shape"):
        gemv(torch.randn(2, 8), w, None, None, EPS, None, False, False, False, torch.randn(8))
    with pytest.raises(RuntimeError, match=r"ahn_rt.gemv: x_add dtype"):
        gemv(x, w, None, None, EPS, None, False, False, False, torch.randn(8).half())
    with pytest.raises(RuntimeError, match=r"ahn_rt.gemv: x_add must have x's strides"):
        gemv(x, w, None, None, EPS, None, False, False, False, strided_vec(torch.randn(8)))
    with pytest.raises(RuntimeError, match=r"ahn_rt.gemv: x_add must have x's strides"):
        gemv(torch.randn(2, 8), w, None, None, EPS, None, False, False, False, torch.randn(8, 2).t())
    with pytest.raises(RuntimeError, match=r"ahn_rt.gemv: x_add with norm_weight is not supported"):
        gemv(x, w, None, torch.rand(8), EPS, None, False, False, False, torch.randn(8))
    with pytest.raises(RuntimeError, match=r"ahn_rt.gemv: x_add with silu_mul is not supported"):
        gemv(x, w, None, None, EPS, None, True, False, False, torch.randn(8))
    # By keyword, through the Python wrapper (ext on the CPU) as the model calls it.
    from ahn_rt import ops
    with pytest.raises(RuntimeError, match=r"x_add with norm_weight"):
        ops.gemv(x, w, None, torch.rand(8), EPS, None, False, False, x_add=torch.randn(8))


# x_add's refusals, each case once: (x, x_add, norm_weight, silu_mul) builders and the message after "op: "
XADD_REFUSED = {
    "shorter": (lambda: (torch.randn(8), torch.randn(7), None, False), r"x_add must have x's shape \[8\], got \[7\]"),
    "broadcast": (lambda: (torch.randn(2, 8), torch.randn(8), None, False),
                  r"x_add must have x's shape \[2, 8\], got \[8\]"),
    "row": (lambda: (torch.randn(2, 8), torch.randn(1, 8), None, False),
            r"x_add must have x's shape \[2, 8\], got \[1, 8\]"),
    "dtype": (lambda: (torch.randn(8), torch.randn(8).half(), None, False), r"x_add dtype \S+ must equal x dtype \S+"),
    "strides_1d": (lambda: (torch.randn(8), strided_vec(torch.randn(8)), None, False),
                   r"x_add must have x's strides \[1\], got \[3\]"),
    "strides_2d": (lambda: (torch.randn(2, 8), torch.randn(8, 2).t(), None, False),
                   r"x_add must have x's strides \[8, 1\], got \[1, 2\]"),
    "norm": (lambda: (torch.randn(8), torch.randn(8), torch.rand(8) + 0.5, False),
             r"x_add with norm_weight is not supported \(the kernels' RMSNorm path reads x without x_add\)"),
    "silu": (lambda: (torch.randn(8), torch.randn(8), None, True), "x_add with silu_mul is not supported"),
}


@pytest.mark.parametrize("case", list(XADD_REFUSED))
def test_gemv_ref_refuses_the_x_add_the_op_refuses(case):
    """gemv_ref has the op's signature and contract: an x_add the compiled op refuses (another shape, even
    one that broadcasts; another dtype; other strides; with norm_weight or silu_mul) is refused by the
    reference too, in the same words (RuntimeError), also through ops.gemv's reference backend. Before, the
    reference broadcast it, normalized x + x_add, or let SiLU run: the two backends disagreed on a call
    instead of both refusing it."""
    from ahn_rt import ops
    build, needle = XADD_REFUSED[case]
    x, a, nw, silu = build()
    w = torch.randn(6, 8)
    call = (x, w, None, nw, EPS, None, silu, False, False, a)
    with pytest.raises(RuntimeError, match=rf"^ahn_rt\.gemv: {needle}") as op_error:
        torch.ops.ahn_rt.gemv(*call)
    with pytest.raises(RuntimeError, match=rf"^gemv_ref: {needle}") as ref_error:
        gemv_ref(*call)
    assert str(ref_error.value) == str(op_error.value).replace("ahn_rt.gemv: ", "gemv_ref: ", 1)
    with ops.use_backend("ref"), pytest.raises(RuntimeError, match=rf"^gemv_ref: {needle}"):
        ops.gemv(*call[:9], x_add=a)


# The op's other refusals, each case once: the call's arguments that differ from a good one (x [8], weight
# [6, 8], float32) and the message after "op: ". The reference broadcast a residual of another shape, failed
# in torch's words (an odd N with silu_mul, a weight of another K) or took another dtype silently.
def _x2():
    return torch.randn(3, 8)


GEMV_REFUSED = {
    "x_3d": (dict(x=torch.randn(2, 3, 8)), r"x must be \[K\] or \[B, K\] \(B sequences\), got \[2, 3, 8\]"),
    "weight_1d": (dict(weight=torch.randn(48)), r"weight must be \[N, K\], got \[48\]"),
    "weight_k": (dict(weight=torch.randn(6, 7)), r"x has 8 values per row but weight is \[6, 7\]"),
    "weight_dtype": (dict(weight=torch.randn(6, 8).half()), "weight dtype Half must equal x dtype Float"),
    "weight_strides": (dict(weight=torch.randn(8, 6).t()),
                       r"weight must be row-major contiguous, got strides \[1, 6\]"),
    "silu_odd_n": (dict(weight=torch.randn(5, 8), silu_mul=True),
                   r"silu_mul needs an even N \(\[gate; up\] rows\), got N=5"),
    "bias_shape": (dict(bias=torch.randn(6, 1)), r"bias must be \[6\], got \[6, 1\]"),
    "bias_broadcasts": (dict(bias=torch.randn(1)), r"bias must be \[6\], got \[1\]"),
    "bias_dtype": (dict(bias=torch.randn(6).bfloat16()), "bias dtype BFloat16 must equal x dtype Float"),
    "norm_shape": (dict(norm_weight=torch.rand(6)), r"norm_weight must be \[8\], got \[6\]"),
    "norm_dtype": (dict(norm_weight=torch.rand(8).half()), "norm_weight dtype Half must equal x dtype Float"),
    "residual_broadcasts": (dict(residual=torch.randn(1)), r"residual must be shaped like the output \[6\], got \[1\]"),
    "residual_silu": (dict(residual=torch.randn(6), silu_mul=True),
                      r"residual must be shaped like the output \[3\], got \[6\]"),
    "residual_row": (dict(x=_x2(), residual=torch.randn(1, 6)),
                     r"residual must be shaped like the output \[B, 6\], got \[1, 6\]"),
    "residual_1d_batched": (dict(x=_x2(), residual=torch.randn(6)),
                            r"residual must be shaped like the output \[B, 6\], got \[6\]"),
    "residual_dtype": (dict(residual=torch.randn(6).half()), "residual must be on x's device with x's dtype"),
}


@pytest.mark.parametrize("case", list(GEMV_REFUSED))
def test_gemv_ref_refuses_the_arguments_the_op_refuses(case):
    """gemv_ref refuses every argument the compiled op refuses (shapes, dtypes, layouts), with the op's
    message word for word (prefix gemv_ref), also through ops.gemv's reference backend."""
    from ahn_rt import ops
    changed, needle = GEMV_REFUSED[case]
    args = dict(x=torch.randn(8), weight=torch.randn(6, 8), bias=None, norm_weight=None, norm_eps=EPS,
                residual=None, silu_mul=False, out_float=False, static_weight=False, x_add=None)
    args.update(changed)
    with pytest.raises(RuntimeError, match=rf"^ahn_rt\.gemv: {needle}") as op_error:
        torch.ops.ahn_rt.gemv(**args)
    with pytest.raises(RuntimeError, match=rf"^gemv_ref: {needle}") as ref_error:
        gemv_ref(**args)
    assert str(ref_error.value) == str(op_error.value).replace("ahn_rt.gemv: ", "gemv_ref: ", 1)
    with ops.use_backend("ref"), pytest.raises(RuntimeError, match=rf"^gemv_ref: {needle}"):
        ops.gemv(**args)


@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
def test_gemv_x_add_device_error():
    x, w = torch.randn(8, device="cuda"), torch.randn(6, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"ahn_rt.gemv: x_add is on cpu but x is on cuda"):
        torch.ops.ahn_rt.gemv(x, w, None, None, EPS, None, False, False, False, torch.randn(8))


def test_gemv_x_add_wrapper_and_ref():
    """ahn_rt.ops.gemv passes x_add on (positional callers without it still work) and its reference
    backend adds it the same way."""
    from ahn_rt import ops
    g = torch.Generator().manual_seed(1)
    args = xadd_case(70, 37, torch.bfloat16, "cpu", "bias_res", 3, g)
    pos = [args[k] for k in ("x", "weight", "bias", "norm_weight", "norm_eps", "residual", "silu_mul", "out_float")]
    ext = ops.gemv(*pos, True, args["x_add"])
    assert torch.equal(ext, torch.ops.ahn_rt.gemv(**args))
    assert torch.equal(ops.gemv(*pos), torch.ops.ahn_rt.gemv(**dict(args, x_add=None)))
    with ops.use_backend("ref"):
        ref_out = ops.gemv(*pos, x_add=args["x_add"])
    assert torch.equal(ref_out, gemv_ref(**args))
    assert_close(ext, ref_out, "wrapper ext vs ref", torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
@pytest.mark.parametrize("dtype, kernel", [(torch.bfloat16, "mma"), (torch.float16, "mma"), (torch.bfloat16, "simt"),
                                           (torch.float16, "simt"), (torch.float32, "simt")],
                         ids=["bf16", "fp16", "bf16-simt", "fp16-simt", "fp32"])
@pytest.mark.parametrize("name, K, N, option", [("o_proj", 2048, 2048, "res"), ("o_proj_bias", 2048, 2048, "bias_res"),
                                                ("odd", 70, 37, "bias_res"), ("k_odd", 1003, 64, "f32out"),
                                                ("down", 11008, 2048, "res")])
def test_gemv_x_add_on_cuda(name, K, N, option, dtype, kernel, monkeypatch):
    """Both CUDA kernels' XADD instances (the tensor-core one for bf16 / fp16; the SIMT one for fp32 and
    under AHN_RT_GEMV_SIMT=1), vector loads (K % 8 == 0) and element-wise loads (odd K): for B in 1, 3, 16,
    32 and 40 (a second launch group), gemv(x, x_add) is gemv(T(x + x_add)) bit for bit, row b equals the row
    alone bit for bit (batch invariance), and the rows agree with the reference as in the other CUDA tests.
    Negative control: without x_add the result differs."""
    monkeypatch.setenv("AHN_RT_GEMV_SIMT", "1" if kernel == "simt" else "0")
    g = torch.Generator().manual_seed(13)
    Bmax = 40
    case = xadd_case(K, N, dtype, "cuda", option, Bmax, g)
    x, a, res = case["x"], case["x_add"], case["residual"]
    args = {k: v for k, v in case.items() if k not in ("x", "x_add", "residual")}
    rows = lambda t, sl: None if t is None else t[sl]
    alone = [torch.ops.ahn_rt.gemv(x=x[b], x_add=a[b], residual=rows(res, b), **args) for b in range(Bmax)]
    for B in (1, 3, 16, 32, 40):
        out = torch.ops.ahn_rt.gemv(x=x[:B], x_add=a[:B], residual=rows(res, slice(B)), **args)
        folded = torch.ops.ahn_rt.gemv(x=add_rounded(x[:B], a[:B]), residual=rows(res, slice(B)), **args)
        assert torch.equal(out, folded), f"{name} B={B}: gemv(x, x_add) differs from gemv(T(x + x_add))"
        for b in range(B):
            assert torch.equal(out[b], alone[b]), f"{name}: row {b} of a batch of {B} differs from the row alone"
        if B == 3:
            want = gemv_ref(**to_cpu(dict(x=x[:B], x_add=a[:B], residual=rows(res, slice(B)), **args)))
            assert_close(out, want, f"{name} B=3 vs reference", dtype)
            ignored = torch.ops.ahn_rt.gemv(x=x[:B], residual=rows(res, slice(B)), **args)
            assert not torch.equal(out, ignored), f"{name}: the test cannot tell x_add from no x_add"
