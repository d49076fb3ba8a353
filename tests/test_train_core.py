"""ahn_rt.train core: chunk_gdn, window/causal attention, TrainModel (student / teacher) and the losses.

CPU only, tiny shapes. The student and the teacher are checked against ahn_rt's own inference
(`runtime.from_state_dict(..., mode="ahn" | "swa" | "full")`) on the same weights: the training forward
must compute THE SAME FUNCTION as inference (docs/semantics.md §2-§6, §10).

Tolerance table (every comparison below uses one of these; errors are max |a - b| / max |b| unless the
row says absolute):

  GDN64  1e-12  chunk_gdn run in float64 vs a float64 token-by-token recurrence (outputs, final state and
                the gradients of q, k, v, beta, alpha, initial_state). Same function, different
                association of the sums: float64 rounding (1e-16) grown by <= 129 steps and the blocked
                triangular inverse (seen: <= 6e-14); a wrong rule (no decay, read before write) misses
                by > 0.1.
  GDN32  1e-5   chunk_gdn in float32 (what training runs) vs the float64 recurrence: float32 epsilon
                1.2e-7 grown through 129 state updates and the triangular inverse (seen: <= 5e-7, also
                with decays strong enough to underflow exp(G) inside a block).
  PAD    1e-12  float64 chunk_gdn with and without trailing beta = alpha = 0 pairs (padding rule): only
                the association inside the last block changes.
  ATTN   1e-12  float64 window_attention (SDPA per query block) vs a dense masked softmax, values and
                gradients; and FlexAttention's plan of the rule (eager, forward) against the same.
  MODEL  1e-5   absolute, float32 logits (|logit| < ~2) of TrainModel vs ahn_rt float32 inference: the
                brief's bound; both sides round in float32 in a different op order (seen: < 1e-6).
  LOSS   1e-6   the fused chunked losses (float32 logits inside, by design) vs a float64 dense
                computation: float32 rounding of log-softmax over V = 50 (seen: ~1e-7).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ahn_rt import init_weights, runtime
from ahn_rt.config import parse_config
from ahn_rt.weights import ahn_shapes, base_shapes, is_ahn_key
from ahn_rt.errors import AhnError
from ahn_rt.settings import SettingsError
from ahn_rt.train.attention import attention_backend, causal_attention, window_attention, window_plan
from ahn_rt.train.gdn import chunk_gdn
from ahn_rt.train.loss import distill_loss, lm_loss
from ahn_rt.train.model import AHNLayer, TrainModel
from oracle import rel_max, window_attention_dense

GDN64, GDN32, PAD, ATTN, MODEL, LOSS = 1e-12, 1e-5, 1e-12, 1e-12, 1e-5, 1e-6
F64 = torch.float64


rel = rel_max


# ----------------------------------------------------------------------------------------------
# chunk_gdn
# ----------------------------------------------------------------------------------------------
def recurrence(q, k, v, beta, alpha, M0, *, decay=True, read_first=False):
    """The gated delta rule of docs/semantics.md §5, one pair at a time, in float64. The keyword
    arguments make deliberately wrong variants (to show the test would catch them)."""
    B, T, H, Dk = q.shape
    qn = q / (q.norm(dim=-1, keepdim=True) + 1e-6) * Dk ** -0.5
    kn = k / (k.norm(dim=-1, keepdim=True) + 1e-6)
    M = M0 if M0 is not None else torch.zeros(B, H, Dk, v.shape[-1], dtype=q.dtype)
    outs = []
    for t in range(T):
        if decay:
            M = M * alpha[:, t].exp()[..., None, None]
        if read_first:
            outs.append(torch.einsum("bhk,bhkv->bhv", qn[:, t], M))
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", kn[:, t], M))
        M = M + kn[:, t, :, :, None] * u[:, :, None, :]
        if not read_first:
            outs.append(torch.einsum("bhk,bhkv->bhv", qn[:, t], M))
    return torch.stack(outs, 1), M


def gdn_inputs(n, with_state, B=2, H=2, Dk=16, Dv=8, seed=0, decay=0.5):
    g = torch.Generator().manual_seed(seed + n)
    t = dict(q=torch.randn(B, n, H, Dk, generator=g, dtype=F64), k=torch.randn(B, n, H, Dk, generator=g, dtype=F64),
             v=torch.randn(B, n, H, Dv, generator=g, dtype=F64), beta=torch.rand(B, n, H, generator=g, dtype=F64),
             alpha=-decay * torch.rand(B, n, H, generator=g, dtype=F64),
             M0=torch.randn(B, H, Dk, Dv, generator=g, dtype=F64) if with_state else None)
    cot = (torch.randn(B, n, H, Dv, generator=g, dtype=F64), torch.randn(B, H, Dk, Dv, generator=g, dtype=F64))
    return t, cot


def outputs_and_grads(fn, t, cot, dtype):
    """(o, final state, grads of q, k, v, beta, alpha[, M0]) of fn on copies of t cast to dtype."""
    leaves = {name: x.detach().to(dtype).requires_grad_() for name, x in t.items() if x is not None}
    o, M = fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves["alpha"], leaves.get("M0"))
    loss = (o.double() * cot[0]).sum() + (M.double() * cot[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return [o, M, *grads], ["o", "final_state", *[f"d{name}" for name in leaves]]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 129])
def test_chunk_gdn_matches_recurrence(n, with_state):
    t, cot = gdn_inputs(n, with_state)
    ref, names = outputs_and_grads(recurrence, t, cot, F64)
    got64, _ = outputs_and_grads(chunk_gdn, t, cot, F64)
    got32, _ = outputs_and_grads(chunk_gdn, t, cot, torch.float32)
    assert got32[0].dtype == torch.float32 and got32[1].dtype == torch.float32
    for name, r, a, b in zip(names, ref, got64, got32):
        assert rel(a, r) < GDN64, (name, rel(a, r))
        assert rel(b, r) < GDN32, (name, rel(b, r))


def test_chunk_gdn_strong_decay():
    """alpha down to -40 per pair: exp(G) underflows to 0 inside a block; no overflow, no NaN, same values."""
    t, cot = gdn_inputs(129, True, decay=40.0)
    ref, names = outputs_and_grads(recurrence, t, cot, F64)
    got, _ = outputs_and_grads(chunk_gdn, t, cot, torch.float32)
    for name, r, a in zip(names, ref, got):
        assert torch.isfinite(a).all() and rel(a, r) < GDN32, (name, rel(a, r))


@pytest.mark.parametrize("chunk_size", [16, 48, 40, 128])
def test_chunk_gdn_other_block_sizes(chunk_size):
    """Blocks that are not 64 long (a multiple of 16 but not a power of two, not a multiple of 16, longer
    than T) compute the same function."""
    t, cot = gdn_inputs(100, True)
    ref, names = outputs_and_grads(recurrence, t, cot, F64)
    got, _ = outputs_and_grads(lambda *a: chunk_gdn(*a, chunk_size=chunk_size), t, cot, F64)
    for name, r, a in zip(names, ref, got):
        assert rel(a, r) < GDN64, (name, rel(a, r))


@pytest.mark.parametrize("wrong", [dict(decay=False), dict(read_first=True)])
def test_chunk_gdn_test_catches_wrong_rule(wrong):
    """A recurrence without the decay, or reading before writing, misses chunk_gdn by far more than the
    tolerances, in the output and in the gradients."""
    t, cot = gdn_inputs(65, True)
    got, names = outputs_and_grads(chunk_gdn, t, cot, F64)
    bad, _ = outputs_and_grads(lambda *a: recurrence(*a, **wrong), t, cot, F64)
    errs = {name: rel(b, g) for name, g, b in zip(names, got, bad)}
    assert errs["o"] > 1e3 * GDN32 and errs["dq"] > 1e3 * GDN32, errs
    if "decay" in wrong:
        assert errs["dalpha"] > 1e3 * GDN32, errs


def test_chunk_gdn_padding_rule():
    """Pairs with beta = alpha = 0 appended at the end (random q, k, v) change neither the outputs of the
    real pairs nor the final state, nor the gradients of the real inputs."""
    t, cot = gdn_inputs(70, True)
    pad = 60   # crosses a block boundary: 70 + 60 = 130 = 2 blocks + 2
    g = torch.Generator().manual_seed(1)
    padded = {k: (torch.cat([x, torch.randn((x.shape[0], pad) + x.shape[2:], generator=g, dtype=F64)], 1)
                  if k in "qkv" else x) for k, x in t.items()}
    padded["beta"] = F.pad(t["beta"], (0, 0, 0, pad))
    padded["alpha"] = F.pad(t["alpha"], (0, 0, 0, pad))
    cot_p = (F.pad(cot[0], (0, 0, 0, 0, 0, pad)), cot[1])
    ref, names = outputs_and_grads(chunk_gdn, t, cot, F64)
    got, _ = outputs_and_grads(chunk_gdn, padded, cot_p, F64)
    for name, r, a in zip(names, ref, got):
        if a.dim() == 4 and a.shape[1] == 70 + pad:
            a = a[:, :70]
        elif a.dim() == 3 and a.shape[1] == 70 + pad:
            a = a[:, :70]
        assert rel(a, r) < PAD, (name, rel(a, r))


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("WS", [[(1, 0), (5, 3), (50, 0)], [(4, 0), (7, 2), (3, 6)], [(6, 2)] * 3, [(40, 4)] * 3])
def test_window_attention_matches_dense(WS):
    B, L, H, Hkv, D = len(WS), 40, 4, 2, 8
    g = torch.Generator().manual_seed(len(WS) + WS[0][0])
    q, k, v = (torch.randn(B, L, h, D, generator=g, dtype=F64, requires_grad=True) for h in (H, Hkv, Hkv))
    W = torch.tensor([w for w, _ in WS])
    S = torch.tensor([s for _, s in WS])
    cot = torch.randn(B, L, H, D, generator=g, dtype=F64)
    ref = window_attention_dense(q, k, v, W.tolist(), S.tolist())
    gr = torch.autograd.grad((ref * cot).sum(), (q, k, v))
    if max(W) < L // 2:   # some query blocks take the sinks + window key path (not all of [0, e))
        assert any(lo is not None for _, _, lo, _ in window_plan(W, S, L, "cpu", 3).blocks)
    for block in (None, 3, 8):
        got = window_attention(q, k, v, W, S, block=block)
        assert rel(got, ref) < ATTN
        gg = torch.autograd.grad((got * cot).sum(), (q, k, v))
        for a, b in zip(gg, gr):
            assert rel(a, b) < ATTN
    causal = causal_attention(q, k, v)
    assert rel(causal, window_attention_dense(q, k, v, [L] * B, [0] * B)) < ATTN


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("WS", [[(1, 0), (130, 3), (300, 0)], [(129, 128), (7, 140)], [(200, 64)] * 2])
def test_flex_plan_matches_dense(WS):
    """The FlexAttention backend's block mask encodes the rule: eager flex (forward only on the CPU) over
    several 128-tiles (L = 300), windows and sinks around the tile edges, grouped heads."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    B, L, H, Hkv, D = len(WS), 300, 4, 2, 8
    g = torch.Generator().manual_seed(WS[0][0])
    q, k, v = (torch.randn(B, L, h, D, generator=g, dtype=F64) for h in (H, Hkv, Hkv))
    W = torch.tensor([w for w, _ in WS])
    S = torch.tensor([s for _, s in WS])
    plan = window_plan(W, S, L, "cpu", backend="flex")
    assert plan.block_mask is not None and not plan.blocks
    got = window_attention(q, k, v, None, None, plan=plan)
    assert rel(got, window_attention_dense(q, k, v, W.tolist(), S.tolist())) < ATTN
    # a plan of another rule (one token less of window) is caught by the same comparison
    wrong = window_attention(q, k, v, None, None, plan=window_plan((W - 1).clamp(min=1), S, L, "cpu", backend="flex"))
    assert rel(wrong, window_attention_dense(q, k, v, W.tolist(), S.tolist())) > 1e-3


