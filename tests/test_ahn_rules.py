"""The consistent rule of docs/semantics.md §2–§6 on tiny random checkpoints, against the float64 oracle
(tests/oracle.py): sinks + window attention, GatedDeltaNet memory of evicted tokens, chunked == one-shot ==
token-by-token, swa == ahn with a zero o_proj, constant state size, position counter; qwen2 and qwen3,
separate and merged."""
import functools

import pytest
import torch

import ahn_rt
from checkpoints import Spec, ahn_only, base, merged, random_ids, run_feeds
from oracle import Oracle, rel_err

# tolerance table (relative error ||a-b||/||b|| over all logits)
RTOL_ORACLE = 1e-5     # float32 runtime vs float64 oracle (a naive float32 oracle copy: 4e-7 .. 7e-7)
RTOL_SELF = 1e-5       # runtime vs runtime: chunking / feeding must not change the function, only the
                       # rounding order (docs/semantics.md §2: 1e-5 in float32)
MIN_AHN_EFFECT = 1e-2  # ahn vs swa past S+W: the random memory changes logits by O(1) (oracle: 0.4 .. 0.8)
RTOL_BF16 = 3e-2       # smoke level only: bf16 storage/activations vs the float64 oracle (measured ~1.4e-2)

FAMILIES = [Spec("qwen2", tied=True), Spec("qwen3", tied=False)]
WS = [(W, S) for W in (1, 3, 8, 13) for S in (0, 1, 4)]


def ws_id(ws):
    return f"W{ws[0]}-S{ws[1]}"


@functools.lru_cache(maxsize=None)
def oracle_logits(folder, ahn, W, S, mode, T, seed, vocab):
    return Oracle(folder, ahn=ahn, window=W, sinks=S, mode=mode).logits(random_ids(T, vocab, seed))


def check(got, ref, what, tol):
    assert got.dtype == torch.float32, f"{what}: logits dtype {got.dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    err = rel_err(got, ref)
    print(f"{what}: rel err {err:.2e}, max abs {float((got.double() - ref.double()).abs().max()):.2e}")
    assert err <= tol, f"{what}: rel err {err:.3e} > {tol}"


def load_ahn(spec, W, S, layout="separate", **kw):
    if layout == "merged":
        return ahn_rt.load(merged(spec, W, S), window=W, sinks=S, dtype=torch.float32, mode="ahn", **kw)
    return ahn_rt.load(base(spec), ahn=ahn_only(spec, W, S), window=W, sinks=S, dtype=torch.float32,
                       mode="ahn", **kw)


# --------------------------------------------------------------------------------------------- vs oracle
@pytest.mark.parametrize("ws", WS, ids=ws_id)
@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
def test_ahn_one_shot_matches_oracle(spec, ws):
    W, S = ws
    T = length(W, S)
    ids = random_ids(T, spec.vocab, seed=10)
    ref = oracle_logits(base(spec), ahn_only(spec, W, S), W, S, "ahn", T, 10, spec.vocab)
    got = run_feeds(load_ahn(spec, W, S), ids)
    M = S + W
    check(got[:M], ref[:M], f"{spec.id} W={W} S={S} T={T} before fill (t<S+W)", RTOL_ORACLE)
    check(got[M:], ref[M:], f"{spec.id} W={W} S={S} T={T} with memory (t>=S+W)", RTOL_ORACLE)


@pytest.mark.parametrize("ws", [(1, 0), (3, 4), (8, 1), (13, 4)], ids=ws_id)
@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
def test_swa_one_shot_matches_oracle(spec, ws):
    W, S = ws
    T = length(W, S)
    ids = random_ids(T, spec.vocab, seed=11)
    ref = oracle_logits(base(spec), None, W, S, "swa", T, 11, spec.vocab)
    model = ahn_rt.load(base(spec), window=W, sinks=S, dtype=torch.float32, mode="swa")
    check(run_feeds(model, ids), ref, f"{spec.id} swa W={W} S={S} T={T}", RTOL_ORACLE)


