"""AHN-DeltaNet and AHN-Mamba2 (docs/semantics.md §11) on tiny random checkpoints with the official key
names, against the float64 token-by-token oracle (tests/oracle.py, written from the math): one shot, in
chunks and token by token (the decode path), across the fill point S + W, at odd sizes; Qwen2 and Qwen3;
split and merged checkpoints; strict loading; DeltaNet as GatedDeltaNet with zero decay, bit for bit;
init_weights, state files and fill_random for every variant.

Tolerance table (float32 runtime vs the float64 oracle unless said):
  MAX_ABS     1e-4   max |logit difference| (the brief's bound; logits are O(1..5); measured <= 5e-6)
  RTOL        1e-5   ||a - b|| / ||b|| over all logits (measured 3e-7 .. 1.3e-6)
  RTOL_SELF   1e-5   runtime vs runtime: feeding / chunking changes only the rounding order
  MIN_EFFECT  1e-2   ahn vs swa per position past S + W: the random memory changes logits by O(1)
  RTOL_BF16   3e-2   smoke level: bf16 storage and activations vs the float64 oracle
"""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import ahn_rt
from ahn_rt import memory, ops
from ahn_rt.config import parse_config
from ahn_rt.weights import ahn_shapes
from checkpoints import Spec, ahn_only, base, merged, random_ids, run_feeds, save_ahn_only, scratch
from oracle import Oracle, rel_err

MAX_ABS, RTOL, RTOL_SELF, MIN_EFFECT, RTOL_BF16 = 1e-4, 1e-5, 1e-5, 1e-2, 3e-2

VARIANTS = ["DeltaNet", "Mamba2"]
FAMILIES = [Spec("qwen2", tied=True), Spec("qwen3", tied=False)]


@functools.lru_cache(maxsize=None)
def oracle_logits(folder, ahn, W, S, mode, T, seed, vocab):
    return Oracle(folder, ahn=ahn, window=W, sinks=S, mode=mode).logits(random_ids(T, vocab, seed))


def check(got, ref, what, tol=RTOL, max_abs=MAX_ABS):
    assert got.dtype == torch.float32 and got.shape == ref.shape, (what, got.dtype, got.shape, ref.shape)
    err = rel_err(got, ref)
    mx = float((got.double() - ref.double()).abs().max())
    print(f"{what}: rel err {err:.2e}, max abs {mx:.2e}")
    assert err <= tol and mx <= max_abs, f"{what}: rel err {err:.3e} (<= {tol}), max abs {mx:.3e} (<= {max_abs})"


def load(spec, W, S, impl, layout="separate", **kw):
    kw.setdefault("mode", "ahn")
    if layout == "merged":
        return ahn_rt.load(merged(spec, W, S, impl=impl), window=W, sinks=S, dtype=torch.float32, **kw)
    return ahn_rt.load(base(spec), ahn=ahn_only(spec, W, S, impl=impl), window=W, sinks=S, dtype=torch.float32, **kw)


def length(W, S):
    return max(5 * (S + W), 24)


def ref_for(spec, W, S, impl, T, seed):
    return oracle_logits(base(spec), ahn_only(spec, W, S, impl=impl), W, S, "ahn", T, seed, spec.vocab)


# --------------------------------------------------------------------------------------------- vs oracle
@pytest.mark.parametrize("ws", [(1, 0), (3, 4), (8, 1), (13, 4)], ids=lambda ws: f"W{ws[0]}-S{ws[1]}")
@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
@pytest.mark.parametrize("impl", VARIANTS)
def test_one_shot_matches_oracle(impl, spec, ws):
    W, S = ws
    T = length(W, S)
    ref = ref_for(spec, W, S, impl, T, 40)
    got = run_feeds(load(spec, W, S, impl), random_ids(T, spec.vocab, 40))
    M = S + W
    check(got[:M], ref[:M], f"{impl} {spec.id} W={W} S={S} before fill")
    check(got[M:], ref[M:], f"{impl} {spec.id} W={W} S={S} with memory")


def plans(W, S, T):
    M = S + W
    out = {"one-by-one": [1] * T, "cross-fill": [max(M - 2, 1), 4], "fill-exact": [M, 1, W + 1],
           "odd-pieces": [2, 5, 3, 1, 7]}
    for name, plan in out.items():
        if name != "one-by-one":
            plan.append(T - sum(plan))
    return out