def test_attention_backend_switch(monkeypatch):
    """AHN_RT_TRAIN_ATTENTION: auto is sdpa on the CPU (flex there is forward-only), an explicit choice is
    kept, anything else is a one-line error naming the values."""
    monkeypatch.delenv("AHN_RT_TRAIN_ATTENTION", raising=False)
    assert attention_backend("cpu") == "sdpa"
    assert window_plan(torch.tensor([4]), torch.tensor([1]), 20, "cpu").block_mask is None
    monkeypatch.setenv("AHN_RT_TRAIN_ATTENTION", "flex")
    assert attention_backend("cpu") == "flex"
    monkeypatch.setenv("AHN_RT_TRAIN_ATTENTION", "fast")
    with pytest.raises(SettingsError, match="AHN_RT_TRAIN_ATTENTION='fast' is not one of auto, sdpa, flex"):
        attention_backend("cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        window_plan(torch.tensor([4]), torch.tensor([1]), 20, "cpu", backend="dense")


# ----------------------------------------------------------------------------------------------
# TrainModel against ahn_rt inference
# ----------------------------------------------------------------------------------------------
def tiny_cfg(family="qwen2"):
    cfg = init_weights.preset_config("tiny", ahn=True, dtype=torch.float32)
    cfg["vocab_size"] = 97
    if family == "qwen3":   # q_norm / k_norm, head_dim != d / H, o_proj bias, untied LM head
        cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=24, attention_bias=True,
                   tie_word_embeddings=False)
    return cfg