@pytest.mark.parametrize("ws", [(3, 1), (8, 4)], ids=ws_id)
@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
def test_merged_equals_separate(spec, ws):
    W, S = ws
    T = 4 * (S + W)
    ids = random_ids(T, spec.vocab, seed=12)
    ref = oracle_logits(base(spec), ahn_only(spec, W, S), W, S, "ahn", T, 12, spec.vocab)
    a = run_feeds(load_ahn(spec, W, S, "separate"), ids)
    b = run_feeds(load_ahn(spec, W, S, "merged"), ids)
    check(b, ref, f"{spec.id} merged vs oracle", RTOL_ORACLE)
    check(b, a, f"{spec.id} merged vs separate", RTOL_SELF)


# --------------------------------------------------------------------------------------------- chunking
def plans(W, S, T):
    """Named feed plans (piece sizes summing to T); most cross the fill point S+W inside a call."""
    M = S + W
    out = {
        "one-by-one": [1] * T,
        "cross-fill": [max(M - 2, 1), 4],         # fill point inside the 2nd call
        "fill-exact": [M, 1, W + 1],              # 2nd call is the first eviction, 3rd evicts W+1 at once
        "odd-pieces": [2, 5, 3, 1, 7],
    }
    for name, plan in out.items():
        if name != "one-by-one":
            plan.append(T - sum(plan))
        assert all(n > 0 for n in plan) and sum(plan) == T, (name, plan)
    return out


def length(W, S):
    return max(5 * (S + W), 24)


@pytest.mark.parametrize("ws", [(1, 0), (3, 4), (8, 1), (13, 0), (13, 4)], ids=ws_id)
@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
def test_feeds_equal_one_shot(spec, ws):
    W, S = ws
    T = length(W, S)
    ids = random_ids(T, spec.vocab, seed=13)
    model = load_ahn(spec, W, S)
    one = run_feeds(model, ids)
    ref = oracle_logits(base(spec), ahn_only(spec, W, S), W, S, "ahn", T, 13, spec.vocab)
    check(one, ref, f"{spec.id} W={W} S={S} one-shot vs oracle", RTOL_ORACLE)
    for name, plan in plans(W, S, T).items():
        check(run_feeds(model, ids, plan), one, f"{spec.id} W={W} S={S} feeds {name} {plan[:4]}", RTOL_SELF)


@pytest.mark.parametrize("mode", ["ahn", "swa", "full"])
def test_fill_call_through_the_model_matches_oracle(monkeypatch, mode):
    """The CUDA prefill's fill call, routed onto the CPU's band kernel for every chunk the State plans in order
    (``ChunkPlan.in_order``: written to the cache first, then one causal call over the cache's first p0 + T
    rows): the model still gives the float64 oracle's logits, in chunks before, up to and past the fill point
    (full mode: every chunk, the cache growing past 256 slots). This is the model's side of the CUDA path: the
    early write, and the attention reading the chunk's keys from the cache."""
    from ahn_rt import ops
    spec, (W, S) = FAMILIES[0], (8, 4)
    T, chunk = (300, 64) if mode == "full" else (length(W, S), 5)
    real, fills = ops.prefill_attention, []

    def routed(q, k, v, k_cache, v_cache, p0, sinks, window, scale, cached=False):
        if cached:
            fills.append(p0)
            return ops._prefill_attention_fill(q, k_cache, v_cache, p0 + q.shape[0], scale)
        return real(q, k, v, k_cache, v_cache, p0, sinks, window, scale)

    monkeypatch.setattr(ops, "prefill_attention", routed)
    ids = random_ids(T, spec.vocab, seed=16)
    if mode == "ahn":
        model = load_ahn(spec, W, S, chunk_size=chunk)
        ref = oracle_logits(base(spec), ahn_only(spec, W, S), W, S, "ahn", T, 16, spec.vocab)
    else:
        kw = {} if mode == "full" else {"window": W, "sinks": S}
        model = ahn_rt.load(base(spec), dtype=torch.float32, mode=mode, chunk_size=chunk, **kw)
        ref = oracle_logits(base(spec), None, W, S, mode, T, 16, spec.vocab)
    check(run_feeds(model, ids), ref, f"{spec.id} {mode} fill call W={W} S={S} T={T}", RTOL_ORACLE)
    layers = model.config.num_layers
    want = range(0, T, chunk) if mode == "full" else (0, 5)   # ahn / swa: p0 + 5 <= S + W = 12
    assert fills == [p0 for p0 in want for _ in range(layers)]


