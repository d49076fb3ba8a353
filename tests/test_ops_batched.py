"""The decode ops called with ``slots`` (one token for each of B sessions of a state pool in one call):
``decode_prep``, ``swa_decode``, ``gdn_decode`` and ``mamba2_decode`` over per-entry tensors [N, ...] and per-row tensors
[B, ...], row b using entry slots[b].

Row b of a batched call must be bit for bit the op called alone on entry slots[b]'s views, for every
output and every tensor the op writes; entries not named in slots stay untouched; the batched op agrees
with the batched reference. The pool mixes positions still filling the window, just below and far past
the fill point. Per-row and per-entry tensors come contiguous or strided (rows of a wider buffer, every
other entry of a larger pool). A negative control per op shows the comparison sees a wrong slot mapping.
CPU cases run everywhere; the same cases on CUDA are marked `cuda` (plus a CUDA graph replayed with new
values in its slots buffer).
"""
from __future__ import annotations

import pytest
import torch

import ahn_rt._C  # noqa: F401  (registers torch.ops.ahn_rt.*)
import ahn_rt._meta  # noqa: F401  (fake kernels, needed by opcheck)
from ahn_rt import ref

_NO_GPU = not torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(_NO_GPU, reason="no GPU")])]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
S, W = 2, 8
POS = [2, 40, S + W - 1, 300, S + W + 1]      # entries: filling, past, just below, far past, just past
SLOTS = [3, 0, 4]                              # rows -> entries (a permuted subset; 1 and 2 untouched)
TOL = {torch.float32: dict(rtol=3e-4, atol=1e-3), torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
       torch.float16: dict(rtol=5e-3, atol=1e-2)}
LAYOUTS = ["contig", "strided"]


def dname(dtype):
    return str(dtype).replace("torch.", "")


def _rand(g, *shape, dtype, device, scale=1.0, lo=None, hi=None):
    if lo is not None:
        t = torch.rand(*shape, generator=g) * (hi - lo) + lo
    else:
        t = torch.randn(*shape, generator=g) * scale
    return t.to(dtype).to(device)


def _clone_t(t):
    """A copy with t's sizes AND strides (Tensor.clone makes a strided view contiguous)."""
    c = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    return c.copy_(t)


