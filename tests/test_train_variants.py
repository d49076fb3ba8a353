"""ahn_rt.train for every memory variant (docs/semantics.md §10, §11): the chunked scalar-decay scan
(Mamba2's memory) and each trainable memory module against float64 autograd through token-by-token
implementations written from the math; the student forward of DeltaNet / Mamba2 against ahn_rt inference
on the same weights; official initial values; checkpoint names and writing.

Tolerance table (max |a - b| / max |b| unless the row says absolute):
  GLA64  1e-12  chunk_scalar_decay in float64 vs the float64 recurrence (outputs, final state, gradients of
                q, k, v, log-decay, initial state): same function, sums associated differently (seen 3e-15).
  GLA32  1e-5   chunk_scalar_decay in float32 (what training runs) vs the float64 recurrence (seen 4e-7,
                also with decays that underflow exp(G) inside a block).
  MOD64  1e-10  a memory module (gates, recurrence, output head) in float64 vs a float64 per-token
                implementation: values and the gradients of every parameter and of x, q, k, v (seen 1e-14).
  MODEL  1e-5   absolute, float32 logits of TrainModel vs ahn_rt float32 inference (seen < 1e-6).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ahn_rt import init_weights, runtime
from ahn_rt.config import parse_config
from ahn_rt.errors import AhnError
from ahn_rt.train import checkpoint as ckpt_io
from ahn_rt.train.gla import chunk_scalar_decay
from ahn_rt.train.memories import LAYERS, make_layer
from ahn_rt.train.model import TrainModel, _Pairs
from ahn_rt.weights import ahn_shapes, is_ahn_key
from oracle import rel_max

GLA64, GLA32, MOD64, MODEL = 1e-12, 1e-5, 1e-10, 1e-5
F64 = torch.float64
IMPLS = ["GatedDeltaNet", "DeltaNet", "Mamba2"]


rel = rel_max


# ----------------------------------------------------------------------------------------------
# chunk_scalar_decay
# ----------------------------------------------------------------------------------------------
def recurrence(q, k, v, a, M0, *, decay=True):
    """M <- e^a M + k v^T; o = M^T q, one pair at a time (``decay=False``: a deliberately wrong rule)."""
    B, T, H, Dk = q.shape
    M = M0 if M0 is not None else torch.zeros(B, H, Dk, v.shape[-1], dtype=q.dtype)
    outs = []
    for t in range(T):
        if decay:
            M = M * a[:, t].exp()[..., None, None]
        M = M + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], M))
    return torch.stack(outs, 1), M


def scan_inputs(n, with_state, strength=0.5, B=2, H=2, Dk=16, Dv=8):
    g = torch.Generator().manual_seed(n + 100 * with_state)
    t = dict(q=torch.randn(B, n, H, Dk, generator=g, dtype=F64), k=torch.randn(B, n, H, Dk, generator=g, dtype=F64),
             v=torch.randn(B, n, H, Dv, generator=g, dtype=F64), a=-strength * torch.rand(B, n, H, generator=g, dtype=F64),
             M0=torch.randn(B, H, Dk, Dv, generator=g, dtype=F64) if with_state else None)
    cot = (torch.randn(B, n, H, Dv, generator=g, dtype=F64), torch.randn(B, H, Dk, Dv, generator=g, dtype=F64))
    return t, cot


def outputs_and_grads(fn, t, cot, dtype):
    leaves = {name: x.detach().to(dtype).requires_grad_() for name, x in t.items() if x is not None}
    o, M = fn(leaves["q"], leaves["k"], leaves["v"], leaves["a"], leaves.get("M0"))
    loss = (o.double() * cot[0]).sum() + (M.double() * cot[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return [o, M, *grads], ["o", "final_state", *[f"d{name}" for name in leaves]]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 129])
def test_scan_matches_recurrence(n, with_state):
    t, cot = scan_inputs(n, with_state)
    ref, names = outputs_and_grads(recurrence, t, cot, F64)
    got64, _ = outputs_and_grads(chunk_scalar_decay, t, cot, F64)
    got32, _ = outputs_and_grads(chunk_scalar_decay, t, cot, torch.float32)
    for name, r, a, b in zip(names, ref, got64, got32):
        assert rel(a, r) < GLA64, (name, rel(a, r))
        assert rel(b, r) < GLA32, (name, rel(b, r))


def test_scan_strong_decay_and_block_sizes():
    """Decays down to -40 per pair (exp(G) underflows inside a block): finite, same values; blocks that
    are not 64 long compute the same function; a rule without the decay misses by far."""
    t, cot = scan_inputs(129, True, strength=40.0)
    ref, names = outputs_and_grads(recurrence, t, cot, F64)
    got, _ = outputs_and_grads(chunk_scalar_decay, t, cot, torch.float32)
    for name, r, a in zip(names, ref, got):
        assert torch.isfinite(a).all() and rel(a, r) < GLA32, (name, rel(a, r))
    t, cot = scan_inputs(100, True)
    ref, names = outputs_and_grads(recurrence, t, cot, F64)
    for c in (16, 40, 128):
        got, _ = outputs_and_grads(lambda *x: chunk_scalar_decay(*x, chunk_size=c), t, cot, F64)
        for name, r, a in zip(names, ref, got):
            assert rel(a, r) < GLA64, (c, name, rel(a, r))
    bad, _ = outputs_and_grads(lambda *x: recurrence(*x, decay=False), t, cot, F64)
    assert rel(bad[0], ref[0]) > 1e3 * GLA32 and rel(bad[5], ref[5]) > 1e3 * GLA32


# ----------------------------------------------------------------------------------------------
# Each memory module against a float64 per-token implementation, with parameter gradients
# ----------------------------------------------------------------------------------------------
def memory_ref(impl, p, x, q, k, v, W, S):
    """The memory term [L, H, D] of ONE sequence (zero before S + W), token by token in float64, written
    from docs/semantics.md §4-§6 and §11 with the layer's parameters ``p`` (a dict of tensors)."""
    L, H, D = q.shape
    G = H // k.shape[1]
    kh, vh = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    out = [torch.zeros(H, D, dtype=F64)] * (S + W)
    if impl == "Mamba2":
        dt = F.softplus(x @ p["dt_proj.weight"].T + p["dt_proj.bias"] + p["dt_bias"])
        z = x @ p["g_proj.weight"].T + p["g_proj.bias"]
        A = -p["A_log"].exp()
        h = torch.zeros(H, D, D, dtype=F64)                                   # [H, Dv, Dk]
        for t in range(S + W, L):
            e = t - W
            kk = kh[e] / kh[e].norm(dim=-1, keepdim=True).clamp_min(1e-12)
            qq = q[t] / q[t].norm(dim=-1, keepdim=True).clamp_min(1e-12)
            h = (dt[e] * A).exp()[:, None, None] * h + dt[e][:, None, None] * vh[e][:, :, None] * kk[:, None, :]
            y = torch.einsum("hvk,hk->hv", h, qq) * F.silu(z[t])[:, None]
            y = y * torch.rsqrt(y.pow(2).mean() + 1e-5) * p["norm.weight"].view(H, D)
            out.append(torch.einsum("hi,hio->ho", y, p["o_proj.weight"]))
        return torch.stack(out)
    beta = torch.sigmoid(x @ p["b_proj.weight"].T)
    z = x @ p["g_proj.weight"].T
    if impl == "GatedDeltaNet":
        alpha = -p["A_log"].exp() * F.softplus(x @ p["a_proj.weight"].T + p["dt_bias"])
    M = torch.zeros(H, D, D, dtype=F64)                                       # [H, Dk, Dv]
    for t in range(S + W, L):
        e = t - W
        kk = kh[e] / (kh[e].norm(dim=-1, keepdim=True) + 1e-6)
        qq = q[t] / (q[t].norm(dim=-1, keepdim=True) + 1e-6) * D ** -0.5
        if impl == "GatedDeltaNet":
            M = alpha[e].exp()[:, None, None] * M
        u = beta[e][:, None] * (vh[e] - torch.einsum("hk,hkv->hv", kk, M))
        M = M + kk[:, :, None] * u[:, None, :]
        o = torch.einsum("hk,hkv->hv", qq, M)
        y = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * p["o_norm.weight"] * F.silu(z[t])[:, None]
        out.append(torch.einsum("hi,hio->ho", y, p["o_proj.weight"]))
    return torch.stack(out)


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_module_matches_token_by_token(impl):
    """A batch of two sequences with different budgets (so the shorter pair list is padded): values and
    float64 gradients of every parameter and of x, q, k, v equal the per-token implementation."""
    d, H, Hkv, D, L = 12, 4, 2, 8, 100
    budgets = [(10, 3), (30, 5)]                    # 87 pairs (two 64-blocks) and 65 pairs
    g = torch.Generator().manual_seed(7)
    layer = make_layer(impl, d, H, D).double()
    with torch.no_grad():
        for name, prm in layer.named_parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=F64) * (0.3 if prm.dim() > 1 else 0.5))
            if name == "o_norm.weight" or name == "norm.weight":
                prm.add_(1.0)
    B = len(budgets)
    x = torch.randn(B, L, d, generator=g, dtype=F64, requires_grad=True)
    q = torch.randn(B, L, H, D, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(B, L, Hkv, D, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(B, L, Hkv, D, generator=g, dtype=F64, requires_grad=True)
    n = [L - W - S for W, S in budgets]
    N = max(n)
    i = torch.arange(N)[None, :]
    Wt, St, nt = (torch.tensor(z)[:, None] for z in ([w for w, _ in budgets], [s for _, s in budgets], n))
    pairs = _Pairs(N, (St + i).clamp(max=L - 1), (St + Wt + i).clamp(max=L - 1), (i < nt).to(F64)[..., None])
    m = layer(x, q, k, v, pairs)                                               # [B, N, H, D]
    cot = torch.randn(m.shape, generator=g, dtype=F64)
    params = dict(layer.named_parameters())
    leaves = [x, q, k, v, *params.values()]
    kw = dict(allow_unused=True, materialize_grads=True)     # GatedDeltaNet's D is stored, never used (§4)
    got = torch.autograd.grad((m * cot * pairs.valid[..., None]).sum(), leaves, **kw)
    refs, loss = [], 0.0
    for b, (W, S) in enumerate(budgets):
        r = memory_ref(impl, params, x[b], q[b], k[b], v[b], W, S)[S + W:]     # [n_b, H, D]
        refs.append(r)
        loss = loss + (r * cot[b, :n[b]]).sum()
        assert rel(m[b, :n[b]], r) < MOD64, (impl, b, rel(m[b, :n[b]], r))
        assert m[b, n[b]:].abs().max() == 0 if n[b] < N else True
    want = torch.autograd.grad(loss, leaves, **kw)
    names = ["x", "q", "k", "v", *params]
    for name, a, r in zip(names, got, want):
        assert rel(a, r) < MOD64, (impl, name, rel(a, r))
    assert all(float(r.abs().max()) > 0 for name, r in zip(names[4:], want[4:]) if name != "D"), \
        "every parameter gets a gradient"


# ----------------------------------------------------------------------------------------------
# TrainModel against ahn_rt inference
# ----------------------------------------------------------------------------------------------
def tiny_cfg(family, impl):
    cfg = init_weights.preset_config("tiny", impl, torch.float32)
    cfg["vocab_size"] = 97
    if family == "qwen3":   # q_norm / k_norm, head_dim != d / H, o_proj bias, untied LM head
        cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=24, attention_bias=True,
                   tie_word_embeddings=False)
    return cfg


_CACHE = {}


def split_ahn(sd):
    """(base, AHN) halves of a state dict."""
    return ({k: v for k, v in sd.items() if not is_ahn_key(k)}, {k: v for k, v in sd.items() if is_ahn_key(k)})


def tiny_model(family, impl):
    if (family, impl) not in _CACHE:
        cfg = tiny_cfg(family, impl)
        sd = init_weights.random_state_dict(cfg, ahn=True, dtype=torch.float32, seed=5)
        base, ahn = split_ahn(sd)
        tm = TrainModel(parse_config(cfg, "tiny"), base, ahn, base_dtype=torch.float32)
        _CACHE[family, impl] = (cfg, sd, tm)
    return _CACHE[family, impl]


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


@pytest.mark.parametrize("family,W,S", [("qwen2", 8, 2), ("qwen2", 1, 0), ("qwen3", 12, 3)])
@pytest.mark.parametrize("impl", ["DeltaNet", "Mamba2"])
def test_student_equals_ahn_inference(impl, family, W, S):
    cfg, sd, tm = tiny_model(family, impl)
    assert tm.implementation == impl
    ids = ids_for(150)   # >= 129 pairs: the memory spans 3 blocks of 64
    ref = runtime_logits(cfg, sd, ids, "ahn", W, S)
    got = student_logits(tm, ids[None], [(W, S)])[0]
    err = (got - ref).abs().max().item()
    print(f"{impl} {family} W={W} S={S}: student vs runtime max abs {err:.2e}")
    assert err < MODEL
    swa = runtime_logits(cfg, sd, ids, "swa", W, S)
    assert (swa - ref)[S + W:].abs().max().item() > 1e3 * MODEL   # the memory is really active


@pytest.mark.parametrize("impl", ["DeltaNet", "Mamba2"])
def test_student_batch_with_different_budgets(impl):
    cfg, sd, tm = tiny_model("qwen2", impl)
    L = 100
    ids = torch.stack([ids_for(L, 1), ids_for(L, 2), ids_for(L, 3)])
    WS = [(6, 2), (30, 5), (L, 0)]
    both = student_logits(tm, ids, WS, checkpoint=True)
    for b in range(2):
        ref = runtime_logits(cfg, sd, ids[b], "ahn", *WS[b])
        assert (both[b] - ref).abs().max().item() < MODEL
    with torch.no_grad():
        teacher = tm.lm_logits(tm.forward_teacher(ids[2:]))[0]
    assert (both[2] - teacher).abs().max().item() < MODEL


@pytest.mark.parametrize("impl", ["DeltaNet", "Mamba2"])
def test_fresh_init_and_names(impl, tmp_path):
    """implementation= builds the variant's modules with the official initial values (o_proj = 0: the
    student is the sinks + window model), the official names in the official order; the written
    checkpoint (output_config / write_model) loads in ahn_rt as that variant; gradients with per-layer
    checkpointing equal those without and reach every parameter."""
    cfg, sd, _ = tiny_model("qwen2", impl)
    base, _ = split_ahn(sd)
    c = parse_config(init_weights.preset_config("tiny", False, torch.float32) | {"vocab_size": 97}, "tiny")
    short = {"DeltaNet": "dn", "Mamba2": "mamba2"}[impl]
    tm = TrainModel(c, base, base_dtype=torch.float32, seed=1, implementation=short)
    assert tm.implementation == impl and all(type(layer) is LAYERS[impl] for layer in tm.ahn)
    assert all(layer.o_proj.weight.abs().max() == 0 for layer in tm.ahn)
    if impl == "Mamba2":
        H = c.num_heads
        assert torch.allclose(tm.ahn[0].A_log, torch.log(torch.arange(1, H + 1.0)))
        assert (tm.ahn[0].dt_bias == 1).all() and (tm.ahn[0].norm.weight == 1).all()
        assert (tm.ahn[0].dt_proj.bias == 0).all() and tm.ahn[0].dt_proj.weight.std() > 0.01
    a = tm.ahn_state_dict()
    assert list(a) == list(ahn_shapes(c, impl))
    ids = ids_for(80, 7)
    got = student_logits(tm, ids[None], [(9, 4)])[0]
    assert (got - runtime_logits(cfg, sd, ids, "swa", 9, 4)).abs().max().item() < MODEL

    # a trained-looking memory written as the official checkpoint loads as this variant
    with torch.no_grad():
        for layer in tm.ahn:
            layer.o_proj.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    out_cfg = ckpt_io.output_config(cfg, "qwen2", 9, 4, implementation=short)
    assert out_cfg["_ahn_implementation"] == impl
    path = ckpt_io.write_model(tmp_path, tm.ahn_state_dict(), c, out_cfg, torch.float32)
    from ahn_rt.weights import write_checkpoint
    write_checkpoint(tmp_path / "base" / "model.safetensors", base, cfg, config_json=True)
    import ahn_rt
    model = ahn_rt.load(tmp_path / "base", ahn=path, dtype="float32")
    assert model.config.ahn_implementation == impl and (model.config.window, model.config.sinks) == (9, 4)
    ref = model.new_session().forward(ids.tolist())
    assert (student_logits(tm, ids[None], [(9, 4)])[0] - ref).abs().max().item() < MODEL

    grads = []
    for ckpt in (True, False):
        tm.zero_grad()
        h = tm.forward_student(ids[None], torch.tensor([10]), torch.tensor([2]), checkpoint=ckpt)
        tm.lm_logits(h).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in tm.ahn.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) == {n for n, _ in tm.ahn.named_parameters()}
    for n in grads[0]:
        assert rel(grads[0][n], grads[1][n]) < MODEL, n
        assert grads[0][n].abs().max() > 0, n


