"""Compiled ops (torch.ops.ahn_rt.*, csrc/) against the pure-torch references (ahn_rt/ref.py).

CPU cases run everywhere; the same cases on CUDA plus the 3B shapes are marked `cuda`
(`pytest -m cuda tests/test_ops.py` on a GPU machine; skipped without one).
Ops and references are called by keyword, fresh outputs are NaN-poisoned, mutated caches and evict
buffers are compared bit-exactly where the op only copies, and slots the op must not touch are checked.
"""
from __future__ import annotations

import math

import pytest
import torch

import ahn_rt._C  # noqa: F401  (registers torch.ops.ahn_rt.*)
import ahn_rt._meta  # noqa: F401  (fake kernels, needed by opcheck)
from ahn_rt import ref

# tolerance table: rtol, atol for assert_close and the bound on ||out - ref|| / ||ref||, per dtype (of the
# output compared; where a float16 output carries a bf16-rounded value the bf16 row applies, see
# test_gdn_decode_side_kinds_alignment). Kernel and reference both compute in float32 in different orders
# and round once to the output dtype, so 16-bit outputs may differ by an ulp: rtol and the norm-wise rel
# are a few ulps (bf16 ulp 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4) and atol the same for values near zero
# (inputs are O(1)). The float32 row is far above float32 rounding, for the CUDA kernels' other reduction
# orders (split softmax over up to 32768 keys). Measured on the CPU cases: float32 rel <= 1.5e-6 (max diff
# 1.5e-5); bf16 / fp16 rel <= 1.7e-4 (max diff 2e-3). Copies (caches, evict buffers) and untouched slots
# are compared bit-exactly (assert_bits), with no tolerance.
TOL = {
    torch.float32: dict(rtol=3e-4, atol=1e-3, rel=1e-4),
    torch.float16: dict(rtol=3e-3, atol=5e-3, rel=3e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=5e-2, rel=1e-2),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_NO_GPU = not torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(_NO_GPU, reason="no GPU")])]
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(_NO_GPU, reason="no GPU")]


def dname(dtype):
    return str(dtype).replace("torch.", "")


def poison(*shape, dtype, device):
    return torch.empty(*shape, dtype=dtype, device=device).fill_(float("nan"))


def bits(t):
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bits(a, b, what):
    """Bit-exact equality (NaN == NaN: poisoned buffers that must stay untouched compare equal)."""
    assert a.shape == b.shape and a.dtype == b.dtype, what
    same = bits(a) == bits(b)
    assert bool(same.all()), f"{what}: {int((~same).sum())} of {same.numel()} values differ"


def assert_close(out, expect, dtype, what):
    o, r = out.double(), expect.double()
    diff = (o - r).abs()
    rel = (diff.norm() / r.norm().clamp_min(1e-30)).item()
    print(f"{what}: max diff {diff.max().item():.3g}, mean diff {diff.mean().item():.3g}, rel {rel:.3g}")
    assert bool(torch.isfinite(o).all()), f"{what}: non-finite values"
    tol = TOL[dtype]
    assert rel <= tol["rel"], f"{what}: relative error {rel:.3g} > {tol['rel']}"
    torch.testing.assert_close(out, expect.to(out.dtype), rtol=tol["rtol"], atol=tol["atol"], msg=what)


def strided(t, pad=8, offset=0):
    """The same values as a non-contiguous view: rows of a wider buffer (last dim stays contiguous)."""
    big = torch.randn(*t.shape[:-1], t.shape[-1] + pad, dtype=t.dtype, device=t.device)
    view = big[..., offset:offset + t.shape[-1]]
    view.copy_(t)
    return view