def _clone(args):
    return {k: _clone_t(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _layout(args, layout, rows, entries):
    """'strided': each per-row tensor becomes a view into a buffer 8 wider in its last dim (last dim still
    contiguous, rows strided), each per-entry tensor the even entries of a pool twice as large (a leading
    stride that is not the entry size). Values unchanged."""
    if layout == "contig":
        return args
    out = dict(args)
    for k in rows:
        v = args[k]
        if v is not None:
            big = torch.zeros(*v.shape[:-1], v.shape[-1] + 8, dtype=v.dtype, device=v.device)
            out[k] = big[..., :v.shape[-1]]
            out[k].copy_(v)
    for k in entries:
        v = args[k]
        if v is not None:
            big = torch.zeros(2 * v.shape[0], *v.shape[1:], dtype=v.dtype, device=v.device)
            out[k] = big[::2]
            out[k].copy_(v)
    return out


def _row_views(args, b, e, rows, entries):
    """The unbatched call of row b on entry e: per-row tensors at b, per-entry at e, pos[e:e+1]."""
    out = {}
    for k, v in args.items():
        if k == "slots":
            continue
        if k == "pos":
            out[k] = v[e:e + 1]
        elif k in rows and v is not None:
            out[k] = v[b]
        elif k in entries and v is not None:
            out[k] = v[e]
        else:
            out[k] = v
    return out


def _prep_case(device, dtype, H, Hkv, D, gated, qk_norm, seed=0):
    """gated: True (GatedDeltaNet's beta and alpha), "mamba2" (its dt gate alone) or False (no memory)."""
    g = torch.Generator().manual_seed(seed)
    N, B, C = len(POS), len(SLOTS), S + W
    beta = gated is True
    P = (H + 2 * Hkv) * D + ((3 if beta else 2) * H if gated else 0)
    r = lambda *s, **kw: _rand(g, *s, dtype=dtype, device=device, **kw)  # noqa: E731
    f32 = lambda *s, **kw: _rand(g, *s, dtype=torch.float32, device=device, **kw)  # noqa: E731
    return dict(
        proj=r(B, P), inv_freq=(1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)).to(device),
        pos=torch.tensor(POS, dtype=torch.int64, device=device),
        q_norm=r(D, lo=0.5, hi=1.5) if qk_norm else None, k_norm=r(D, lo=0.5, hi=1.5) if qk_norm else None,
        norm_eps=1e-6, a_log=f32(H, lo=0.0, hi=2.0) if beta else None, dt_bias=f32(H) if gated else None,
        k_cache=r(N, Hkv, C, D), v_cache=r(N, Hkv, C, D),
        beta_cache=r(N, C, H, lo=0.05, hi=0.95) if beta else None,
        alpha_cache=f32(N, C, H, lo=-0.5, hi=-0.01) if gated else None, sinks=S, window=W,
        k_evict=r(N, Hkv, D), v_evict=r(N, Hkv, D), beta_evict=r(N, H) if beta else None,
        alpha_evict=f32(N, H) if gated else None,
        slots=torch.tensor(SLOTS, dtype=torch.int64, device=device))


PREP_ROWS = ("proj",)
PREP_ENTRIES = ("k_cache", "v_cache", "beta_cache", "alpha_cache", "k_evict", "v_evict", "beta_evict", "alpha_evict")


def _swa_case(device, dtype, H, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, B, C = len(POS), len(SLOTS), S + W
    r = lambda *s: _rand(g, *s, dtype=dtype, device=device)  # noqa: E731
    return dict(q=r(B, H, D), k_cache=r(N, Hkv, C, D), v_cache=r(N, Hkv, C, D),
                pos=torch.tensor(POS, dtype=torch.int64, device=device), sinks=S, window=W, scale=D ** -0.5,
                slots=torch.tensor(SLOTS, dtype=torch.int64, device=device))


def _gdn_case(device, dtype, H, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, B = len(POS), len(SLOTS)
    r = lambda *s, **kw: _rand(g, *s, dtype=dtype, device=device, **kw)  # noqa: E731
    return dict(state=_rand(g, N, H, D, D, dtype=torch.float32, device=device, scale=0.1), q=r(B, H, D),
                k=r(N, Hkv, D), v=r(N, Hkv, D), beta=r(N, H, lo=0.05, hi=0.95),
                alpha=_rand(g, N, H, dtype=torch.float32, device=device, lo=-0.5, hi=-0.01), z=r(B, H),
                norm_weight=r(D, lo=0.5, hi=1.5), o_proj=r(H, D, D, scale=D ** -0.5), out=r(B, H, D),
                pos=torch.tensor(POS, dtype=torch.int64, device=device), sinks=S, window=W, eps=1e-6,
                slots=torch.tensor(SLOTS, dtype=torch.int64, device=device))


MEMORY_ROWS = ("q", "z", "out")
GDN_ENTRIES = ("state", "k", "v", "beta", "alpha")


def _m2_case(device, dtype, H, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, B = len(POS), len(SLOTS)
    r = lambda *s, **kw: _rand(g, *s, dtype=dtype, device=device, **kw)  # noqa: E731
    f32 = lambda *s, **kw: _rand(g, *s, dtype=torch.float32, device=device, **kw)  # noqa: E731
    return dict(state=f32(N, H, D, D, scale=0.1), q=r(B, H, D), k=r(N, Hkv, D), v=r(N, Hkv, D),
                dt=f32(N, H, lo=0.001, hi=0.5), a_log=f32(H, lo=0.0, hi=2.0), z=r(B, H),
                norm_weight=r(H * D, lo=0.5, hi=1.5), o_proj=r(H, D, D, scale=D ** -0.5), out=r(B, H, D),
                pos=torch.tensor(POS, dtype=torch.int64, device=device), sinks=S, window=W, eps=1e-5,
                slots=torch.tensor(SLOTS, dtype=torch.int64, device=device))


M2_ENTRIES = ("state", "k", "v", "dt")


def _check(op, args, rows, entries, written, ref_fn, dtype, slots=SLOTS):
    """The batched op on `args` (with `slots`) against the op per row on clones; returns the batched
    result and written tensors (for further checks)."""
    batched = _clone(args)
    batched["slots"] = torch.tensor(slots, dtype=torch.int64, device=args["pos"].device)
    out = op(**batched)
    alone = _clone(args)
    outs = []
    for b, e in enumerate(slots):
        outs.append(op(**_row_views(alone, b, e, rows, entries)))
    if out is not None:
        assert torch.equal(out, torch.stack(outs)), "batched output differs from the rows alone"
    for k in written:
        if args[k] is not None:
            assert torch.equal(batched[k], alone[k]), f"{k}: batched writes differ from the rows alone"
    untouched = sorted(set(range(len(POS))) - set(slots))
    for k in entries:
        if args[k] is not None:
            for e in untouched:
                assert torch.equal(batched[k][e], args[k][e]), f"{k}: entry {e} (not in slots) was written"
    reference = _clone(args)
    reference["slots"] = batched["slots"].cpu()
    reference = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in reference.items()}
    want = ref_fn(**reference)
    if out is not None:
        torch.testing.assert_close(out.cpu().float(), want.float(), **TOL[dtype])
    for k in written:
        if args[k] is not None:
            tol = TOL[dtype] if batched[k].dtype != torch.float32 else TOL[torch.float32] \
                if dtype == torch.float32 else TOL[torch.bfloat16]
            torch.testing.assert_close(batched[k].cpu().float(), reference[k].float(), **tol, msg=k)
    return out, batched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("H, Hkv", [(4, 2), (3, 3)])
@pytest.mark.parametrize("gated, qk_norm", [(True, False), ("mamba2", False), ("mamba2", True), (False, True)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_prep_batched(device, dtype, H, Hkv, gated, qk_norm, layout):
    args = _layout(_prep_case(device, dtype, H, Hkv, 16, gated, qk_norm), layout, PREP_ROWS, PREP_ENTRIES)
    _check(torch.ops.ahn_rt.decode_prep, args, PREP_ROWS, PREP_ENTRIES, PREP_ENTRIES, ref.decode_prep_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("H, Hkv, D", [(4, 2, 16), (3, 3, 8), (16, 2, 128)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_swa_decode_batched(device, dtype, H, Hkv, D, layout):
    args = _layout(_swa_case(device, dtype, H, Hkv, D), layout, ("q",), ("k_cache", "v_cache"))
    _check(torch.ops.ahn_rt.swa_decode, args, ("q",), ("k_cache", "v_cache"), (), ref.swa_decode_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("H, Hkv, D", [(4, 2, 16), (3, 3, 8), (16, 2, 128)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("memory", ["gdn", "mamba2"])
def test_memory_decode_batched(device, dtype, H, Hkv, D, layout, memory):
    """gdn_decode / mamba2_decode with slots. z strided too (any element stride); the state keeps each entry
    contiguous (every other entry of a pool)."""
    case, op, reference, entries = ((_gdn_case, torch.ops.ahn_rt.gdn_decode, ref.gdn_decode_ref, GDN_ENTRIES)
                                    if memory == "gdn" else
                                    (_m2_case, torch.ops.ahn_rt.mamba2_decode, ref.mamba2_decode_ref, M2_ENTRIES))
    args = _layout(case(device, dtype, H, Hkv, D), layout, MEMORY_ROWS, entries)
    if layout == "strided":
        args["z"] = torch.stack([args["z"], torch.zeros_like(args["z"])], dim=-1)[..., 0]
    _, batched = _check(op, args, MEMORY_ROWS, entries, ("state", "out"), reference, dtype)
    # rows on entries past the fill point changed the state and the output; the row at position 2 did not
    assert not torch.equal(batched["state"][3], args["state"][3])
    assert torch.equal(batched["state"][0], args["state"][0]) and torch.equal(batched["out"][1], args["out"][1])


@pytest.mark.cuda
@pytest.mark.skipif(_NO_GPU, reason="no GPU")
@pytest.mark.parametrize("D", [128, 96])
def test_swa_decode_batch_blocks_loop_over_splits(D):
    """At batch 16 over an 8192-slot cache the tensor-core kernel launches fewer blocks than splits, each
    taking every split_blocks-th split (one call alone launches one block per split). Every row equals its
    call alone bit for bit and the reference; positions cover a split's first key, split boundaries, the
    fill point and far past it. D = 96 leaves pad columns in the 128-wide tiles, which the loop re-zeroes."""
    dev, dt = "cuda", torch.bfloat16
    H, Hkv, S, C = 16, 2, 4, 8192
    pos = [0, 1, 47, 48, 95, 500, 1023, 4096, 8000, 8187, 8188, 8191, 9000, 20000, 100000, 3]
    B = len(pos)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, D, generator=g).to(dev, dt)
    kc = torch.randn(B, Hkv, C, D, generator=g).to(dev, dt)
    vc = torch.randn(B, Hkv, C, D, generator=g).to(dev, dt)
    pos_t = torch.tensor(pos, dtype=torch.int64, device=dev)
    slots = torch.arange(B, device=dev).flip(0)
    out = torch.ops.ahn_rt.swa_decode(q, kc, vc, pos_t, S, C - S, D ** -0.5, slots)
    for b, e in enumerate(slots.tolist()):
        alone = torch.ops.ahn_rt.swa_decode(q[b], kc[e], vc[e], pos_t[e:e + 1], S, C - S, D ** -0.5, None)
        assert torch.equal(out[b], alone), f"row {b} (entry {e}, pos {pos[e]}) differs from its call alone"
        want = ref.swa_decode_ref(q[b].cpu().float(), kc[e].cpu().float(), vc[e].cpu().float(), pos_t[e:e + 1].cpu(),
                                  S, C - S, D ** -0.5)
        torch.testing.assert_close(out[b].cpu().float(), want, **TOL[dt])


def _reversed_slots(op):
    """The op with its slots reversed when called batched (a wrong row -> entry mapping); alone unchanged."""
    def wrong(**a):
        if a.get("slots") is not None:
            a = {**a, "slots": a["slots"].flip(0)}
        return op(**a)
    return wrong


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["decode_prep", "swa_decode", "gdn_decode", "mamba2_decode"])
def test_a_wrong_slot_mapping_is_seen(device, which):
    """Negative control: the same comparison (_check) on an op whose rows run on reversed entries fails."""
    dt = torch.float32
    if which == "decode_prep":
        case = (torch.ops.ahn_rt.decode_prep, _prep_case(device, dt, 4, 2, 16, True, False), PREP_ROWS,
                PREP_ENTRIES, PREP_ENTRIES, ref.decode_prep_ref)
    elif which == "swa_decode":
        case = (torch.ops.ahn_rt.swa_decode, _swa_case(device, dt, 4, 2, 16), ("q",), ("k_cache", "v_cache"), (),
                ref.swa_decode_ref)
    elif which == "gdn_decode":
        case = (torch.ops.ahn_rt.gdn_decode, _gdn_case(device, dt, 4, 2, 16), MEMORY_ROWS, GDN_ENTRIES,
                ("state", "out"), ref.gdn_decode_ref)
    else:
        case = (torch.ops.ahn_rt.mamba2_decode, _m2_case(device, dt, 4, 2, 16), MEMORY_ROWS, M2_ENTRIES,
                ("state", "out"), ref.mamba2_decode_ref)
    op, args, rows, entries, written, ref_fn = case
    _check(op, args, rows, entries, written, ref_fn, dt)  # the right mapping passes
    with pytest.raises(AssertionError, match="differ"):
        _check(_reversed_slots(op), args, rows, entries, written, ref_fn, dt)


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg.strip(), msg
    return msg


BAD_SLOTS = [(torch.tensor([0.0, 1.0, 2.0]), "contiguous int64 tensor \\[B\\]"),
             (torch.tensor([0, 1, 2], dtype=torch.int32), "contiguous int64 tensor \\[B\\]"),
             (torch.tensor([[0, 1, 2]]), "contiguous int64 tensor \\[B\\]"),
             (torch.tensor([], dtype=torch.int64), "with B >= 1"),
             (torch.tensor([0, 2, 4, 6])[::2], "contiguous int64"),
             (torch.tensor([0, 1, 5]), "slots\\[2\\] = 5 is outside the 5 state entries"),
             (torch.tensor([-1, 0]), "slots\\[0\\] = -1 is outside the 5 state entries"),
             (torch.tensor([0, 1, 1]), "slot 1 appears twice"),
             (torch.tensor([0, 1, 2, 3, 4, 0]), "6 slots for 5 state entries")]


@pytest.mark.parametrize("which", ["decode_prep", "swa_decode", "gdn_decode", "mamba2_decode"])
@pytest.mark.parametrize("slots, msg", BAD_SLOTS, ids=range(len(BAD_SLOTS)))
def test_bad_slots_are_one_line(which, slots, msg):
    """CPU only (as test_ops.test_bad_inputs_raise): wrong slots dtype / shape / range / repeats, every op."""
    op = getattr(torch.ops.ahn_rt, which)
    args = {"decode_prep": lambda: _prep_case("cpu", torch.float32, 4, 2, 16, True, False),
            "swa_decode": lambda: _swa_case("cpu", torch.float32, 4, 2, 16),
            "gdn_decode": lambda: _gdn_case("cpu", torch.float32, 4, 2, 16),
            "mamba2_decode": lambda: _m2_case("cpu", torch.float32, 4, 2, 16)}[which]()
    before = _clone(args)
    with pytest.raises(RuntimeError, match=f"^ahn_rt\\.{which}: .*{msg}") as e:
        op(**{**args, "slots": slots})
    _one_line(e)
    for k, v in args.items():  # a rejected call writes nothing
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k


# (op, the argument made wrong, how, the message): a batched call with one tensor of the wrong form
MISTAKES = [("swa_decode", "q", lambda t: t[:2], "with slots, q must be"),
            ("swa_decode", "pos", lambda t: t[:3], "with slots, pos must be"),
            ("swa_decode", "k_cache", lambda t: t[0], "with slots, k_cache must be"),
            ("gdn_decode", "z", lambda t: t[0], "with slots, z must be"),
            ("gdn_decode", "state", lambda t: t[0], "with slots, state must be"),
            ("gdn_decode", "beta", lambda t: t[:2], "with slots, beta must be"),
            ("mamba2_decode", "dt", lambda t: t[:2], "with slots, dt must be"),
            ("decode_prep", "k_evict", lambda t: t[0], "with slots, k_evict must be"),
            ("decode_prep", "proj", lambda t: t[0], "with slots, proj must be"),
            ("decode_prep", "alpha_cache", lambda t: t[0], "with slots, beta_cache/alpha_cache must be")]


@pytest.mark.parametrize("which, key, bad, msg", MISTAKES, ids=[f"{w}-{k}" for w, k, _, _ in MISTAKES])
def test_batched_mistakes_are_one_line(which, key, bad, msg):
    args = {"swa_decode": lambda: _swa_case("cpu", torch.float32, 4, 2, 16),
            "gdn_decode": lambda: _gdn_case("cpu", torch.float32, 4, 2, 16),
            "mamba2_decode": lambda: _m2_case("cpu", torch.float32, 4, 2, 16),
            "decode_prep": lambda: _prep_case("cpu", torch.float32, 4, 2, 16, True, False)}[which]()
    with pytest.raises(RuntimeError, match=msg) as e:
        getattr(torch.ops.ahn_rt, which)(**{**args, key: bad(args[key])})
    _one_line(e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=dname)
def test_batched_opcheck(device, dt):
    for op, args in ((torch.ops.ahn_rt.swa_decode.default, _swa_case(device, dt, 4, 2, 16)),
                     (torch.ops.ahn_rt.gdn_decode.default, _gdn_case(device, dt, 4, 2, 16)),
                     (torch.ops.ahn_rt.mamba2_decode.default, _m2_case(device, dt, 4, 2, 16)),
                     (torch.ops.ahn_rt.decode_prep.default, _prep_case(device, dt, 4, 2, 16, True, True)),
                     (torch.ops.ahn_rt.decode_prep.default, _prep_case(device, dt, 4, 2, 16, "mamba2", True))):
        torch.library.opcheck(op, (), args)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_wrappers_pass_slots(device):
    """ahn_rt.ops.<op>(..., slots=...) is the compiled op with slots, and under use_backend('ref') the
    batched reference (same signature)."""
    from ahn_rt import ops
    dt = torch.bfloat16
    for name, case, written in (("decode_prep", _prep_case(device, dt, 4, 2, 16, True, True), PREP_ENTRIES),
                                ("swa_decode", _swa_case(device, dt, 4, 2, 16), ()),
                                ("gdn_decode", _gdn_case(device, dt, 4, 2, 16), ("state", "out")),
                                ("mamba2_decode", _m2_case(device, dt, 4, 2, 16), ("state", "out"))):
        for backend, fn in (("auto", getattr(torch.ops.ahn_rt, name)), ("ref", getattr(ref, name + "_ref"))):
            a, b = _clone(case), _clone(case)
            with ops.use_backend(backend):
                got = getattr(ops, name)(**a)
            want = fn(**b)
            assert (got is None) == (want is None) and (got is None or torch.equal(got, want)), (name, backend)
            for k in written:
                if case[k] is not None:
                    assert torch.equal(a[k], b[k]), (name, backend, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dname)
@pytest.mark.parametrize("memory", ["gdn", "mamba2"])
def test_decode_step_with_new_slots_each_call(device, dtype, memory):
    """decode_prep -> swa_decode -> gdn_decode (or mamba2_decode, after decode_prep's dt gate) over a pool, batched by ONE slots buffer whose values change
    between calls (on CUDA the three ops are captured once in a CUDA graph and replayed: the kernels read
    the slots on the device), against every entry stepped alone by the unbatched ops on its views, bit for
    bit, over steps that cross the fill point. The positions of the stepped entries advance between calls."""
    H, Hkv, D, N, B = 4, 2, 16, len(POS), len(SLOTS)
    m2 = memory == "mamba2"
    C, P = S + W, (H + 2 * Hkv) * D + (2 if m2 else 3) * H
    g = torch.Generator().manual_seed(7)
    r = lambda *s, dt=dtype, **kw: _rand(g, *s, dtype=dt, device=device, **kw)  # noqa: E731
    pool = dict(k_cache=r(N, Hkv, C, D), v_cache=r(N, Hkv, C, D), beta_cache=r(N, C, H, lo=0.05, hi=0.95),
                alpha_cache=r(N, C, H, dt=torch.float32, lo=-0.5, hi=-0.01), k_evict=r(N, Hkv, D),
                v_evict=r(N, Hkv, D), beta_evict=r(N, H), alpha_evict=r(N, H, dt=torch.float32),
                state=r(N, H, D, D, dt=torch.float32, scale=0.1),
                pos=torch.tensor(POS, dtype=torch.int64, device=device))
    const = dict(inv_freq=(1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)).to(device),
                 q_norm=r(D, lo=0.5, hi=1.5), k_norm=r(D, lo=0.5, hi=1.5), norm_eps=1e-6,
                 a_log=r(H, dt=torch.float32, lo=0.0, hi=2.0), dt_bias=r(H, dt=torch.float32), sinks=S, window=W)
    gconst = dict(norm_weight=r(H * D if m2 else D, lo=0.5, hi=1.5), o_proj=r(H, D, D, scale=D ** -0.5), sinks=S,
                  window=W, eps=1e-6)
    if m2:   # the dt gate in the float32 field (positive), no beta; a_log moves to the memory step
        for k in ("beta_cache", "beta_evict"):
            del pool[k]
        pool["alpha_cache"] = r(N, C, H, dt=torch.float32, lo=0.001, hi=0.5)
        gconst["a_log"], const["a_log"] = const["a_log"], None
    io = dict(proj=r(B, P), slots=torch.tensor(SLOTS, dtype=torch.int64, device=device),
              out=torch.zeros(B, H, D, dtype=dtype, device=device))
    ops = torch.ops.ahn_rt

    def step(s, proj, out, slots):  # batched when slots is given, else one entry's views (proj [P], out [H, D])
        sl = {} if slots is None else {"slots": slots}
        q = ops.decode_prep(proj=proj, pos=s["pos"], k_cache=s["k_cache"], v_cache=s["v_cache"],
                            beta_cache=s.get("beta_cache"), alpha_cache=s["alpha_cache"], k_evict=s["k_evict"],
                            v_evict=s["v_evict"], beta_evict=s.get("beta_evict"), alpha_evict=s["alpha_evict"],
                            **const, **sl)
        out.copy_(ops.swa_decode(q=q, k_cache=s["k_cache"], v_cache=s["v_cache"], pos=s["pos"], sinks=S, window=W,
                                 scale=D ** -0.5, **sl))
        mem = dict(state=s["state"], q=q, k=s["k_evict"], v=s["v_evict"], z=proj[..., P - H:], out=out, pos=s["pos"])
        if m2:
            ops.mamba2_decode(**mem, dt=s["alpha_evict"], **gconst, **sl)
        else:
            ops.gdn_decode(**mem, beta=s["beta_evict"], alpha=s["alpha_evict"], **gconst, **sl)

    alone = _clone(pool)
    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph, on copies
            step(_clone(pool), io["proj"].clone(), io["out"].clone(), io["slots"].clone())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(pool, io["proj"], io["out"], io["slots"])
        run = graph.replay
    else:
        def run():
            step(pool, io["proj"], io["out"], io["slots"])
    pick = torch.Generator().manual_seed(3)
    seen = set()
    for i in range(14):
        slots = SLOTS if i == 0 else torch.randperm(N, generator=pick)[:B].tolist()
        io["slots"].copy_(torch.tensor(slots))
        io["proj"].copy_(r(B, P))
        run()
        for b, e in enumerate(slots):
            views = {k: v[e:e + 1] if k == "pos" else v[e] for k, v in alone.items()}
            out_b = torch.zeros(H, D, dtype=dtype, device=device)
            step(views, io["proj"][b], out_b, None)
            assert torch.equal(io["out"][b], out_b), f"step {i} row {b} (entry {e}): out differs"
            seen.add((e, int(alone["pos"][e]) >= S + W))
        for k in pool:
            assert torch.equal(pool[k], alone[k]), f"step {i}: {k} differs"
        for t in (pool, alone):
            t["pos"][torch.tensor(slots, device=device)] += 1
    # some entry was stepped both while filling and past the fill point (entry 2 starts at S + W - 1)
    assert any((e, False) in seen and (e, True) in seen for e in range(N)), seen