def test_ahn_tensors_of_another_variant_are_refused():
    cfg, sd, _ = tiny_model("qwen2", "Mamba2")
    base, ahn = split_ahn(sd)
    c = parse_config(cfg, "tiny")
    with pytest.raises(AhnError, match="DeltaNet"):
        TrainModel(c, base, ahn, base_dtype=torch.float32, implementation="DeltaNet")
    with pytest.raises(AhnError, match="not supported"):
        TrainModel(c, base, None, base_dtype=torch.float32, implementation="rwkv")
    assert math.isclose(sum(p.numel() for p in TrainModel(c, base, ahn, base_dtype=torch.float32).ahn.parameters()),
                        sum(math.prod(s) for s in ahn_shapes(c).values()))


# ----------------------------------------------------------------------------------------------
# python -m ahn_rt.train --ahn
# ----------------------------------------------------------------------------------------------
CLI_CFG = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=131,
               tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=4096, hidden_act="silu",
               rms_norm_eps=1e-6, torch_dtype="float32", eos_token_id=[])


def cli_setup(tmp_path, capsys):
    """A small base under tmp_path/base, four token records in tmp_path/ids.jsonl, and train(*flags) ->
    (exit code, stderr) of `python -m ahn_rt.train` on them (W = 8, S = 2, lr 1e-2)."""
    import json
    import random
    from ahn_rt.train.__main__ import main
    from ahn_rt.weights import write_checkpoint
    sd = init_weights.random_state_dict(CLI_CFG, ahn=False, dtype=torch.float32, std=0.2, seed=2)
    write_checkpoint(tmp_path / "base" / "model.safetensors", sd, CLI_CFG, config_json=True)
    rng = random.Random(0)
    with open(tmp_path / "ids.jsonl", "w") as f:
        for _ in range(4):
            f.write(json.dumps({"input_ids": [rng.randrange(131) for _ in range(rng.randrange(30, 50))]}) + "\n")

    def train(*args):
        try:
            rc = main([str(x) for x in ["--base", tmp_path / "base", "--data", tmp_path / "ids.jsonl",
                                        "--log-every", 1, "--window", 8, "--sinks", 2, "--lr", "1e-2",
                                        "--save-dtype", "float32", *args]])
        except SystemExit as e:
            rc = e.code
        return rc, capsys.readouterr().err

    return sd, train