_CACHE = {}


def tiny_model(family="qwen2"):
    if family not in _CACHE:
        cfg = tiny_cfg(family)
        sd = init_weights.random_state_dict(cfg, ahn=True, dtype=torch.float32, seed=3)
        base = {k: v for k, v in sd.items() if not is_ahn_key(k)}
        ahn = {k: v for k, v in sd.items() if is_ahn_key(k)}
        tm = TrainModel(parse_config(cfg, "tiny"), base, ahn, base_dtype=torch.float32)
        _CACHE[family] = (cfg, sd, tm)
    return _CACHE[family]


def ids_for(L, seed=0):
    return torch.randint(0, 97, (L,), generator=torch.Generator().manual_seed(seed))


def runtime_logits(cfg, sd, ids, mode, W=None, S=None):
    model = runtime.from_state_dict(cfg, sd, window=W, sinks=S, mode=mode, dtype="float32")
    return model.new_session().forward(ids.tolist())


def student_logits(tm, ids, WS, checkpoint=False):
    W = torch.tensor([w for w, _ in WS])
    S = torch.tensor([s for _, s in WS])
    with torch.no_grad():
        return tm.lm_logits(tm.forward_student(ids, W, S, checkpoint=checkpoint))


@pytest.mark.parametrize("family,W,S", [("qwen2", 8, 2), ("qwen2", 16, 0), ("qwen2", 1, 0), ("qwen2", 5, 3),
                                        ("qwen3", 12, 3), ("qwen3", 7, 0)])