@pytest.mark.parametrize("ws", [(3, 4), (13, 0)], ids=lambda ws: f"W{ws[0]}-S{ws[1]}")
@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
@pytest.mark.parametrize("impl", VARIANTS)
def test_feeds_match_oracle_and_one_shot(impl, spec, ws):
    """Token by token runs the decode path (DeltaNet: the C++ decode_prep / gdn_decode kernels with A_log
    = -inf; Mamba2: its decode front and mamba2_decode), chunks cross the fill point inside a call."""
    W, S = ws
    T = length(W, S)
    ids = random_ids(T, spec.vocab, 41)
    ref = ref_for(spec, W, S, impl, T, 41)
    model = load(spec, W, S, impl)
    one = run_feeds(model, ids)
    for name, plan in plans(W, S, T).items():
        got = run_feeds(model, ids, plan)
        check(got, ref, f"{impl} {spec.id} W={W} S={S} {name} vs oracle")
        check(got, one, f"{impl} {spec.id} W={W} S={S} {name} vs one-shot", RTOL_SELF)


@pytest.mark.parametrize("impl", VARIANTS)
def test_chunk_sizes(impl):
    spec, W, S = FAMILIES[1], 8, 4
    T = 70            # 58 pairs in one call; with 65 + ... below a call holds more than one 64-pair block
    ids = random_ids(T, spec.vocab, 42)
    one = run_feeds(load(spec, W, S, impl), ids)
    for chunk in (1, W + 1, S + W - 1):
        check(run_feeds(load(spec, W, S, impl, chunk_size=chunk), ids), one, f"{impl} chunk_size={chunk}", RTOL_SELF)
    W2, S2 = 3, 1     # 136 pairs in one prefill: three blocks of the chunked form
    T2 = 140
    ids2 = random_ids(T2, spec.vocab, 43)
    ref = ref_for(spec, W2, S2, impl, T2, 43)
    check(run_feeds(load(spec, W2, S2, impl), ids2), ref, f"{impl} 136 pairs in one call vs oracle")


@pytest.mark.parametrize("spec", FAMILIES, ids=lambda s: s.id)
@pytest.mark.parametrize("impl", VARIANTS)
def test_merged_equals_separate(impl, spec):
    W, S = 8, 4
    T = 4 * (S + W)
    ids = random_ids(T, spec.vocab, 44)
    sep = run_feeds(load(spec, W, S, impl), ids)
    mrg = run_feeds(load(spec, W, S, impl, "merged"), ids)
    check(mrg, ref_for(spec, W, S, impl, T, 44), f"{impl} {spec.id} merged vs oracle")
    check(mrg, sep, f"{impl} {spec.id} merged vs separate", RTOL_SELF)
    model = ahn_rt.load(merged(spec, W, S, impl=impl), dtype="float32")   # W, S and the variant from config
    assert (model.config.window, model.config.sinks, model.config.mode) == (W, S, "ahn")
    assert model.config.ahn_implementation == impl


@pytest.mark.parametrize("impl", VARIANTS)
def test_memory_term(impl):
    """A zero o_proj gives exactly the sinks + window model; a random one changes every position past
    S + W and none before."""
    spec, W, S = FAMILIES[0], 3, 4
    T = length(W, S)
    M = S + W
    ids = random_ids(T, spec.vocab, 45)
    swa = run_feeds(ahn_rt.load(base(spec), window=W, sinks=S, dtype=torch.float32, mode="swa"), ids)
    zero = ahn_rt.load(base(spec), ahn=ahn_only(spec, W, S, zero_o_proj=True, impl=impl), window=W, sinks=S,
                       dtype=torch.float32, mode="ahn")
    check(run_feeds(zero, ids), swa, f"{impl} o_proj = 0 vs swa", RTOL_SELF)
    check(run_feeds(zero, ids, [1] * T), swa, f"{impl} o_proj = 0 vs swa, one by one", RTOL_SELF)
    ahn = run_feeds(load(spec, W, S, impl), ids)
    check(ahn[:M], swa[:M], f"{impl} t < S+W: ahn == swa", RTOL_SELF)
    per_pos = [rel_err(ahn[t], swa[t]) for t in range(M, T)]
    print(f"{impl}: ahn vs swa per position from S+W: min {min(per_pos):.2e}")
    assert min(per_pos) > MIN_EFFECT


GQA = [Spec("qwen2", tied=False, kv_heads=1, seed=3), Spec("qwen3", tied=True, kv_heads=4, seed=4)]