def test_train_cli_ahn_flag(tmp_path, capsys):
    """--ahn mamba2 trains a Mamba2 memory: official keys and config, the output loads in ahn_rt and
    equals the trained student; a resume keeps the variant (a different --ahn is refused); --init-ahn of
    that output starts a Mamba2 run without --ahn; a DeltaNet start under --ahn gdn is refused."""
    import json
    import random
    import ahn_rt
    cfg, V = CLI_CFG, CLI_CFG["vocab_size"]
    sd, train = cli_setup(tmp_path, capsys)

    out = tmp_path / "m2"
    rc, err = train("--out", out, "--steps", 2, "--stop-after", 1, "--ahn", "mamba2")
    assert rc == 0, err
    rc, err = train("--out", out, "--resume", "--ahn", "dn")
    assert rc == 2 and "--ahn dn differs" in err, err
    rc, err = train("--out", out, "--resume")
    assert rc == 0, err
    c = parse_config(cfg, "t")
    saved_cfg = json.loads((out / "config.json").read_text())
    assert saved_cfg["_ahn_implementation"] == "Mamba2"
    from safetensors.torch import load_file
    saved = load_file(out / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == ahn_shapes(c, "Mamba2")
    model = ahn_rt.load(tmp_path / "base", ahn=out / "model.safetensors", dtype="float32")
    assert model.config.ahn_implementation == "Mamba2"
    ids = torch.tensor([random.Random(9).randrange(V) for _ in range(40)])
    student = TrainModel(c, sd, saved, base_dtype=torch.float32, implementation="Mamba2")
    got = student_logits(student, ids[None], [(8, 2)])[0]
    assert (got - model.new_session().forward(ids.tolist())).abs().max().item() < MODEL

    rc, err = train("--out", tmp_path / "again", "--steps", 1, "--init-ahn", out / "model.safetensors")
    assert rc == 0, err
    assert json.loads((tmp_path / "again" / "config.json").read_text())["_ahn_implementation"] == "Mamba2"
    rc, err = train("--out", tmp_path / "bad", "--steps", 1, "--init-ahn", out / "model.safetensors", "--ahn", "gdn")
    assert rc == 2 and "Mamba2" in err, err


@pytest.mark.parametrize("impl,expect", [
    ("GatedDeltaNet", {"A_log", "D", "dt_bias", "o_norm.weight"}),
    ("DeltaNet", {"o_norm.weight"}),
    ("Mamba2", {"A_log", "dt_bias", "norm.weight", "dt_proj.bias", "g_proj.bias"}),
])
def test_weight_decay_spares_each_variants_declared_names(impl, expect):
    """AdamW's no-decay group holds exactly the memory module's declared names (every layer), and the
    decay group holds the rest: a trainer that used GatedDeltaNet's list for Mamba2 decays its norm and
    biases and fails here."""
    from ahn_rt.train.trainer import no_decay_parameters
    _, _, model = tiny_model("qwen2", impl)
    exempt = {id(p) for p in no_decay_parameters(model)}
    names = {name for layer in model.ahn for name, p in layer.named_parameters() if id(p) in exempt}
    assert names == expect
    assert len(exempt) == len(names) * len(model.ahn)


# ----------------------------------------------------------------------------------------------
# --decay-init long
# ----------------------------------------------------------------------------------------------
def start_half_lives(layer) -> torch.Tensor:
    """Each head's half-life in tokens with a zero input to the decay projection (GatedDeltaNet:
    alpha = -exp(A_log) softplus(a + dt_bias); Mamba2: dt * -exp(A_log), dt = softplus(dt_raw + dt_bias);
    a = dt_raw = 0 at x = 0 for both fresh memories)."""
    log_decay = -layer.A_log.double().exp() * F.softplus(layer.dt_bias.double())
    return math.log(0.5) / log_decay


@pytest.mark.parametrize("impl", ["GatedDeltaNet", "Mamba2"])
def test_long_decay_init(impl):
    """decay_init="long": the heads start with half-lives log-spaced from 64 to 4096 tokens (checked from the
    gate formula in float64), every other parameter as the official init and o_proj = 0 (the student
    still starts as the sinks + window model). Negative control: the official init is nowhere near."""
    cfg, sd, _ = tiny_model("qwen2", impl)
    base, _ = split_ahn(sd)
    c = parse_config(cfg, "tiny")
    H = c.num_heads
    assert H >= 2
    long_m = TrainModel(c, base, base_dtype=torch.float32, seed=1, implementation=impl, decay_init="long")
    official = TrainModel(c, base, base_dtype=torch.float32, seed=1, implementation=impl)
    want = torch.logspace(math.log10(64), math.log10(4096), H, dtype=F64)
    for a, b in zip(long_m.ahn, official.ahn):
        assert torch.allclose(start_half_lives(a), want, rtol=1e-5), start_half_lives(a)
        assert not torch.allclose(start_half_lives(b), want, rtol=0.5)
        for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q) == (name != "dt_bias"), name
    ids = ids_for(60, 3)
    got = student_logits(long_m, ids[None], [(9, 4)])[0]
    assert (got - runtime_logits(cfg, sd, ids, "swa", 9, 4)).abs().max().item() < MODEL