def pos_cases(sinks, window):
    """Positions before, at and after the fill point sinks + window, and after several wraps."""
    cap = sinks + window
    ps = {0, cap // 2, cap - 1, cap, cap + 1, cap + 3 * window + window // 2 + 1}
    if sinks > 1:
        ps.add(sinks - 1)
    return sorted(ps)


SW = [(0, 1), (1, 63), (4, 129), (128, 63)]


# ----------------------------------------------------------------------------------------------
# rms_norm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("n,d", [(1, 64), (7, 48), (5, 128), (3, 2048), (2, 1000)])
@pytest.mark.parametrize("layout", ["contig", "strided", "misaligned"])
def test_rms_norm(device, dtype, n, d, layout):
    torch.manual_seed(0)
    x = torch.randn(n, d, dtype=dtype, device=device) * 3
    if layout != "contig":
        x = strided(x, offset=1 if layout == "misaligned" else 0)
    w = (1 + 0.1 * torch.randn(d, device=device)).to(dtype)
    out = torch.ops.ahn_rt.rms_norm(x=x, weight=w, eps=1e-6)
    expect = ref.rms_norm_ref(x=x, weight=w, eps=1e-6)
    assert out.shape == expect.shape and out.dtype == expect.dtype
    assert_close(out, expect, dtype, "rms_norm")


# ----------------------------------------------------------------------------------------------
# decode_prep
# ----------------------------------------------------------------------------------------------
def _prep_case(device, dtype, H, Hkv, D, sinks, window, pos, gated, qk_norm, layout, seed=0):
    """gated: False (no memory), True or "gdn" (GatedDeltaNet gates beta, alpha), "mamba2" (the dt gate)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    C = sinks + window + 3  # 3 slots past the ring that nobody may touch
    mamba2 = gated == "mamba2"
    P = (H + 2 * Hkv) * D + ((2 if mamba2 else 3) * H if gated else 0)
    proj = rnd(P).to(dtype)
    if layout == "strided":
        big = torch.zeros(P, 3, dtype=dtype, device=device)
        big[:, 1] = proj
        proj = big[:, 1]
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
    # Two stacked layers; the op gets layer 1, layer 0 must stay untouched.
    k_all = rnd(2, Hkv, C, D).to(dtype)
    v_all = rnd(2, Hkv, C, D).to(dtype)
    a = dict(proj=proj, inv_freq=inv_freq, pos=torch.tensor([pos], device=device),
             q_norm=None, k_norm=None, norm_eps=1e-6, a_log=None, dt_bias=None,
             k_cache=k_all[1], v_cache=v_all[1], beta_cache=None, alpha_cache=None, sinks=sinks, window=window,
             k_evict=poison(Hkv, D, dtype=dtype, device=device), v_evict=poison(Hkv, D, dtype=dtype, device=device),
             beta_evict=None, alpha_evict=None)
    if qk_norm:
        a["q_norm"] = (1 + 0.2 * rnd(D)).to(dtype)
        a["k_norm"] = (1 + 0.2 * rnd(D)).to(dtype)
    if gated:
        a["dt_bias"] = rnd(H).float()
        a["alpha_cache"] = -torch.rand(C, H, generator=g).to(device)
        a["alpha_evict"] = poison(H, dtype=torch.float32, device=device)
    if gated and not mamba2:
        a["a_log"] = (0.5 * rnd(H)).float()
        a["beta_cache"] = torch.sigmoid(rnd(C, H)).to(dtype)
        a["beta_evict"] = poison(H, dtype=dtype, device=device)
    return a, k_all, v_all


def _clone_args(a):
    b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    return b


PREP_SHAPES = [(4, 4, 64), (4, 2, 128), (16, 2, 128), (6, 1, 48)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("H,Hkv,D", PREP_SHAPES)
@pytest.mark.parametrize("sinks,window", SW)
@pytest.mark.parametrize("mode", ["gated", "gated_norm", "mamba2", "mamba2_norm", "plain", "plain_norm"])
def test_decode_prep(device, dtype, H, Hkv, D, sinks, window, mode):
    """mode: the memory's gates (gated: GatedDeltaNet's beta and alpha; mamba2: its dt in the float32 field;
    plain: none) with or without q/k norm."""
    gated, qk_norm = {"gated": True, "mamba2": "mamba2", "plain": False}[mode.split("_")[0]], mode.endswith("norm")
    has_beta = gated is True
    for i, pos in enumerate(pos_cases(sinks, window)):
        layout = "strided" if i % 2 else "contig"
        a, k_all, v_all = _prep_case(device, dtype, H, Hkv, D, sinks, window, pos, gated, qk_norm, layout, seed=i)
        k_before, v_before = k_all.clone(), v_all.clone()
        b = _clone_args(a)
        bc_before = a["beta_cache"].clone() if has_beta else None
        ac_before = a["alpha_cache"].clone() if gated else None
        q = torch.ops.ahn_rt.decode_prep(**a)
        q_ref = ref.decode_prep_ref(**b)
        what = f"decode_prep pos={pos}"
        assert q.shape == q_ref.shape == (H, D) and q.dtype == dtype
        assert_close(q, q_ref, dtype, what + " q")
        slot = ref.ring_slot(pos, sinks, window)
        others = [s for s in range(k_all.shape[2]) if s != slot]
        # Untouched: the other layer and every other slot (bit-exact).
        assert_bits(k_all[0], k_before[0], what + " k layer 0")
        assert_bits(v_all[0], v_before[0], what + " v layer 0")
        assert_bits(a["k_cache"][:, others], k_before[1][:, others], what + " k other slots")
        assert_bits(a["v_cache"][:, others], v_before[1][:, others], what + " v other slots")
        # v is a copy: bit-exact; k went through norm + RoPE: to rounding.
        assert_bits(a["v_cache"], b["v_cache"], what + " v_cache")
        assert_close(a["k_cache"][:, slot], b["k_cache"][:, slot], dtype, what + " k slot")
        # Evict buffers are copies (or untouched NaN): bit-exact.
        assert_bits(a["k_evict"], b["k_evict"], what + " k_evict")
        assert_bits(a["v_evict"], b["v_evict"], what + " v_evict")
        if gated:
            assert_bits(a["alpha_evict"], b["alpha_evict"], what + " alpha_evict")
            assert_bits(a["alpha_cache"][others], ac_before[others], what + " alpha other slots")
            assert_close(a["alpha_cache"][slot], b["alpha_cache"][slot], torch.float32, what + " alpha slot")
            if gated == "mamba2":   # dt = softplus(...) > 0, not GatedDeltaNet's log-decay
                assert bool((a["alpha_cache"][slot] > 0).all()), what + " dt > 0"
            if pos >= sinks + window:  # the evicted token is the slot's old content
                assert_bits(a["k_evict"], k_before[1][:, slot], what + " k_evict = old slot")
                assert_bits(a["v_evict"], v_before[1][:, slot], what + " v_evict = old slot")
                assert_bits(a["alpha_evict"], ac_before[slot], what + " alpha_evict = old slot")
            else:
                assert bool(a["k_evict"].isnan().all()), what + " nothing evicted before the fill point"
        if has_beta:
            assert_bits(a["beta_evict"], b["beta_evict"], what + " beta_evict")
            assert_bits(a["beta_cache"][others], bc_before[others], what + " beta other slots")
            assert_close(a["beta_cache"][slot], b["beta_cache"][slot], dtype, what + " beta slot")
            if pos >= sinks + window:
                assert_bits(a["beta_evict"], bc_before[slot], what + " beta_evict = old slot")


# ----------------------------------------------------------------------------------------------
# swa_decode
# ----------------------------------------------------------------------------------------------
def _swa_case(device, dtype, H, Hkv, D, sinks, window, pos, layout, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    C = sinks + window + 3
    n = min(pos + 1, sinks + window)
    pad = {"contig": 0, "strided": 8, "misaligned": 1}[layout]
    # Layer-stacked caches with a padded last dim for the strided layouts: rows are D + pad apart.
    k_all = torch.randn(2, Hkv, C, D + pad, generator=g).to(device=device, dtype=dtype)
    v_all = torch.randn(2, Hkv, C, D + pad, generator=g).to(device=device, dtype=dtype)
    k_cache, v_cache = k_all[1, :, :, :D], v_all[1, :, :, :D]
    # Slots the op must never read hold NaN.
    k_cache[:, n:] = float("nan")
    v_cache[:, n:] = float("nan")
    q = torch.randn(H, D, generator=g).to(device=device, dtype=dtype) * 2
    if layout != "contig":
        q = strided(q, offset=1 if layout == "misaligned" else 0)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, pos=torch.tensor([pos], device=device), sinks=sinks,
                window=window, scale=D ** -0.5)


# (34, 2, 40): G = 17 > 16 query heads per kv head (two CUDA head groups, the second with one row) and a
# head dim that is not a multiple of 16.
SWA_SHAPES = [(4, 4, 64), (8, 4, 128), (16, 2, 128), (8, 1, 64), (6, 3, 48), (2, 1, 256), (34, 2, 40)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("H,Hkv,D", SWA_SHAPES)
@pytest.mark.parametrize("sinks,window", SW)
def test_swa_decode(device, dtype, H, Hkv, D, sinks, window):
    for i, pos in enumerate(pos_cases(sinks, window)):
        layout = ["contig", "strided", "misaligned"][i % 3]
        a = _swa_case(device, dtype, H, Hkv, D, sinks, window, pos, layout, seed=i)
        k_before, v_before = a["k_cache"].clone(), a["v_cache"].clone()
        out = torch.ops.ahn_rt.swa_decode(**a)
        expect = ref.swa_decode_ref(**a)
        assert out.shape == (H, D) and out.dtype == dtype
        assert_close(out, expect, dtype, f"swa_decode pos={pos} {layout}")
        assert_bits(a["k_cache"], k_before, "k_cache is read-only")
        assert_bits(a["v_cache"], v_before, "v_cache is read-only")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dname)
@pytest.mark.parametrize("pos", [40, 32767, 32768 + 12345])
@pytest.mark.parametrize("H,Hkv", [(16, 2), (32, 8)])
@pytest.mark.parametrize("marks", [pytest.param(0, marks=cuda_only)])
def test_swa_decode_3b_cuda(dtype, pos, H, Hkv, marks):
    a = _swa_case("cuda", dtype, H, Hkv, 128, 128, 32640, pos, "contig")
    out = torch.ops.ahn_rt.swa_decode(**a)
    assert_close(out, ref.swa_decode_ref(**a), dtype, f"swa_decode 3B pos={pos}")


# ----------------------------------------------------------------------------------------------
# gdn_decode and mamba2_decode (the memory steps)
# ----------------------------------------------------------------------------------------------
def _memory_case(memory, device, dtype, H, Hkv, Dk, Dv, pos, sinks, window, out_dtype, seed=0, dt_scale=1.0):
    """The arguments of gdn_decode (memory "gdn") or mamba2_decode ("mamba2") for one row, in schema order:
    the state, the read query, the evicted token and its gates (beta, alpha / dt, a_log), the output head."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    gdn = memory == "gdn"
    a = dict(state=(0.1 * rnd(H, Dk, Dv)).float(), q=strided(rnd(H, Dk).to(dtype)),
             k=strided(rnd(Hkv, Dk).to(dtype), pad=16), v=strided(rnd(Hkv, Dv).to(dtype)))
    if gdn:
        a.update(beta=torch.sigmoid(rnd(H)).to(dtype), alpha=-torch.nn.functional.softplus(rnd(H)).float())
    else:
        a.update(dt=(dt_scale * torch.nn.functional.softplus(rnd(H))).float(),
                 a_log=torch.log(1 + 3 * torch.rand(H, generator=g)).to(device))
    a.update(z=rnd(H).to(dtype), norm_weight=(1 + 0.2 * rnd(Dv if gdn else H * Dv)).to(dtype),
             o_proj=(rnd(H, Dv, Dv) / math.sqrt(Dv)).to(out_dtype), out=rnd(H, Dv).to(out_dtype),
             pos=torch.tensor([pos], device=device), sinks=sinks, window=window, eps=1e-6 if gdn else 1e-5)
    return a