@pytest.mark.parametrize("chunk_kind", ["1", "W-1", "W+1", "S+W-1"])
@pytest.mark.parametrize("ws", [(3, 1), (8, 4), (13, 0)], ids=ws_id)
@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
def test_chunk_size_equals_one_shot(spec, ws, chunk_kind):
    W, S = ws
    chunk = {"1": 1, "W-1": W - 1, "W+1": W + 1, "S+W-1": S + W - 1}[chunk_kind]
    T = length(W, S)
    ids = random_ids(T, spec.vocab, seed=14)
    one = run_feeds(load_ahn(spec, W, S), ids)
    got = run_feeds(load_ahn(spec, W, S, chunk_size=chunk), ids)
    check(got, one, f"{spec.id} W={W} S={S} chunk_size={chunk} vs one-shot", RTOL_SELF)
    got2 = run_feeds(load_ahn(spec, W, S, chunk_size=chunk), ids, [S + W - 1, 3, T - S - W - 2])
    check(got2, one, f"{spec.id} W={W} S={S} chunk_size={chunk} + calls crossing fill", RTOL_SELF)


@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
def test_swa_chunked_equals_one_shot(spec):
    W, S = 8, 4
    T = length(W, S)
    ids = random_ids(T, spec.vocab, seed=15)
    model = ahn_rt.load(base(spec), window=W, sinks=S, dtype=torch.float32, mode="swa", chunk_size=5)
    one = run_feeds(ahn_rt.load(base(spec), window=W, sinks=S, dtype=torch.float32, mode="swa"), ids)
    check(run_feeds(model, ids), one, f"{spec.id} swa chunk_size=5", RTOL_SELF)
    check(run_feeds(model, ids, [1] * T), one, f"{spec.id} swa one-by-one", RTOL_SELF)


# --------------------------------------------------------------------------------------------- memory term
@pytest.mark.parametrize("ws", [(1, 0), (3, 4), (8, 1)], ids=ws_id)
@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
def test_zero_o_proj_ahn_equals_swa(spec, ws):
    W, S = ws
    T = length(W, S)
    ids = random_ids(T, spec.vocab, seed=16)
    ahn0 = run_feeds(ahn_rt.load(base(spec), ahn=ahn_only(spec, W, S, zero_o_proj=True), window=W, sinks=S,
                                 dtype=torch.float32, mode="ahn"), ids)
    swa = run_feeds(ahn_rt.load(base(spec), window=W, sinks=S, dtype=torch.float32, mode="swa"), ids)
    check(ahn0, swa, f"{spec.id} W={W} S={S} ahn(o_proj=0) vs swa", RTOL_SELF)


@pytest.mark.parametrize("ws", [(1, 0), (3, 4), (8, 1)], ids=ws_id)
@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
def test_ahn_differs_from_swa_only_past_fill(spec, ws):
    W, S = ws
    M = S + W
    T = length(W, S)
    ids = random_ids(T, spec.vocab, seed=17)
    ahn = run_feeds(load_ahn(spec, W, S), ids)
    swa = run_feeds(ahn_rt.load(base(spec), ahn=ahn_only(spec, W, S), window=W, sinks=S, dtype=torch.float32,
                                mode="swa"), ids)
    check(ahn[:M], swa[:M], f"{spec.id} W={W} S={S} t<S+W: ahn == swa", RTOL_SELF)
    per_pos = [rel_err(ahn[t], swa[t]) for t in range(M, T)]
    print(f"{spec.id} W={W} S={S}: ahn vs swa per position from t=S+W: min {min(per_pos):.2e}")
    assert min(per_pos) > MIN_AHN_EFFECT, \
        f"memory has no visible effect at t={M + per_pos.index(min(per_pos))}: rel diff {min(per_pos):.2e}"