def test_student_equals_ahn_inference(family, W, S):
    cfg, sd, tm = tiny_model(family)
    ids = ids_for(150)   # 150 - (S + W) >= 129 pairs: the memory spans 3 blocks of 64
    ref = runtime_logits(cfg, sd, ids, "ahn", W, S)
    got = student_logits(tm, ids[None], [(W, S)])[0]
    assert (got - ref).abs().max().item() < MODEL
    swa = runtime_logits(cfg, sd, ids, "swa", W, S)
    assert (swa - ref)[S + W:].abs().max().item() > 1e3 * MODEL   # the memory is really active


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_student_flex_equals_ahn_inference(monkeypatch):
    """The student through the FlexAttention backend (eager, forward: what the CPU can run of it) is still
    ahn inference; the GPU test runs the compiled kernel with gradients."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setenv("AHN_RT_TRAIN_ATTENTION", "flex")
    cfg, sd, tm = tiny_model("qwen3")
    ids = ids_for(150)
    got = student_logits(tm, ids[None], [(12, 3)])[0]
    assert (got - runtime_logits(cfg, sd, ids, "ahn", 12, 3)).abs().max().item() < MODEL


def test_student_batch_with_different_budgets():
    """Sequences with different (W, S) (different numbers of pairs: the shorter list is padded) in one
    batch give what each gives alone, and that is ahn inference; a sequence whose budget covers it (no
    pairs) next to one with pairs gives the teacher."""
    cfg, sd, tm = tiny_model("qwen2")
    L = 100
    ids = torch.stack([ids_for(L, 1), ids_for(L, 2), ids_for(L, 3)])
    WS = [(6, 2), (30, 5), (L, 0)]
    both = student_logits(tm, ids, WS, checkpoint=True)
    for b in range(3):
        alone = student_logits(tm, ids[b:b + 1], WS[b:b + 1])[0]
        assert (both[b] - alone).abs().max().item() < MODEL
    assert (both[0] - runtime_logits(cfg, sd, ids[0], "ahn", *WS[0])).abs().max().item() < MODEL
    with torch.no_grad():
        teacher = tm.lm_logits(tm.forward_teacher(ids[2:]))[0]
    assert (both[2] - teacher).abs().max().item() < MODEL


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_teacher_equals_full_inference(family):
    cfg, sd, tm = tiny_model(family)
    ids = ids_for(90, 5)
    with torch.no_grad():
        got = tm.lm_logits(tm.forward_teacher(ids[None]))[0]
    assert (got - runtime_logits(cfg, sd, ids, "full")).abs().max().item() < MODEL


def test_fresh_init_student_equals_swa():
    """ahn=None: the official initial values with o_proj = 0, so the student is the sinks + window model."""
    cfg, sd, _ = tiny_model("qwen2")
    base = {k: v for k, v in sd.items() if not is_ahn_key(k)}
    tm = TrainModel(parse_config(cfg, "tiny"), base, base_dtype=torch.float32, seed=1)
    assert all(layer.o_proj.weight.abs().max() == 0 for layer in tm.ahn)
    assert all(0.0 < layer.A_log.exp().min() and layer.A_log.exp().max() <= 16.0 for layer in tm.ahn)
    ids = ids_for(80, 7)
    got = student_logits(tm, ids[None], [(9, 4)])[0]
    assert (got - runtime_logits(cfg, sd, ids, "swa", 9, 4)).abs().max().item() < MODEL


def test_fresh_gated_deltanet_draws_the_official_distributions():
    """init_ draws what docs/semantics.md §10 names: exp(A_log) uniform in (0, 16), dt = softplus(dt_bias)
    log-uniform in [1e-3, 0.1], D = o_norm = 1, a/b/g projections N(0, 0.02), o_proj = 0. 4096 heads, so
    each share below is checked to 6 sigma (a draw from (1, 16) puts no head below 1: 256 expected)."""
    H = 4096
    layer = AHNLayer(8, H, 4).init_(torch.Generator().manual_seed(0))
    A = layer.A_log.double().exp()
    assert bool(torch.isfinite(layer.A_log).all()) and 0.0 < A.min() and A.max() <= 16.0
    for lo, hi in ((0, 1), (0, 8), (4, 12), (15, 16)):
        share = (hi - lo) / 16
        got = int(((A >= lo) & (A < hi)).sum())
        assert abs(got - H * share) < 6 * (H * share * (1 - share)) ** 0.5, (lo, hi, got)
    log_dt = F.softplus(layer.dt_bias.double()).log()
    assert log_dt.min() >= torch.log(torch.tensor(1e-3)) - 1e-5 and log_dt.max() <= torch.log(torch.tensor(0.1)) + 1e-5
    below_mid = int((log_dt < 0.5 * (torch.log(torch.tensor(1e-3)) + torch.log(torch.tensor(0.1)))).sum())
    assert abs(below_mid - H / 2) < 6 * (H / 4) ** 0.5
    assert (layer.D == 1).all() and (layer.o_norm.weight == 1).all() and (layer.o_proj.weight == 0).all()
    for lin in (layer.a_proj, layer.b_proj, layer.g_proj):
        assert abs(lin.weight.std().item() - 0.02) < 1e-3 and abs(lin.weight.mean().item()) < 1e-3


def test_state_dicts_and_checkpointed_gradients():
    """ahn_state_dict / base_state_dict give back the official / HF names and tensors; gradients with
    per-layer checkpointing equal those without, and reach the AHN parameters of the first layer."""
    cfg, sd, tm = tiny_model("qwen3")
    c = parse_config(cfg, "tiny")
    a = tm.ahn_state_dict()
    assert list(a) == list(ahn_shapes(c, "GatedDeltaNet"))
    assert all(torch.equal(a[k], sd[k]) for k in a)
    b = tm.base_state_dict()
    assert set(b) == set(base_shapes(c)) and all(torch.equal(b[k], sd[k]) for k in b)
    assert [n for n, _ in AHNLayer(8, 2, 4).named_parameters()] == [k.split(".fn.")[1] for k in a if ".0." in k]
    assert not any(p.requires_grad for n, p in tm.named_parameters() if not n.startswith("ahn."))

    ids = ids_for(60, 9)[None]
    grads = []
    for ckpt in (True, False, "layer", "memory", "none"):
        tm.zero_grad()
        h = tm.forward_student(ids, torch.tensor([10]), torch.tensor([2]), checkpoint=ckpt)
        tm.lm_logits(h).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tm.ahn.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and "0.a_proj.weight" in grads[0] and "0.o_proj.weight" in grads[0]
    assert grads[0]["0.a_proj.weight"].abs().max() > 0
    for g in grads[1:]:
        assert set(g) == set(grads[0])
        for n in grads[0]:
            assert rel(grads[0][n], g[n]) < MODEL, n


def _saved_bytes(tm, ids, W, S, checkpoint) -> int:
    """Bytes of the distinct storages that autograd keeps for backward in one student forward (parameters
    excluded)."""
    params = {p.untyped_storage().data_ptr() for p in tm.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tm.forward_student(ids, torch.tensor([W]), torch.tensor([S]), checkpoint=checkpoint)
    return sum(seen.values())


def test_memory_checkpointing_keeps_less_than_none():
    """--activation-checkpointing memory recomputes each layer's AHN memory module in backward and keeps the
    rest: less kept than "none" (the memory's chunked recurrence keeps float32 block tensors and states per
    token), more than "layer" (which keeps each layer's input only). A mode that silently fell back to
    "none" (or to "layer") fails the ordering; the gradients are the same in every mode (the test above)."""
    cfg, sd, tm = tiny_model("qwen2")
    ids = ids_for(200, 3)[None]
    none, memory, layer = (_saved_bytes(tm, ids, 16, 4, c) for c in ("none", "memory", "layer"))
    assert layer < memory < none, (layer, memory, none)
    assert none - memory > (none - layer) / 4, (layer, memory, none)   # the memory is a large share of a layer
    with pytest.raises(AhnError, match="activation checkpointing 'some': use one of layer, memory, none"):
        tm.forward_student(ids, torch.tensor([16]), torch.tensor([4]), checkpoint="some")


def test_train_base_teacher():
    """train_base (teacher pretraining): float32 trainable base, no AHN modules, the teacher runs with
    gradient and lm_loss reaches every base parameter (the tied embedding through the LM head too); the
    caller's tensors are not shared (an optimizer step must not write into them)."""
    cfg, sd, _ = tiny_model("qwen2")
    base = {k: v.to(torch.bfloat16) for k, v in sd.items() if not is_ahn_key(k)}
    tm = TrainModel(parse_config(cfg, "tiny"), base, train_base=True)
    assert len(tm.ahn) == 0 and all(p.requires_grad and p.dtype == torch.float32 for p in tm.parameters())
    ids = ids_for(40, 11)[None]
    loss = lm_loss(tm, tm.forward_teacher(ids), ids)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in tm.parameters() if p.dim() == 2)
    ref = F.cross_entropy(tm.lm_logits(tm.forward_teacher(ids))[0, :-1], ids[0, 1:])
    assert abs(loss.item() - ref.item()) < LOSS * ref.item()
    tm2 = TrainModel(parse_config(cfg, "tiny"), {k: v.float() for k, v in base.items()}, train_base=True)
    assert all(tm2.embed.data_ptr() != t.data_ptr() for t in base.values())


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
class _Head:
    def __init__(self, w):
        self.lm_head_weight = w