def _gdn_case(*args, **kw):
    return _memory_case("gdn", *args, **kw)


def _m2_case(*args, **kw):
    return _memory_case("mamba2", *args, **kw)


GDN_SHAPES = [(4, 4, 64, 64), (4, 2, 128, 128), (16, 2, 128, 128), (3, 1, 48, 40), (2, 2, 256, 256)]


# The memory decode ops, tested alike: the case maker (same signature; Mamba2's also takes dt_scale), the
# op and its reference.
def _memory_step(memory):
    return {"gdn": (_gdn_case, torch.ops.ahn_rt.gdn_decode, ref.gdn_decode_ref),
            "mamba2": (_m2_case, torch.ops.ahn_rt.mamba2_decode, ref.mamba2_decode_ref)}[memory]


MEMORIES = ["gdn", "mamba2"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("H,Hkv,Dk,Dv", GDN_SHAPES)
@pytest.mark.parametrize("sinks,window", [(0, 1), (4, 129)])
@pytest.mark.parametrize("out_fp32", [False, True])
@pytest.mark.parametrize("memory", MEMORIES)
def test_memory_decode(device, dtype, memory, H, Hkv, Dk, Dv, sinks, window, out_fp32):
    case, op, reference = _memory_step(memory)
    out_dtype = torch.float32 if out_fp32 else dtype
    cap = sinks + window
    for step, pos in enumerate([cap - 1, cap, cap + 1, cap + 5 * window + 2]):
        # Mamba2's last case: decays strong enough to wipe the state (exp(dt A) underflows toward 0).
        extra = dict(dt_scale=30.0) if memory == "mamba2" and step == 3 else {}
        a = case(device, dtype, H, Hkv, Dk, Dv, pos, sinks, window, out_dtype, seed=step, **extra)
        b = _clone_args(a)
        state0, out0 = a["state"].clone(), a["out"].clone()
        op(**a)
        reference(**b)
        what = f"{memory} decode pos={pos}"
        if pos < cap:  # no-op before the first eviction
            assert_bits(a["state"], state0, what + " state untouched")
            assert_bits(a["out"], out0, what + " out untouched")
            continue
        assert_close(a["state"], b["state"], torch.float32, what + " state")
        # m is rounded to the model dtype before it is added: the model dtype's tolerance applies.
        assert_close(a["out"], b["out"], dtype, what + " out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("memory", MEMORIES)
def test_memory_step_adds_its_term_rounded_to_the_dtype(device, dtype, memory):
    """docs/semantics.md §7 (the decode fork): the memory step rounds its term m to T, then adds it in
    float32 and rounds once, out = T(a + T(m)). Into a buffer of -0.0 (the fork's) it leaves exactly T(m),
    so T(a + that buffer), what o_proj's gemv computes from x_add, is the serial step's out bit for bit
    (a single rounding, T(a + m), would differ in some elements of bf16 / fp16); the state update is the
    same either way."""
    case, op, _ = _memory_step(memory)
    H, Hkv, Dk, Dv, sinks, window = 4, 2, 64, 64, 4, 129
    a = case(device, dtype, H, Hkv, Dk, Dv, sinks + window + 5, sinks, window, dtype, seed=3)
    b = _clone_args(a)
    b["out"] = torch.full_like(a["out"], -0.0)
    attn = a["out"].clone()
    op(**a)
    op(**b)
    assert not torch.equal(a["out"], attn), "the memory step did not run"
    assert_bits(a["state"], b["state"], f"{memory} state with and without the fork's buffer")
    assert_bits(a["out"], (attn.float() + b["out"].float()).to(dtype), f"{memory} out = T(a + T(m))")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dname)
@pytest.mark.parametrize("memory", MEMORIES)
def test_memory_decode_steps(device, dtype, memory):
    """Several steps in a row on one state, new inputs each time, against the reference's own state (the
    CUDA kernels keep nothing between calls)."""
    case, op, reference = _memory_step(memory)
    H, Hkv, D = 16, 2, 128
    a = case(device, dtype, H, Hkv, D, D, 10, 2, 8, dtype)
    b = _clone_args(a)
    g = torch.Generator(device="cpu").manual_seed(1)
    for t in range(6):
        for key in ("q", "k", "v", "z"):
            a[key].copy_(torch.randn(a[key].shape, generator=g).to(a[key]))
            b[key].copy_(a[key])
        op(**a)
        reference(**b)
        assert_close(a["state"], b["state"], torch.float32, f"step {t} state")
        assert_close(a["out"], b["out"], dtype, f"step {t} out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("misalign", [0, 1])
def test_gdn_decode_side_kinds_alignment(device, dtype, D, misalign):
    """Side tensors in other dtypes than the model's (beta / z / norm_weight float32, alpha bf16, o_proj and out
    float16) and a state that is contiguous but not 16-byte aligned (misalign=1 float: the CUDA generic
    kernel instead of the Dk = Dv = 64 / 128 fast one); two runs on the same inputs give the same bits."""
    H, Hkv = 4, 2
    a = _gdn_case(device, dtype, H, Hkv, D, D, 300, 4, 129, torch.float16, seed=7)
    a["beta"], a["z"], a["norm_weight"] = a["beta"].float(), a["z"].float(), a["norm_weight"].float()
    a["alpha"] = a["alpha"].to(torch.bfloat16)

    def placed(state):  # a contiguous copy starting `misalign` floats into a fresh buffer
        flat = torch.empty(state.numel() + misalign, device=device, dtype=torch.float32)
        return flat[misalign:].view(state.shape).copy_(state)

    b, c = _clone_args(a), _clone_args(a)
    a["state"], c["state"] = placed(a["state"]), placed(a["state"])
    torch.ops.ahn_rt.gdn_decode(**a)
    torch.ops.ahn_rt.gdn_decode(**c)
    ref.gdn_decode_ref(**b)
    assert_bits(a["state"], c["state"], "gdn_decode state deterministic")
    assert_bits(a["out"], c["out"], "gdn_decode out deterministic")
    assert_close(a["state"], b["state"], torch.float32, "gdn_decode state")
    # out is float16 but m is rounded to the model dtype first: the coarser tolerance of the two applies.
    tol_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    assert_close(a["out"], b["out"], tol_dtype, "gdn_decode out")


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("marks", [pytest.param(0, marks=cuda_only)])
def test_memory_decode_3b_36_layers_cuda(marks, memory):
    """The 3B shape, 36 layers back to back on one stacked state, against the reference."""
    case, op, reference = _memory_step(memory)
    H, Hkv, D, L = 16, 2, 128, 36
    cases = [case("cuda", torch.bfloat16, H, Hkv, D, D, 40000, 128, 32640, torch.bfloat16, seed=i) for i in range(L)]
    refs = [_clone_args(a) for a in cases]
    for a in cases:
        op(**a)
    for b in refs:
        reference(**b)
    for i, (a, b) in enumerate(zip(cases, refs)):
        assert_close(a["state"], b["state"], torch.float32, f"layer {i} state")
        assert_close(a["out"], b["out"], torch.bfloat16, f"layer {i} out")


# ----------------------------------------------------------------------------------------------
# mamba2_decode
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("misalign", [0, 1])
def test_mamba2_decode_side_kinds_alignment(device, dtype, misalign):
    """Side tensors in other dtypes than the model's (dt bfloat16, z / norm_weight float32, o_proj and out
    float16), a state not 16-byte aligned (misalign=1 float: the CUDA kernel's scalar path); two runs on the
    same inputs give the same bits."""
    H, Hkv, D = 4, 2, 64
    a = _m2_case(device, dtype, H, Hkv, D, D, 300, 4, 129, torch.float16, seed=7)
    a["dt"], a["z"], a["norm_weight"] = a["dt"].to(torch.bfloat16), a["z"].float(), a["norm_weight"].float()

    def placed(state):
        flat = torch.empty(state.numel() + misalign, device=device, dtype=torch.float32)
        return flat[misalign:].view(state.shape).copy_(state)

    b, c = _clone_args(a), _clone_args(a)
    a["state"], c["state"] = placed(a["state"]), placed(a["state"])
    torch.ops.ahn_rt.mamba2_decode(**a)
    torch.ops.ahn_rt.mamba2_decode(**c)
    ref.mamba2_decode_ref(**b)
    assert_bits(a["state"], c["state"], "mamba2_decode state deterministic")
    assert_bits(a["out"], c["out"], "mamba2_decode out deterministic")
    assert_close(a["state"], b["state"], torch.float32, "mamba2_decode state")
    tol_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    assert_close(a["out"], b["out"], tol_dtype, "mamba2_decode out")


@pytest.mark.parametrize("device", DEVICES)
def test_mamba2_decode_norm_spans_heads(device):
    """The tolerance can fail: an output head normalized per head (GatedDeltaNet's rule, a plausible slip)
    lands far outside it, while the op stays inside."""
    H, Hkv, D = 4, 2, 64
    a = _m2_case(device, torch.float32, H, Hkv, D, D, 300, 4, 129, torch.float32, seed=3)
    b, wrong = _clone_args(a), _clone_args(a)
    torch.ops.ahn_rt.mamba2_decode(**a)
    ref.mamba2_decode_ref(**b)
    assert_close(a["out"], b["out"], torch.float32, "mamba2_decode out")
    o = ref.mamba2_recurrent_ref(wrong["q"][None], wrong["k"][None], wrong["v"][None], wrong["dt"][None],
                                 wrong["a_log"], wrong["state"])[0]
    zf = wrong["z"].float()[:, None]
    y = o * zf * torch.sigmoid(zf)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * wrong["norm_weight"].view(H, D)
    per_head = wrong["out"] + torch.einsum("hi,hio->ho", y, wrong["o_proj"])
    with pytest.raises(AssertionError):
        assert_close(a["out"], per_head, torch.float32, "per-head norm")


# ----------------------------------------------------------------------------------------------
# One signature per op: the schema, its reference and its dispatcher
# ----------------------------------------------------------------------------------------------
def test_every_op_its_reference_and_its_dispatcher_take_the_same_arguments():
    """Every op registered in csrc/ops.cpp has a pure-torch reference ``ref.<op>_ref`` and a dispatcher
    ``ops.<op>`` whose parameters are the schema's, in its order and under its names (gdn_gate_norm's schema
    called the norm's weight ``weight``, its reference and dispatcher ``norm_weight``)."""
    import inspect
    import re
    from pathlib import Path
    from ahn_rt import ops
    names = re.findall(r'm\.def\(\s*"(\w+)\(', (Path(__file__).parents[1] / "csrc" / "ops.cpp").read_text())
    assert len(names) >= 14 and "gdn_gate_norm" in names
    for name in names:
        schema = [a.name for a in getattr(torch.ops.ahn_rt, name).default._schema.arguments]
        for fn in (getattr(ref, name + "_ref"), getattr(ops, name)):
            assert list(inspect.signature(fn).parameters) == schema, (name, fn.__qualname__, schema)


def test_the_sanitizer_script_calls_every_op_as_its_schema_reads():
    """scripts/sanitize_ops.py runs only on the GPU machine (under compute-sanitizer), so a schema change it
    missed (a renamed argument it passes by keyword) was found only there; its calls run here on the CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "sanitize_ops.py"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.strip().endswith("every op ran"), r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# opcheck (schemas, fake kernels, mutation declarations)
# ----------------------------------------------------------------------------------------------
def _opcheck_cases(device):
    dt = torch.bfloat16
    x = torch.randn(5, 64, dtype=dt, device=device)
    yield torch.ops.ahn_rt.rms_norm.default, (x, torch.randn(64, dtype=dt, device=device), 1e-6)
    for pos in (5, 70):
        a, _, _ = _prep_case(device, dt, 4, 2, 64, 4, 60, pos, True, True, "contig")
        a["k_evict"].zero_(), a["v_evict"].zero_(), a["beta_evict"].zero_(), a["alpha_evict"].zero_()
        yield torch.ops.ahn_rt.decode_prep.default, tuple(a.values())
    a = _swa_case(device, dt, 8, 2, 64, 4, 60, 70, "contig")
    a["k_cache"].nan_to_num_(0.0), a["v_cache"].nan_to_num_(0.0)
    yield torch.ops.ahn_rt.swa_decode.default, tuple(a.values())
    for pos in (10, 100):
        a = _gdn_case(device, dt, 4, 2, 64, 64, pos, 4, 60, dt)
        yield torch.ops.ahn_rt.gdn_decode.default, tuple(a.values())
        a = _m2_case(device, dt, 4, 2, 64, 64, pos, 4, 60, dt)
        yield torch.ops.ahn_rt.mamba2_decode.default, tuple(a.values())
    a, _, _ = _prep_case(device, dt, 4, 2, 64, 4, 60, 70, "mamba2", False, "contig")
    a["k_evict"].zero_(), a["v_evict"].zero_(), a["alpha_evict"].zero_()
    yield torch.ops.ahn_rt.decode_prep.default, tuple(a.values())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


def test_bad_inputs_raise(device="cpu"):
    # CPU only: the checks are the same host code for every device, and on the GPU image used so far any
    # C++ exception thrown from a freshly built extension (even a 3-line load_inline one) segfaulted.
    q = torch.randn(4, 64, device=device)
    kc = torch.randn(2, 16, 64, device=device)
    pos = torch.tensor([3], device=device)
    with pytest.raises(RuntimeError, match="sinks \\+ window <= C"):
        torch.ops.ahn_rt.swa_decode(q=q, k_cache=kc, v_cache=kc, pos=pos, sinks=4, window=16, scale=0.1)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.ahn_rt.swa_decode(q=q, k_cache=kc, v_cache=kc, pos=pos.int(), sinks=4, window=8, scale=0.1)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.ahn_rt.swa_decode(q=q.bfloat16(), k_cache=kc, v_cache=kc, pos=pos, sinks=4, window=8, scale=0.1)
    a = _m2_case(device, torch.float32, 4, 2, 64, 64, 300, 4, 129, torch.float32)
    with pytest.raises(RuntimeError, match="norm_weight \\(over all H \\* Dv values\\) must be \\[256\\]"):
        torch.ops.ahn_rt.mamba2_decode(**dict(a, norm_weight=a["norm_weight"][:64]))
    with pytest.raises(RuntimeError, match="dt must be \\[4\\]"):
        torch.ops.ahn_rt.mamba2_decode(**dict(a, dt=a["dt"][:2]))
    a, _, _ = _prep_case(device, torch.float32, 4, 2, 64, 4, 60, 70, "mamba2", False, "contig")
    with pytest.raises(RuntimeError, match="a_log, beta_cache and beta_evict are given together"):
        torch.ops.ahn_rt.decode_prep(**dict(a, a_log=torch.zeros(4)))
    with pytest.raises(RuntimeError, match="dt_bias, alpha_cache and alpha_evict are given together"):
        torch.ops.ahn_rt.decode_prep(**dict(a, dt_bias=None))


@pytest.mark.parametrize("memory", ["gdn", "mamba2"])
@pytest.mark.parametrize("marks", [pytest.param(0, marks=cuda_only)])
def test_graph_replay_cuda(marks, memory):
    """decode_prep -> swa_decode -> gdn_decode (or decode_prep's Mamba2 gate -> swa_decode -> mamba2_decode)
    captured once in a CUDA graph, replayed with pos advanced on the device, against the references run
    step by step (across the fill point and a wrap)."""
    dev, dt = "cuda", torch.bfloat16
    H, Hkv, D, S, W = 8, 2, 128, 2, 6
    m2 = memory == "mamba2"
    C, P = S + W, (H + 2 * Hkv) * D + (2 if m2 else 3) * H
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    st = dict(proj=rnd(P).to(dt), k_cache=torch.zeros(Hkv, C, D, device=dev, dtype=dt),
              v_cache=torch.zeros(Hkv, C, D, device=dev, dtype=dt), beta_cache=torch.zeros(C, H, device=dev, dtype=dt),
              alpha_cache=torch.zeros(C, H, device=dev), k_evict=torch.zeros(Hkv, D, device=dev, dtype=dt),
              v_evict=torch.zeros(Hkv, D, device=dev, dtype=dt), beta_evict=torch.zeros(H, device=dev, dtype=dt),
              alpha_evict=torch.zeros(H, device=dev), state=torch.zeros(H, D, D, device=dev),
              out=torch.zeros(H, D, device=dev, dtype=dt), pos=torch.zeros(1, dtype=torch.long, device=dev))
    const = dict(inv_freq=1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D)), q_norm=None, k_norm=None,
                 norm_eps=1e-6, a_log=0.3 * rnd(H), dt_bias=rnd(H), sinks=S, window=W)
    mem_const = dict(z=rnd(H).to(dt), norm_weight=torch.ones(H * D if m2 else D, device=dev, dtype=dt),
                     o_proj=(rnd(H, D, D) / D ** 0.5).to(dt), eps=1e-6)
    if m2:   # Mamba2: the dt gate (no a_log, no beta) and a_log in the memory step
        const["a_log"], mem_const["a_log"] = None, const["a_log"]
        st["beta_cache"] = st["beta_evict"] = None
    ref_st = {k: (v.clone() if v is not None else None) for k, v in st.items()}

    def step(s, prep, swa, mem):
        q = prep(proj=s["proj"], pos=s["pos"], k_cache=s["k_cache"], v_cache=s["v_cache"],
                 beta_cache=s["beta_cache"], alpha_cache=s["alpha_cache"], k_evict=s["k_evict"],
                 v_evict=s["v_evict"], beta_evict=s["beta_evict"], alpha_evict=s["alpha_evict"], **const)
        s["out"].copy_(swa(q=q, k_cache=s["k_cache"], v_cache=s["v_cache"], pos=s["pos"], sinks=S, window=W,
                           scale=D ** -0.5))
        gates = dict(dt=s["alpha_evict"]) if m2 else dict(beta=s["beta_evict"], alpha=s["alpha_evict"])
        mem(state=s["state"], q=q, k=s["k_evict"], v=s["v_evict"], out=s["out"], pos=s["pos"], sinks=S, window=W,
            **gates, **mem_const)

    mem_op, mem_ref = ((torch.ops.ahn_rt.mamba2_decode, ref.mamba2_decode_ref) if m2 else
                       (torch.ops.ahn_rt.gdn_decode, ref.gdn_decode_ref))
    ops = (torch.ops.ahn_rt.decode_prep, torch.ops.ahn_rt.swa_decode, mem_op)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (allocations, counters)
        warm = {k: (v.clone() if v is not None else None) for k, v in st.items()}
        step(warm, *ops)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(st, *ops)
    for p in range(3 * (S + W)):
        proj = rnd(P).to(dt)
        st["proj"].copy_(proj), ref_st["proj"].copy_(proj)
        st["pos"].fill_(p), ref_st["pos"].fill_(p)
        graph.replay()
        step(ref_st, ref.decode_prep_ref, ref.swa_decode_ref, mem_ref)
        torch.cuda.synchronize()
        assert_bits(st["v_cache"], ref_st["v_cache"], f"pos {p} v_cache")
        assert_close(st["state"], ref_st["state"], torch.float32, f"pos {p} state") if p >= S + W else None
        assert_close(st["out"], ref_st["out"], dt, f"pos {p} out")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [7, 16384, 40000], ids=lambda r: f"N{r}")
def test_linear_half_cpu_in_float32_matches_torch(monkeypatch, rows, dtype):
    """ahn_rt.ops.linear runs CPU float16 in float32 blocks (torch's float16 CPU GEMM is ~10x slower), and
    bf16 too where the CPU has no fast bf16 GEMM (monkeypatched here: this machine may have one): the same
    values as torch's linear in that dtype up to summation order (TOL's row), bias included. A call with
    fewer than _UPCAST_ROWS rows stays in its dtype."""
    from ahn_rt import ops
    monkeypatch.setattr(ops, "_cpu_bf16_gemm", lambda: False)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(ops._UPCAST_ROWS + 5, 64, generator=g).to(dtype)
    w = (torch.randn(rows, 64, generator=g) / 8).to(dtype)
    b = torch.randn(rows, generator=g).to(dtype)
    assert ops._gemm_in_float32(x) and not ops._gemm_in_float32(x[:1])
    for bias in (None, b):
        got, want = ops.linear(x, w, bias), torch.nn.functional.linear(x, w, bias)
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"])


def _linear_add_cases(device):
    """(name, dtype, rows, float32 path forced) for ``test_linear_add_*``: half-precision rows through the
    CPU's float32 blocks and through its own GEMM (few rows), float32, and on CUDA the GEMM epilogue."""
    if device == "cpu":
        return [("f32", torch.float32, 40, False), ("bf16-few", torch.bfloat16, 5, False),
                ("bf16-blocks", torch.bfloat16, 40, True), ("f16-blocks", torch.float16, 40, True)]
    return [("bf16", torch.bfloat16, 300, False), ("f16", torch.float16, 300, False),
            ("f32", torch.float32, 300, False)]


@pytest.mark.parametrize("device", DEVICES)
def test_linear_add_adds_the_residual_in_the_gemm(monkeypatch, device):
    """ops.linear_add_ (the prefill's residual GEMMs): h += x @ w^T in place. On the CPU the sum is rounded
    once (the decode GEMV's residual): within half a unit in the last place of the float64 value (plus float32
    summation error), a bound that the two-rounding version (product rounded, then the sum) and the
    residual-dropping one fail. On CUDA cuBLAS adds h in its epilogue and rounds as it does (the product may
    be rounded first): within a GEMM's error bound, eps x (|value| + |h| + |x| |w|^T), which dropping the
    residual fails by far. With a bias, the biased product is rounded first, as h + linear(x, w, b)."""
    from ahn_rt import ops
    for name, dtype, rows, blocks in _linear_add_cases(device):
        monkeypatch.setattr(ops, "_cpu_bf16_gemm", lambda blocks=blocks: not blocks)
        g = torch.Generator().manual_seed(rows)
        h = (torch.randn(rows, 96, generator=g) * 4).to(dtype).to(device)
        x = torch.randn(rows, 256, generator=g).to(dtype).to(device)
        w = (torch.randn(96, 256, generator=g) / 16).to(dtype).to(device)
        b = torch.randn(96, generator=g).to(dtype).to(device)
        exact = h.double() + x.double() @ w.double().t()
        scale = h.double().abs() + x.double().abs() @ w.double().abs().t()
        eps, summation = torch.finfo(dtype).eps, 2 * x.shape[1] * 2.0 ** -24 * scale
        if device == "cpu":   # half a unit in the last place of the exact value, plus float32 summation
            bound = eps / 2 * exact.abs() + summation
        else:
            bound = eps * (exact.abs() + scale) + summation

        def within(out):
            return bool(((out.double() - exact).abs() <= bound).all())
        out = h.clone()
        assert ops.linear_add_(out, x, w) is out, name
        assert within(out), f"{name}: {((out.double() - exact).abs() / bound).max().item():.2f} of the bound"
        assert not within(h.clone().copy_(torch.nn.functional.linear(x, w))), f"{name}: no residual passes too"
        if device == "cpu" and dtype != torch.float32:
            assert not within(h + torch.nn.functional.linear(x, w)), f"{name}: two roundings pass too"
        out = h.clone()
        ops.linear_add_(out, x, w, b)
        want = h + torch.nn.functional.linear(x, w, b)
        torch.testing.assert_close(out, want, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"])


def test_linear_in_float32_only_where_it_pays(monkeypatch):
    """Which CPU GEMMs run in float32: float16, and bf16 without a fast bf16 GEMM, each with enough rows;
    float32, float64 and CUDA tensors never."""
    from ahn_rt import ops
    many, few = torch.zeros(ops._UPCAST_ROWS, 8), torch.zeros(ops._UPCAST_ROWS - 1, 8)
    for fast in (False, True):
        monkeypatch.setattr(ops, "_cpu_bf16_gemm", lambda fast=fast: fast)
        assert ops._gemm_in_float32(many.half()) and not ops._gemm_in_float32(few.half())
        assert ops._gemm_in_float32(many.bfloat16()) == (not fast)
        assert not ops._gemm_in_float32(few.bfloat16())
        assert not ops._gemm_in_float32(many) and not ops._gemm_in_float32(many.double())
        if torch.cuda.is_available():
            assert not ops._gemm_in_float32(many.bfloat16().cuda())