# --------------------------------------------------------------------------------------------- state / position
@pytest.mark.parametrize("mode", ["ahn", "swa"])
@pytest.mark.parametrize("ws", [(1, 0), (3, 4), (13, 1)], ids=ws_id)
@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
def test_state_nbytes_constant(spec, ws, mode):
    W, S = ws
    M = S + W
    model = ahn_rt.load(base(spec), ahn=ahn_only(spec, W, S), window=W, sinks=S, dtype=torch.float32, mode=mode)
    sess = model.new_session()
    ids = random_ids(10 * M, spec.vocab, seed=18)
    sess.forward(ids[:M])
    at_fill = sess.state_nbytes
    assert isinstance(at_fill, int) and at_fill > 0, at_fill
    sess.forward(ids[M:M + 1])
    sess.forward(ids[M + 1:])
    assert sess.position == 10 * M
    assert sess.state_nbytes == at_fill, f"{mode}: state grew from {at_fill} B at t={M} to " \
                                         f"{sess.state_nbytes} B at t={10 * M}"


def test_position_counter_and_sessions():
    spec = FAMILIES[0]
    W, S = 3, 1
    model = load_ahn(spec, W, S)
    ids = random_ids(30, spec.vocab, seed=19)
    s1 = model.new_session()
    assert s1.position == 0
    a = s1.forward(ids[:7].tolist())                # list[int] input
    assert s1.position == 7
    b = s1.forward(ids[7:8])
    assert s1.position == 8
    c = s1.forward(ids[8:])
    assert s1.position == 30
    assert a.shape == (7, spec.vocab) and b.shape == (1, spec.vocab) and c.shape == (22, spec.vocab)
    # a second session is independent of the first, and of sessions that ran before it
    s2 = model.new_session()
    assert s2.position == 0
    check(s2.forward(ids), torch.cat([a, b, c]), "fresh session after a used one", RTOL_SELF)
    assert s1.position == 30


@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
def test_window_and_sinks_default_from_config(spec):
    W, S = 8, 1
    model = ahn_rt.load(merged(spec, W, S), dtype="float32", mode="ahn")
    assert (model.config.window, model.config.sinks, model.config.mode) == (W, S, "ahn")
    T = 4 * (S + W)
    ref = oracle_logits(base(spec), ahn_only(spec, W, S), W, S, "ahn", T, 20, spec.vocab)
    check(run_feeds(model, random_ids(T, spec.vocab, seed=20)), ref, f"{spec.id} W,S from config", RTOL_ORACLE)
    # explicit arguments override the config
    model = ahn_rt.load(merged(spec, W, S), window=3, sinks=4, dtype=torch.float32, mode="ahn")
    assert (model.config.window, model.config.sinks) == (3, 4)
    ref = oracle_logits(base(spec), ahn_only(spec, W, S), 3, 4, "ahn", T, 20, spec.vocab)
    check(run_feeds(model, random_ids(T, spec.vocab, seed=20)), ref, f"{spec.id} W,S overridden", RTOL_ORACLE)


def test_window_and_sinks_default_32640_128():
    """A base config has no sliding_window / num_attn_sinks: defaults are W=32640, S=128 (docs/semantics.md §8)."""
    spec = FAMILIES[0]
    model = ahn_rt.load(base(spec), dtype=torch.float32, mode="swa")
    assert (model.config.window, model.config.sinks) == (32640, 128)


# --------------------------------------------------------------------------------------------- more shapes / inputs
GQA = [Spec("qwen2", tied=False, kv_heads=1, seed=3), Spec("qwen3", tied=True, kv_heads=4, seed=4)]


@pytest.mark.parametrize("ws", [(3, 1), (8, 0)], ids=ws_id)
@pytest.mark.parametrize("spec", GQA, ids=lambda s: f"{s.id}-kv{s.kv_heads}")
def test_gqa_group_sizes_match_oracle(spec, ws):
    """G = H/Hkv = 4 and 1: attention and the memory both expand kv head h//G to query head h."""
    W, S = ws
    T = length(W, S)
    ids = random_ids(T, spec.vocab, seed=21)
    ref = oracle_logits(base(spec), ahn_only(spec, W, S), W, S, "ahn", T, 21, spec.vocab)
    model = load_ahn(spec, W, S)
    check(run_feeds(model, ids), ref, f"{spec.id} kv={spec.kv_heads} one-shot", RTOL_ORACLE)
    check(run_feeds(model, ids, [1] * T), ref, f"{spec.id} kv={spec.kv_heads} one-by-one", RTOL_ORACLE)