@pytest.mark.parametrize("spec", GQA, ids=lambda s: f"{s.id}-kv{s.kv_heads}")
@pytest.mark.parametrize("impl", VARIANTS)
def test_gqa_group_sizes(impl, spec):
    W, S = 3, 1
    T = 24
    ids = random_ids(T, spec.vocab, 46)
    ref = ref_for(spec, W, S, impl, T, 46)
    model = load(spec, W, S, impl)
    check(run_feeds(model, ids), ref, f"{impl} kv={spec.kv_heads} one shot")
    check(run_feeds(model, ids, [1] * T), ref, f"{impl} kv={spec.kv_heads} one by one")


@pytest.mark.parametrize("impl", VARIANTS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_bf16_smoke(impl, dtype):
    """bf16 and fp16 against the float64 oracle, in one shot, in chunks whose evictions are not a multiple
    of the 64-pair block (fp16 once turned a block's zero padding into NaN), and token by token."""
    spec, W, S = FAMILIES[0], 8, 4
    T = 60
    ids = random_ids(T, spec.vocab, 47)
    ref = ref_for(spec, W, S, impl, T, 47)
    model = ahn_rt.load(base(spec), ahn=ahn_only(spec, W, S, impl=impl), window=W, sinks=S, dtype=dtype, mode="ahn")
    for plan in (None, [20, 20, 20], [1] * T):
        err = rel_err(run_feeds(model, ids, plan), ref)
        print(f"{impl} {dtype} vs oracle: rel err {err:.2e}")
        assert err <= RTOL_BF16


# --------------------------------------------------------------------------------------------- DeltaNet = GDN, no decay
def _dn_as_gdn(spec, W, S):
    """A GatedDeltaNet checkpoint holding the DeltaNet tensors plus A_log = -inf, a_proj = 0, dt_bias = 0."""
    from safetensors.torch import load_file, save_file
    src = ahn_only(spec, W, S, impl="DeltaNet")
    sd = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}.ahn.fn."
        sd[p + "A_log"] = torch.full((H,), float("-inf"))
        sd[p + "D"] = torch.ones(H)
        sd[p + "dt_bias"] = torch.zeros(H)
        sd[p + "a_proj.weight"] = torch.zeros(H, d)
    out = scratch("dn-as-gdn")
    save_file(sd, os.path.join(out, "model.safetensors"))
    cfg["_ahn_implementation"] = "GatedDeltaNet"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


@pytest.mark.parametrize("backend", ["auto", "ref"])
def test_deltanet_is_gdn_with_zero_decay(backend):
    """The loader's encoding (A_log = -inf, dt_bias = 0, zero a rows) makes DeltaNet run through the
    GatedDeltaNet kernels: alpha is exactly 0 (never NaN) in every slot, and the logits are bit-identical
    to a GatedDeltaNet checkpoint carrying that encoding, in one shot and token by token (the C++
    decode_prep / gdn_decode kernels, or the references)."""
    from ahn_rt import ops
    spec, W, S = FAMILIES[1], 3, 4
    T = 30
    ids = random_ids(T, spec.vocab, 48)
    with ops.use_backend(backend):
        dn = load(spec, W, S, "DeltaNet")
        gdn = ahn_rt.load(base(spec), ahn=_dn_as_gdn(spec, W, S), window=W, sinks=S, dtype=torch.float32, mode="ahn")
        assert dn.config.ahn_implementation == "DeltaNet" and gdn.config.ahn_implementation == "GatedDeltaNet"
        for plan in (None, [1] * T, [5, 3, 1, 21]):
            sess = dn.new_session()
            got = torch.cat([sess.forward(ids[a:a + n]) for a, n in zip([0, *torch.tensor(plan or [T]).cumsum(0)[:-1].tolist()], plan or [T])])
            assert torch.equal(got, run_feeds(gdn, ids, plan)), plan
            alpha = sess.state.gates["alpha"]
            assert torch.isfinite(sess.state.memory).all() and not alpha.isnan().any()
            assert (alpha == 0).all() and sess.state.memory.abs().sum() > 0
    check(run_feeds(dn, ids), ref_for(spec, W, S, "DeltaNet", T, 48), "DeltaNet vs oracle (no decay)")


# --------------------------------------------------------------------------------------------- loading
def expect_error(*args, must_name=(), **kw):
    with pytest.raises(ahn_rt.AhnError) as ei:
        ahn_rt.load(*args, **kw)
    msg = str(ei.value)
    print("AhnError:", msg)
    assert "\n" not in msg
    for s in must_name:
        assert s in msg, f"{s!r} not in {msg!r}"
    return msg