def test_long_decay_init_refusals():
    cfg, sd, _ = tiny_model("qwen2", "DeltaNet")
    base, ahn = split_ahn(sd)
    c = parse_config(cfg, "tiny")
    with pytest.raises(AhnError, match="no decay gate"):
        TrainModel(c, base, base_dtype=torch.float32, implementation="DeltaNet", decay_init="long")
    with pytest.raises(AhnError, match="fresh memory"):
        TrainModel(c, base, ahn, base_dtype=torch.float32, implementation="DeltaNet", decay_init="long")
    with pytest.raises(AhnError, match="'official' or 'long'"):
        TrainModel(c, base, base_dtype=torch.float32, decay_init="short")


def test_train_cli_decay_init(tmp_path, capsys):
    """--decay-init long: the run starts with the long half-lives (its saved resume state at step 0 shows
    them), the setting is part of the run (recorded, kept on resume); with DeltaNet or a given start it is
    refused in one line with exit 2 and no output folder."""
    import json
    from ahn_rt.train.checkpoint import load_resume
    _, train = cli_setup(tmp_path, capsys)
    out = tmp_path / "long"
    rc, err = train("--out", out, "--steps", 2, "--stop-after", 1, "--decay-init", "long", "--lr", "1e-12")
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["run"]["decay_init"] == "long", run
    _, ahn, _ = load_resume(out / "resume")
    H = CLI_CFG["num_attention_heads"]
    want = torch.logspace(math.log10(64), math.log10(4096), H, dtype=F64)
    for n in range(CLI_CFG["num_hidden_layers"]):
        layer = make_layer("GatedDeltaNet", 32, H, 8)
        layer.load_state_dict({k.split(".ahn.fn.")[1]: v for k, v in ahn.items() if f"layers.{n}." in k})
        assert torch.allclose(start_half_lives(layer), want, rtol=1e-5)   # lr 1e-12: still the starting gates
    rc, err = train("--out", out, "--resume", "--lr", "1e-12", "--decay-init", "official")
    assert rc == 2 and "--decay-init official differs" in err, err
    rc, err = train("--out", out, "--resume", "--lr", "1e-12")
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["run"]["decay_init"] == "long"
    for flags, msg in ((["--ahn", "dn"], "no decay gate"),
                       (["--init-ahn", out / "model.safetensors"], "fresh memory")):
        bad = tmp_path / "bad"
        rc, err = train("--out", bad, "--steps", 1, "--decay-init", "long", *flags)
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
        assert not bad.exists()