def _loss_case(seed, V=50, d=8, B=2, L=13):
    """A random LM head W, teacher / student hidden states, loss positions and labels (two ignored)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g, dtype=F64, requires_grad=True)
    ht = torch.randn(B, L, d, generator=g, dtype=F64)
    hs = torch.randn(B, L, d, generator=g, dtype=F64, requires_grad=True)
    valid = torch.rand(B, L, generator=g) > 0.3
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 3] = labels[1, 5] = -100
    return g, W, ht, hs, valid, labels


@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
def test_distill_loss_equals_dense(ce_weight):
    g, W, ht, hs, valid, labels = _loss_case(0)
    B = valid.shape[0]
    loss, n = distill_loss(_Head(W), ht, hs, valid, ce_weight=ce_weight, labels=labels, chunk=4)
    assert n == int(valid.sum())
    lt = (ht @ W.detach().T).log_softmax(-1)   # the teacher is a constant
    ls = (hs @ W.T).log_softmax(-1)
    kl = F.kl_div(ls[valid], lt[valid], log_target=True, reduction="sum") / valid.sum()
    tgt = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], 1)
    ce = F.cross_entropy((hs @ W.T)[valid], tgt[valid], ignore_index=-100)
    ref = kl + ce_weight * ce
    assert abs(loss.item() - ref.item()) < LOSS * ref.item()
    for a, b in zip(torch.autograd.grad(loss, (hs, W)), torch.autograd.grad(ref, (hs, W))):
        assert rel(a, b) < LOSS


@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
def test_distill_loss_weighted_equals_dense(ce_weight):
    """Per-position weights: both terms become weighted means (sum w loss / sum w), gradients included."""
    g, W, ht, hs, valid, labels = _loss_case(2)
    B, L = valid.shape
    w = torch.rand(B, L, generator=g) * 3
    w[0, 0] = 40.0                                  # one heavy position, as a long-range answer gets
    loss, mass = distill_loss(_Head(W), ht, hs, valid, ce_weight=ce_weight, labels=labels, chunk=4, weight=w)
    wv = w[valid].double()
    assert abs(mass - float(wv.sum())) < 1e-9
    lt = (ht @ W.detach().T).log_softmax(-1)
    ls = (hs @ W.T).log_softmax(-1)
    kl_rows = (lt.exp() * (lt - ls)).sum(-1)[valid]
    tgt = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], 1)[valid]
    has = tgt >= 0
    ce_rows = -ls[valid].gather(1, tgt.clamp(min=0)[:, None])[:, 0]
    ref = (wv * kl_rows).sum() / wv.sum() + ce_weight * (wv * ce_rows * has).sum() / (wv * has).sum()
    assert abs(loss.item() - ref.item()) < LOSS * ref.item()
    for a, b in zip(torch.autograd.grad(loss, (hs, W)), torch.autograd.grad(ref, (hs, W))):
        assert rel(a, b) < LOSS
    # a uniform scale of the weights changes nothing; ignoring them would fail the check above
    again, _ = distill_loss(_Head(W), ht, hs, valid, ce_weight=ce_weight, labels=labels, chunk=4, weight=w * 5)
    assert abs(again.item() - loss.item()) < LOSS * loss.item()
    plain, n = distill_loss(_Head(W), ht, hs, valid, ce_weight=ce_weight, labels=labels, chunk=4)
    assert n == int(valid.sum()) and abs(plain.item() - ref.item()) > 100 * LOSS * ref.item()


def test_lm_loss_equals_cross_entropy():
    g = torch.Generator().manual_seed(1)
    V, d, B, L = 50, 8, 2, 13
    W = torch.randn(V, d, generator=g, dtype=F64, requires_grad=True)
    h = torch.randn(B, L, d, generator=g, dtype=F64, requires_grad=True)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[1, 4] = -100
    got = lm_loss(_Head(W), h, labels, chunk=5)
    ref = F.cross_entropy((h @ W.T)[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(got.item() - ref.item()) < LOSS * ref.item()
    for a, b in zip(torch.autograd.grad(got, (h, W)), torch.autograd.grad(ref, (h, W))):
        assert rel(a, b) < LOSS


def test_base_state_dict_round_trips_and_an_integer_base_is_refused():
    """The trainer holds the base layers through the loader's key map (weights.layer_parts: q|k|v and gate|up
    fused), and gives them back split under their Hugging Face names, bit for bit, for both families. A base
    of integer tensors (a quantized checkpoint) was cast to floats in silence; the loader refuses it, and so
    does the trainer now."""
    for family in ("qwen2", "qwen3"):
        cfg, sd, tm = tiny_model(family)
        back = tm.base_state_dict()
        base = {k: v for k, v in sd.items() if not is_ahn_key(k)}
        assert set(back) == set(base) - ({"lm_head.weight"} if cfg["tie_word_embeddings"] else set())
        assert all(torch.equal(back[k], base[k]) for k in back)
    cfg, sd, _ = tiny_model("qwen2")
    base = {k: v for k, v in sd.items() if not is_ahn_key(k)}
    base["model.layers.1.mlp.up_proj.weight"] = base["model.layers.1.mlp.up_proj.weight"].to(torch.int8)
    with pytest.raises(AhnError, match=r"model.layers.1.mlp.up_proj.weight is stored as torch.int8, not as floating point"):
        TrainModel(parse_config(cfg, "tiny"), base, base_dtype=torch.float32)