def _rewrite(folder, fn, name):
    from safetensors.torch import load_file, save_file
    import shutil
    out = scratch(name)
    for f in os.listdir(folder):
        shutil.copy(os.path.join(folder, f), out)
    sd = fn(load_file(os.path.join(folder, "model.safetensors")))
    save_file(sd, os.path.join(out, "model.safetensors"))
    return out


@pytest.mark.parametrize("impl,key", [("DeltaNet", "model.layers.1.ahn.fn.a_proj.weight"),
                                      ("Mamba2", "model.layers.0.ahn.fn.D")])
def test_strict_unexpected_key(impl, key):
    spec, W, S = FAMILIES[0], 3, 1
    d = _rewrite(ahn_only(spec, W, S, impl=impl), lambda sd: {**sd, key: torch.zeros(4)}, "unexpected")
    expect_error(base(spec), ahn=d, window=W, sinks=S, mode="ahn", must_name=(key,))


@pytest.mark.parametrize("impl,field", [("DeltaNet", "o_norm.weight"), ("Mamba2", "dt_proj.bias"),
                                        ("Mamba2", "norm.weight")])
def test_strict_missing_key(impl, field):
    spec, W, S = FAMILIES[0], 3, 1
    key = f"model.layers.1.ahn.fn.{field}"
    d = _rewrite(ahn_only(spec, W, S, impl=impl), lambda sd: {k: v for k, v in sd.items() if k != key}, "missing")
    expect_error(base(spec), ahn=d, window=W, sinks=S, mode="ahn", must_name=(key,))
    m = _rewrite(merged(spec, W, S, impl=impl), lambda sd: {k: v for k, v in sd.items() if k != key}, "missing-m")
    expect_error(m, window=W, sinks=S, mode="ahn", must_name=(key,))


def test_strict_shape():
    spec, W, S = FAMILIES[0], 3, 1
    key = "model.layers.0.ahn.fn.norm.weight"     # Mamba2's norm is over all H*D lanes, not one head
    d = _rewrite(ahn_only(spec, W, S, impl="Mamba2"), lambda sd: {**sd, key: torch.ones(spec.D)}, "shape")
    expect_error(base(spec), ahn=d, window=W, sinks=S, mode="ahn", must_name=(key, str(spec.heads * spec.D)))


@pytest.mark.parametrize("tensors,config", [("GatedDeltaNet", "Mamba2"), ("Mamba2", "DeltaNet"),
                                            ("DeltaNet", "GatedDeltaNet")])
def test_tensors_of_another_variant(tensors, config):
    """Tensors of one variant under a config naming another: an error naming both."""
    spec, W, S = FAMILIES[0], 3, 1
    d = save_ahn_only(base(spec), scratch("other"), W, S, impl=tensors, _ahn_implementation=config)
    expect_error(base(spec), ahn=d, window=W, sinks=S, mode="ahn", must_name=(tensors, config))


def test_unknown_variant():
    spec, W, S = FAMILIES[0], 3, 1
    d = save_ahn_only(base(spec), scratch("unknown"), W, S, _ahn_implementation="RetNet")
    expect_error(base(spec), ahn=d, window=W, sinks=S, mode="ahn", must_name=("RetNet", "Mamba2", "DeltaNet"))


def test_swa_and_full_modes_of_variant_checkpoints():
    """A merged DeltaNet / Mamba2 checkpoint also runs as swa and full (the memory tensors checked, not used)."""
    spec, W, S = FAMILIES[0], 3, 1
    ids = random_ids(20, spec.vocab, 49)
    for impl in VARIANTS:
        m = merged(spec, W, S, impl=impl)
        check(run_feeds(ahn_rt.load(m, window=W, sinks=S, dtype=torch.float32, mode="swa"), ids),
              Oracle(m, window=W, sinks=S, mode="swa").logits(ids), f"{impl} merged as swa")
        check(run_feeds(ahn_rt.load(m, dtype=torch.float32, mode="full"), ids),
              Oracle(m, mode="full").logits(ids), f"{impl} merged as full")


