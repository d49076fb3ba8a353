"""The two gated-delta-rule references of ahn_rt/ref.py (gdn_recurrent_ref: token by token; gdn_chunk_ref:
chunked WY form in blocks of 64) against an independent float64 recurrence written here from the math
(docs/semantics.md §5), and against each other: lengths around the block size, with and without an initial
state, GQA (H = 4 query heads on Hkv = 2 kv heads) and Dk != Dv; outputs and final state. Wrong recurrences
(read before write, no decay, kv heads tiled instead of interleaved) are shown to miss by far more than the
tolerance, so the comparison can fail.

The references compute in float32 whatever the input dtype (``_gdn_inputs`` upcasts with ``.float()``) and
take a float32 state only; test_references_compute_in_float32 pins that.
"""
import pytest
import torch

from ahn_rt.ref import gdn_chunk_ref, gdn_recurrent_ref

# ---- tolerance table ------------------------------------------------------------------------------
# References (float32 math) vs the float64 recurrence, and chunk vs recurrent. Measured over every case
# here: ||out - exact|| / ||exact|| <= 4.0e-7 (chunk; recurrent 1.6e-7), state <= 5.0e-7; max abs error
# 1.4e-7 (out, |out| < 0.4) and 6.0e-7 (state, |S| = O(1)). Bounds 10x / 17x above the worst measured
# (float32 rounding, growing slowly with the number of steps).
REL = 5e-6          # norm-relative error bound, outputs and state
ABS = 1e-5          # element-wise absolute error bound
# A wrong recurrence must miss the float64 one by at least FAIL_FACTOR x REL (measured: >= 0.3 relative,
# i.e. >= 6e4 x REL, wherever the mutation changes the math at all).
FAIL_FACTOR = 1e3
L2_EPS = 1e-6       # q, k are l2-normalized as x / (||x|| + eps) (docs/semantics.md §5)

H, HKV, DK, DV = 4, 2, 32, 16
LENGTHS = [1, 63, 64, 65, 129]


def gdn_f64(q, k, v, beta, alpha, state, *, read_first=False, decay=True, tile_kv=False):
    """Float64 gated delta rule, one token at a time (all heads at once), from the math:
    q, k <- x / (||x|| + eps); q <- q Dk^-0.5; kv head h // G serves query head h (repeat_interleave);
    per step: S <- exp(alpha) S; u = beta (v - S^T k); S <- S + k u^T; o = S^T q.
    Returns (o [n, H, Dv], final S [H, Dk, Dv]). The keyword flags make it wrong on purpose: read o before
    the write, skip the decay, or map query head h to kv head h % Hkv (tiling)."""
    n, nh, dk = q.shape
    G = nh // k.shape[1]
    expand = (lambda x: x.repeat(1, G, 1)) if tile_kv else (lambda x: x.repeat_interleave(G, dim=1))
    k, v = expand(k), expand(v)
    q = q / (q.norm(dim=-1, keepdim=True) + L2_EPS) * dk ** -0.5
    k = k / (k.norm(dim=-1, keepdim=True) + L2_EPS)
    S = state.clone()                                          # [H, Dk, Dv]
    o = torch.empty(n, nh, v.shape[-1], dtype=torch.float64)
    read = lambda S, x: (S.transpose(1, 2) @ x[:, :, None])[..., 0]   # S^T x per head  # noqa: E731
    for t in range(n):
        if decay:
            S = alpha[t].exp()[:, None, None] * S
        if read_first:
            o[t] = read(S, q[t])
        u = beta[t][:, None] * (v[t] - read(S, k[t]))
        S = S + k[t][:, :, None] * u[:, None, :]                  # + k u^T per head
        if not read_first:
            o[t] = read(S, q[t])
    return o, S


def make_case(n, with_state, seed=0):
    """Float64 inputs: q [n, H, Dk]; k [n, Hkv, Dk]; v [n, Hkv, Dv]; beta in (0, 1); alpha <= 0 (mean
    about -0.4, so a block of 64 decays by ~e^-25); state [H, Dk, Dv] random or zero."""
    g = torch.Generator().manual_seed(1000 * n + 10 * with_state + seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    case = dict(q=r(n, H, DK), k=r(n, HKV, DK), v=r(n, HKV, DV),
                beta=torch.rand(n, H, generator=g, dtype=torch.float64),
                alpha=-0.5 * torch.nn.functional.softplus(r(n, H)))
    state = r(H, DK, DV) if with_state else torch.zeros(H, DK, DV, dtype=torch.float64)
    return case, state


def errors(got, exact):
    """(||got - exact|| / ||exact||, max |got - exact|) in float64."""
    d = got.double() - exact
    return float(d.norm() / exact.norm()), float(d.abs().max())


def check(got, exact, what):
    rel, mx = errors(got, exact)
    print(f"{what}: rel {rel:.2e}, max abs {mx:.2e}")
    assert rel <= REL and mx <= ABS, f"{what}: rel {rel:.3e} (bound {REL}), max abs {mx:.3e} (bound {ABS})"


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("n", LENGTHS)
def test_references_match_float64_recurrence(n, with_state):
    case, state = make_case(n, with_state)
    o64, S64 = gdn_f64(**case, state=state)
    outs = {}
    for fn in (gdn_recurrent_ref, gdn_chunk_ref):
        S = state.float()                                   # the references take a float32 state
        o = fn(**case, state=S)
        assert o.shape == (n, H, DV) and S.shape == (H, DK, DV) and S.dtype == torch.float32
        name = fn.__name__
        check(o, o64, f"{name} n={n} out")
        check(S, S64, f"{name} n={n} final state")
        outs[name] = (o, S)
    # chunk vs recurrent directly, judged against the exact scale
    (o_r, S_r), (o_c, S_c) = outs["gdn_recurrent_ref"], outs["gdn_chunk_ref"]
    rel_o = float((o_c.double() - o_r.double()).norm() / o64.norm())
    rel_S = float((S_c.double() - S_r.double()).norm() / S64.norm())
    assert rel_o <= REL and rel_S <= REL, f"chunk vs recurrent n={n}: out {rel_o:.3e}, state {rel_S:.3e}"

    # The comparison can fail: each wrong recurrence misses by far more than the tolerance, except where
    # the mutation does not change the math (decay of a zero state at the first step: 1 token, no state).
    for wrong in ("read_first", "decay", "tile_kv"):
        if wrong == "decay" and n == 1 and not with_state:
            continue
        ow, Sw = gdn_f64(**case, state=state, **{wrong: wrong != "decay"})
        miss = errors(ow, o64)[0]
        print(f"  wrong recurrence ({wrong}): misses by rel {miss:.2e}")
        assert miss > FAIL_FACTOR * REL, f"{wrong}: the float64 check would not notice it (rel {miss:.2e})"


def test_references_compute_in_float32():
    """Float64 q/k/v/beta/alpha are accepted but computed in float32: the output (float64, as q) is exactly
    the float32 result; a float64 state is refused (mixed-dtype matmul), not silently downcast."""
    case, state = make_case(65, True)
    for fn in (gdn_recurrent_ref, gdn_chunk_ref):
        S_a, S_b = state.float(), state.float()
        o = fn(**case, state=S_a)
        o32 = fn(**{k: v.float() for k, v in case.items()}, state=S_b)
        assert o.dtype == torch.float64 and o32.dtype == torch.float32
        assert torch.equal(o, o32.double()) and torch.equal(S_a, S_b)
        with pytest.raises(RuntimeError):
            fn(**case, state=state.clone())
