"""The decode ops called with ``slots`` (one token for each of B sessions of a state pool in one call):
``decode_prep``, ``swa_decode`` and ``gdn_decode`` over per-entry tensors [N, ...] and per-row tensors
[B, ...], row b using entry slots[b].

Row b of a batched call must be bit for bit the op called alone on entry slots[b]'s views, for every
output and every tensor the op writes; entries not named in slots stay untouched; the batched op agrees
with the batched reference. The pool mixes positions still filling the window, just below and far past
the fill point. A negative control shows the comparison sees a wrong slot mapping. CPU cases run
everywhere; the same cases on CUDA are marked `cuda`.
"""
from __future__ import annotations

import pytest
import torch

import ahn_rt._C  # noqa: F401  (registers torch.ops.ahn_rt.*)
import ahn_rt._meta  # noqa: F401  (fake kernels, needed by opcheck)
from ahn_rt import ref

_NO_GPU = not torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(_NO_GPU, reason="no GPU")])]
DTYPES = [torch.float32, torch.bfloat16]
S, W = 2, 8
POS = [2, 40, S + W - 1, 300, S + W + 1]      # entries: filling, past, just below, far past, just past
SLOTS = [3, 0, 4]                              # rows -> entries (a permuted subset; 1 and 2 untouched)
TOL = {torch.float32: dict(rtol=3e-4, atol=1e-3), torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


def dname(dtype):
    return str(dtype).replace("torch.", "")


def _rand(g, *shape, dtype, device, scale=1.0, lo=None, hi=None):
    if lo is not None:
        t = torch.rand(*shape, generator=g) * (hi - lo) + lo
    else:
        t = torch.randn(*shape, generator=g) * scale
    return t.to(dtype).to(device)


def _clone(args):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


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
    g = torch.Generator().manual_seed(seed)
    N, B, C = len(POS), len(SLOTS), S + W
    P = (H + 2 * Hkv) * D + (3 * H if gated else 0)
    r = lambda *s, **kw: _rand(g, *s, dtype=dtype, device=device, **kw)  # noqa: E731
    f32 = lambda *s, **kw: _rand(g, *s, dtype=torch.float32, device=device, **kw)  # noqa: E731
    return dict(
        proj=r(B, P), inv_freq=(1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)).to(device),
        pos=torch.tensor(POS, dtype=torch.int64, device=device),
        q_norm=r(D, lo=0.5, hi=1.5) if qk_norm else None, k_norm=r(D, lo=0.5, hi=1.5) if qk_norm else None,
        norm_eps=1e-6, a_log=f32(H, lo=0.0, hi=2.0) if gated else None, dt_bias=f32(H) if gated else None,
        k_cache=r(N, Hkv, C, D), v_cache=r(N, Hkv, C, D),
        beta_cache=r(N, C, H, lo=0.05, hi=0.95) if gated else None,
        alpha_cache=f32(N, C, H, lo=-0.5, hi=-0.01) if gated else None, sinks=S, window=W,
        k_evict=r(N, Hkv, D), v_evict=r(N, Hkv, D), beta_evict=r(N, H) if gated else None,
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


GDN_ROWS = ("q", "z", "out")
GDN_ENTRIES = ("state", "k", "v", "beta", "alpha")


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
@pytest.mark.parametrize("gated, qk_norm", [(True, False), (False, True)])
def test_decode_prep_batched(device, dtype, H, Hkv, gated, qk_norm):
    args = _prep_case(device, dtype, H, Hkv, 16, gated, qk_norm)
    _check(torch.ops.ahn_rt.decode_prep, args, PREP_ROWS, PREP_ENTRIES, PREP_ENTRIES, ref.decode_prep_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("H, Hkv, D", [(4, 2, 16), (3, 3, 8), (16, 2, 128)])
def test_swa_decode_batched(device, dtype, H, Hkv, D):
    args = _swa_case(device, dtype, H, Hkv, D)
    _check(torch.ops.ahn_rt.swa_decode, args, ("q",), ("k_cache", "v_cache"), (), ref.swa_decode_ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dname)
@pytest.mark.parametrize("H, Hkv, D", [(4, 2, 16), (3, 3, 8), (16, 2, 128)])
def test_gdn_decode_batched(device, dtype, H, Hkv, D):
    args = _gdn_case(device, dtype, H, Hkv, D)
    _, batched = _check(torch.ops.ahn_rt.gdn_decode, args, GDN_ROWS, GDN_ENTRIES, ("state", "out"),
                        ref.gdn_decode_ref, dtype)
    # rows on entries past the fill point changed the state and the output; the row at position 2 did not
    assert not torch.equal(batched["state"][3], args["state"][3])
    assert torch.equal(batched["state"][0], args["state"][0]) and torch.equal(batched["out"][1], args["out"][1])


@pytest.mark.parametrize("device", DEVICES)
def test_a_wrong_slot_mapping_is_seen(device):
    """Negative control: rows run on other entries than the comparison expects give other results."""
    args = _swa_case(device, torch.float32, 4, 2, 16)
    with pytest.raises(AssertionError, match="differs"):
        wrong = _clone(args)
        wrong["slots"] = torch.tensor(SLOTS[::-1], dtype=torch.int64, device=device)
        out = torch.ops.ahn_rt.swa_decode(**wrong)
        alone = [torch.ops.ahn_rt.swa_decode(**_row_views(args, b, e, ("q",), ("k_cache", "v_cache")))
                 for b, e in enumerate(SLOTS)]
        assert torch.equal(out, torch.stack(alone)), "batched output differs from the rows alone"


def test_batched_mistakes_are_one_line():
    args = _swa_case("cpu", torch.float32, 4, 2, 16)
    op = torch.ops.ahn_rt.swa_decode
    for slots, msg in ((torch.tensor([0.0, 1.0, 2.0]), "contiguous int64"),
                       (torch.tensor([0, 1, 5]), "outside the 5 state entries"),
                       (torch.tensor([0, 1, 1]), "appears twice")):
        with pytest.raises(RuntimeError, match=msg):
            op(**{**args, "slots": slots})
    with pytest.raises(RuntimeError, match="with slots, q must be"):
        op(**{**args, "q": args["q"][:2]})
    with pytest.raises(RuntimeError, match="with slots, pos must be"):
        op(**{**args, "pos": args["pos"][:3]})
    g = _gdn_case("cpu", torch.float32, 4, 2, 16)
    with pytest.raises(RuntimeError, match="with slots, z must be"):
        torch.ops.ahn_rt.gdn_decode(**{**g, "z": g["z"][0]})
    p = _prep_case("cpu", torch.float32, 4, 2, 16, True, False)
    with pytest.raises(RuntimeError, match="with slots, k_evict must be"):
        torch.ops.ahn_rt.decode_prep(**{**p, "k_evict": p["k_evict"][0]})


@pytest.mark.parametrize("device", DEVICES)
def test_batched_opcheck(device):
    dt = torch.bfloat16
    for op, args in ((torch.ops.ahn_rt.swa_decode.default, _swa_case(device, dt, 4, 2, 16)),
                     (torch.ops.ahn_rt.gdn_decode.default, _gdn_case(device, dt, 4, 2, 16)),
                     (torch.ops.ahn_rt.decode_prep.default, _prep_case(device, dt, 4, 2, 16, True, True))):
        torch.library.opcheck(op, (), args)