# --------------------------------------------------------------------------------------------- tools and state
def test_parameter_counts_at_3b():
    """Per layer at the Qwen2.5-3B shape: GatedDeltaNet 360,624, DeltaNet 327,808, Mamba2 329,792
    (13.0M / 11.80M / 11.87M over 36 layers, the released models' counts)."""
    from ahn_rt.init_weights import preset_config
    import math
    c = parse_config(preset_config("qwen2.5-3b", True, torch.bfloat16), "3b")
    per_layer = {impl: sum(math.prod(s) for s in memory.get(impl).params(c).values()) for impl in memory.NAMES}
    assert per_layer == {"GatedDeltaNet": 360_624, "DeltaNet": 327_808, "Mamba2": 329_792}
    assert sum(math.prod(s) for s in ahn_shapes(c, "dn").values()) == 11_801_088
    assert sum(math.prod(s) for s in ahn_shapes(c, "mamba2").values()) == 11_872_512


@pytest.mark.parametrize("short", ["dn", "mamba2"])
def test_init_weights_cli(short, tmp_path):
    out = tmp_path / f"tiny-{short}.safetensors"
    r = subprocess.run([sys.executable, "-m", "ahn_rt.init_weights", "--preset", "tiny", "--ahn", short,
                        "--out", str(out), "--dtype", "float32"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    model = ahn_rt.load(out, window=5, sinks=2, dtype="float32")
    assert model.config.mode == "ahn" and model.config.ahn_implementation == memory.resolve(short)
    ids = torch.randint(0, 1000, (20,), generator=torch.Generator().manual_seed(0))
    one = run_feeds(model, ids)
    check(run_feeds(model, ids, [1] * 20), one, f"init_weights --ahn {short}: one by one vs one shot", RTOL_SELF)
    swa = run_feeds(ahn_rt.load(out, window=5, sinks=2, dtype="float32", mode="swa"), ids)
    assert (one - swa)[7:].abs().min(-1).values.max() > 0 and torch.equal(one[:7], swa[:7])


@pytest.mark.parametrize("impl", VARIANTS)
def test_state_save_restore_fork(impl, tmp_path):
    spec, W, S = FAMILIES[1], 3, 1
    model = load(spec, W, S, impl)
    ids = random_ids(30, spec.vocab, 50)
    full = run_feeds(model, ids)
    sess = model.new_session()
    sess.forward(ids[:17])
    names = set(sess.state.tensors())
    assert names == {"k", "v", "memory", *memory.get(impl).gate_fields(model.config)}
    sess.save(tmp_path / "s.safetensors")
    back = model.restore(tmp_path / "s.safetensors")
    fork = sess.fork()
    for s in (sess, back, fork):
        check(torch.cat([full[:17], s.forward(ids[17:])]), full, f"{impl} saved/forked state continues", RTOL_SELF)
    other = "DeltaNet" if impl == "Mamba2" else "Mamba2"
    with pytest.raises(ahn_rt.AhnError):
        load(spec, W, S, other).restore(tmp_path / "s.safetensors")


@pytest.mark.parametrize("impl", VARIANTS)
def test_fill_random_and_graph_safety(impl):
    spec, W, S = FAMILIES[0], 3, 1
    model = load(spec, W, S, impl)
    sess = model.new_session()
    sess.state.fill_random(40, torch.Generator().manual_seed(0))
    for name, g in sess.state.gates.items():
        lo, hi = memory.get(impl).gate_fields(model.config)[name].random
        assert g.min() >= lo and g.max() <= hi
    assert torch.isfinite(sess.forward([1, 2, 3])).all() and sess.position == 43
    # Every variant decodes through compiled ops that read positions on the device, so its decode step is
    # captured into the CUDA graph; the reference ops read them on the host and decode eagerly.
    assert model.decoder.graph_safe
    with ops.use_backend("ref"):
        assert not model.decoder.graph_safe


# --------------------------------------------------------------------------------------------- Mamba2 references
@pytest.mark.parametrize("n", [1, 63, 64, 65, 129])
def test_mamba2_chunk_equals_recurrent(n):
    """The chunked form and the step-by-step reference compute the same function (float32), also with
    decays strong enough to underflow exp(G) inside a block; state in place; Hkv < H."""
    from ahn_rt import ref
    g = torch.Generator().manual_seed(n)
    H, Hkv, D = 4, 2, 16
    q, k, v = torch.randn(n, H, D, generator=g), torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)
    for scale in (1.0, 40.0):
        dt = scale * torch.rand(n, H, generator=g)
        a_log = torch.log(1 + 3 * torch.rand(H, generator=g))
        s0 = torch.randn(H, D, D, generator=g)
        s1, s2 = s0.clone(), s0.clone()
        o1 = ref.mamba2_recurrent_ref(q, k, v, dt, a_log, s1)
        o2 = ref.mamba2_chunk_ref(q, k, v, dt, a_log, s2)
        assert torch.isfinite(o2).all()
        assert rel_err(o2, o1) < 1e-5 and rel_err(s2, s1) < 1e-5, (scale, rel_err(o2, o1), rel_err(s2, s1))
        # the batched blocks (what ops.mamba2_chunk runs: compiled prep and scan), fed in two calls
        s3 = s0.clone()
        cut = n // 3
        o3 = torch.cat([ops.mamba2_chunk(q[a:b], k[a:b], v[a:b], dt[a:b], a_log, s3)
                        for a, b in ((0, cut), (cut, n)) if b > a])
        assert rel_err(o3, o1) < 1e-5 and rel_err(s3, s1) < 1e-5, (scale, rel_err(o3, o1), rel_err(s3, s1))
        s4 = s0.clone()
        assert rel_err(ref.mamba2_chunk_blocks(q, k, v, dt, a_log, s4), o1) < 1e-5 and rel_err(s4, s1) < 1e-5


# --------------------------------------------------------------------------------------------- on a GPU
# Run with `pytest -m cuda` on a GPU machine (skipped elsewhere); passed on an H200 (2026-12-04).
CUDA_CFG = dict(model_type="qwen2", hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
                num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=1000,
                tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=4096, eos_token_id=[])
FP32_REL_CUDA = 1e-4   # float32 GPU vs float32 CPU, as tests/test_cuda_model.py


CUDA_QWEN3 = dict(CUDA_CFG, model_type="qwen3", head_dim=128, num_attention_heads=4, tie_word_embeddings=False,
                  attention_bias=False)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", VARIANTS)
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_cuda_matches_cpu_and_graph_equals_eager(impl, family, monkeypatch):
    """float32 on the GPU vs float32 on the CPU, prefill then decode across the fill point (DeltaNet
    through the CUDA GatedDeltaNet kernels with A_log = -inf, Mamba2 through its own), and a one-shot
    prefill of the whole prompt in chunks; the captured decode graph replays bit-exactly what the eager
    steps compute."""
    from ahn_rt.init_weights import random_state_dict
    from ahn_rt.runtime import from_state_dict
    from ahn_rt.sampling import Sampler, SamplingParams
    cfg = dict(CUDA_CFG if family == "qwen2" else CUDA_QWEN3, _ahn_implementation=impl)
    sd = random_state_dict(cfg, seed=0, dtype=torch.float32, ahn=True, std=0.05)
    W, S = 24, 4
    cpu = from_state_dict(cfg, sd, window=W, sinks=S, mode="ahn", dtype="float32", device="cpu")
    gpu = from_state_dict(cfg, {k: v.cuda() for k, v in sd.items()}, window=W, sinks=S, mode="ahn",
                          dtype="float32", device="cuda")
    assert gpu.decoder.graph_safe
    ids = torch.randint(0, 1000, (20 + 6 * (W + S),), generator=torch.Generator().manual_seed(1))

    def run(model):
        sess = model.new_session(chunk_size=16)
        return torch.cat([sess.forward(ids[:12])] + [sess.forward([int(t)]) for t in ids[12:]]).float().cpu()

    ref, got = run(cpu), run(gpu)
    err = float((got - ref).norm() / ref.norm())
    print(f"{impl}: GPU float32 vs CPU float32 rel err {err:.2e}")
    assert err < FP32_REL_CUDA
    # one shot, in chunks of 16 on both devices, against the token-by-token CPU feed
    shot = {m.device.type: m.new_session(chunk_size=16).forward(ids).float().cpu() for m in (cpu, gpu)}
    for dev, logits in shot.items():
        e = float((logits - ref).norm() / ref.norm())
        assert e < FP32_REL_CUDA, (dev, e)

    if family == "qwen3":   # the graph check below does not depend on the family
        return
    prompt = ids[:30].tolist()

    def steps(graphs):
        monkeypatch.setattr("ahn_rt.graph.GRAPHS_ENABLED", graphs)
        sess = gpu.new_session()
        sampler = Sampler(SamplingParams(temperature=0), 1000, "cuda")
        tok = sampler.sample(sess.forward(prompt, last_only=True)[-1])
        step = sess.stepper(sampler)
        assert step.graphed == graphs
        out = []
        for _ in range(40):
            tok = step(tok)
            out.append(step.logits.clone())
        return torch.stack(out), sess.state.tensors()

    (la, ta), (lb, tb) = steps(False), steps(True)
    assert torch.equal(la, lb) and all(torch.equal(ta[n], tb[n]) for n in ta)