@pytest.mark.parametrize("mode", ["ahn", "swa"])
def test_positions_past_max_position_embeddings(mode):
    """ahn/swa must neither refuse nor wrap absolute positions past max_position_embeddings (docs/semantics.md §1, §9)."""
    import json, os, shutil
    from checkpoints import scratch, write_json
    spec, W, S = FAMILIES[1], 8, 2
    d = scratch("maxpos")
    for f in os.listdir(merged(spec, W, S)):
        shutil.copy(os.path.join(merged(spec, W, S), f), d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["max_position_embeddings"] = 16
    write_json(os.path.join(d, "config.json"), cfg)
    T = 48
    ids = random_ids(T, spec.vocab, seed=22)
    ref = Oracle(d, window=W, sinks=S, mode=mode).logits(ids)
    model = ahn_rt.load(d, window=W, sinks=S, dtype=torch.float32, mode=mode, chunk_size=5)
    check(run_feeds(model, ids), ref, f"{mode} T={T} > max_position_embeddings=16", RTOL_ORACLE)


def test_interleaved_sessions_are_independent():
    spec, W, S = FAMILIES[1], 3, 1
    model = load_ahn(spec, W, S, chunk_size=4)
    a_ids, b_ids = random_ids(30, spec.vocab, seed=23), random_ids(30, spec.vocab, seed=24)
    a_ref, b_ref = run_feeds(model, a_ids), run_feeds(model, b_ids)
    sa, sb = model.new_session(), model.new_session()
    a_out, b_out = [], []
    for lo, hi in [(0, 3), (3, 4), (4, 11), (11, 12), (12, 30)]:
        a_out.append(sa.forward(a_ids[lo:hi]))
        b_out.append(sb.forward(b_ids[lo:hi]))
    assert sa.position == sb.position == 30
    check(torch.cat(a_out), a_ref, "session A interleaved with B", RTOL_SELF)
    check(torch.cat(b_out), b_ref, "session B interleaved with A", RTOL_SELF)


def test_file_paths_equal_folders():
    """weights= a .safetensors file with config.json beside it; ahn= the AHN model.safetensors file."""
    import os
    spec, W, S = FAMILIES[0], 8, 4
    T = 40
    ids = random_ids(T, spec.vocab, seed=25)
    ref = run_feeds(load_ahn(spec, W, S), ids)
    m1 = ahn_rt.load(os.path.join(merged(spec, W, S), "model.safetensors"), window=W, sinks=S,
                     dtype=torch.float32, mode="ahn")
    check(run_feeds(m1, ids), ref, "merged file path", RTOL_SELF)
    m2 = ahn_rt.load(base(spec), ahn=os.path.join(ahn_only(spec, W, S), "model.safetensors"), window=W,
                     sinks=S, dtype=torch.float32, mode="ahn")
    check(run_feeds(m2, ids), ref, "ahn= file path", RTOL_SELF)


@pytest.mark.parametrize("dtype", ["bf16", torch.bfloat16])
def test_bf16_smoke(dtype):
    spec, W, S = FAMILIES[0], 8, 4
    T = 60
    ids = random_ids(T, spec.vocab, seed=26)
    ref = oracle_logits(base(spec), ahn_only(spec, W, S), W, S, "ahn", T, 26, spec.vocab)
    model = ahn_rt.load(base(spec), ahn=ahn_only(spec, W, S), window=W, sinks=S, dtype=dtype, mode="ahn")
    got = run_feeds(model, ids)
    assert got.dtype == torch.float32, got.dtype
    err = rel_err(got, ref)
    print(f"bf16 vs oracle: rel err {err:.2e}")
    assert err <= RTOL_BF16, f"bf16 rel err {err:.3e} > {RTOL_BF16}"
