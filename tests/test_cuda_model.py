"""The whole model on the GPU (bf16 and float32, compiled kernels, CUDA graphs) against the float32 CPU path,
across the window-fill point and after many evictions; the dtype x GQA x mode matrix for prefill and decode;
graph replay against eager steps (bit-exact). Run with `pytest -m cuda` on a GPU machine (skipped elsewhere)."""
import pytest
import torch

import ahn_rt
from ahn_rt.init_weights import random_state_dict
from ahn_rt.runtime import from_state_dict
from ahn_rt.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.cuda

# ---- tolerance table (relative error ||a - b|| / ||b|| over all logits compared) -----------------------
# bf16 on the GPU vs float32 on the CPU: the budget is calibrated by the CPU bf16 run of the same model
# (C++ kernels, same rounding points), so a GPU kernel bug cannot hide in bf16 noise:
#   err_gpu < BF16_FACTOR * err_cpu_bf16 + BF16_SLACK and err_gpu < BF16_MAX,
#   top-1 agreement with float32 > min(CPU bf16 agreement, TOP1_FLOOR) - TOP1_SLACK.
# (CPU bf16 errors are O(1e-2): BF16_FACTOR leaves 25% for other accumulation orders, BF16_SLACK covers
# a near-zero calibration, BF16_MAX is the absolute ceiling; one top-1 flip in 20 is allowed.)
BF16_FACTOR, BF16_SLACK, BF16_MAX = 1.25, 2e-3, 5e-2
TOP1_FLOOR, TOP1_SLACK = 0.95, 0.05
# float32 on the GPU vs float32 on the CPU: both round in float32, in different orders; the CPU float32 path
# is within 1e-5 of the float64 oracle (test_ahn_rules), and test_ops bounds each float32 op at 1e-4.
# Not calibrated on a GPU here (written without one); a float32 path that silently computes in bf16 or
# TF32 (~1e-3) fails it.
FP32_REL = 1e-4
# Graph replay vs eager steps: the same kernels on the same inputs, so bit-exact (torch.equal), no tolerance.

CFG = dict(model_type="qwen2", hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
           num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=1000,
           tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=4096,
           _ahn_implementation="GatedDeltaNet", eos_token_id=[])
QWEN3 = dict(CFG, model_type="qwen3", head_dim=128, num_attention_heads=4, tie_word_embeddings=False,
             attention_bias=False)


def _models(cfg, mode, window, sinks, cpu_dtype="float32"):
    sd = random_state_dict(cfg, seed=0, dtype=torch.float32, ahn=True, std=0.05)
    cpu = from_state_dict(cfg, sd, window=window, sinks=sinks, mode=mode, dtype=cpu_dtype, device="cpu")
    gpu = from_state_dict(cfg, {k: v.cuda() for k, v in sd.items()}, window=window, sinks=sinks, mode=mode,
                          dtype="bf16", device="cuda")
    return cpu, gpu


def _run(model, ids, chunk=16):
    """Prefill 12 tokens, then the rest one by one (through the decode kernels)."""
    sess = model.new_session(chunk_size=chunk)
    out = [sess.forward(ids[:12])] + [sess.forward([int(t)]) for t in ids[12:]]
    return torch.cat(out).float().cpu()


def _rel(a, b):
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


@pytest.mark.parametrize("cfg", [CFG, QWEN3], ids=["qwen2-D64", "qwen3-D128"])
@pytest.mark.parametrize("mode,window,sinks", [("ahn", 24, 4), ("ahn", 17, 0), ("swa", 24, 4), ("full", 8, 0)],
                         ids=["ahn-W24-S4", "ahn-W17-S0", "swa", "full"])
def test_bf16_cuda_matches_fp32_cpu(cfg, mode, window, sinks, ceiling=BF16_MAX):
    """bf16 on the GPU is as close to float32 as bf16 on the CPU (C++ kernels) is: the error budget is
    calibrated by the CPU bf16 run of the same model, so a GPU kernel bug cannot hide in it."""
    cpu, gpu = _models(cfg, mode, window, sinks)
    cpu_bf16, _ = _models(cfg, mode, window, sinks, cpu_dtype="bf16")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (20 + 6 * (window + sinks),), generator=g)
    ref, lg, lb = _run(cpu, ids), _run(gpu, ids), _run(cpu_bf16, ids)
    err, err_cpu = _rel(lg, ref), _rel(lb, ref)
    agree = float((lg.argmax(-1) == ref.argmax(-1)).float().mean())
    agree_cpu = float((lb.argmax(-1) == ref.argmax(-1)).float().mean())
    print(f"GPU bf16: rel err {err:.3e}, top-1 {agree:.3f}; CPU bf16: rel err {err_cpu:.3e}, top-1 {agree_cpu:.3f}")
    assert err < BF16_FACTOR * err_cpu + BF16_SLACK and err < ceiling
    assert agree > min(agree_cpu, TOP1_FLOOR) - TOP1_SLACK


@pytest.mark.parametrize("impl", ["DeltaNet", "Mamba2"])
@pytest.mark.parametrize("cfg", [CFG, QWEN3], ids=["qwen2-D64", "qwen3-D128"])
def test_bf16_cuda_matches_fp32_cpu_variants(cfg, impl):
    """The other memory variants under the same calibrated bf16 budget (GatedDeltaNet: the test above).
    Mamba2's absolute ceiling is higher: its bf16 error is larger on the CPU too, with the reference ops
    as with the C++ kernels (qwen3-D128: 8.7e-2 and 8.5e-2 against float32; its q/k are normalized in
    bf16 and its norm spans every head), so the calibrated bound is what checks the GPU there."""
    ceiling = 0.12 if impl == "Mamba2" else BF16_MAX
    test_bf16_cuda_matches_fp32_cpu(dict(cfg, _ahn_implementation=impl), "ahn", 24, 4, ceiling=ceiling)


@pytest.mark.parametrize("impl", ["GatedDeltaNet", "DeltaNet", "Mamba2"])
@pytest.mark.parametrize("fork", ["0", "1"])
def test_graph_replay_equals_eager_steps(monkeypatch, fork, impl):
    """The graph replays the eager step's kernels: every step's logits, every sampled token and the whole
    state after the run are bit-identical to eager steps (greedy and seeded sampling). fork =
    AHN_RT_DECODE_FORK: with 1 the graph runs each memory step on a parallel branch and o_proj adds its
    term, the eager steps stay serial: still the same bits."""
    if fork == "0" and impl != "GatedDeltaNet":
        pytest.skip("the serial graph's kernels are the variants' own tests' (test_step)")
    monkeypatch.setenv("AHN_RT_DECODE_FORK", fork)
    _, gpu = _models(dict(CFG, _ahn_implementation=impl), "ahn", 24, 4)
    prompt = torch.randint(0, 1000, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    steps = 60                              # crosses S + W = 28 and keeps evicting

    def run(graphs: bool, params):
        monkeypatch.setattr("ahn_rt.graph.GRAPHS_ENABLED", graphs)
        sess = gpu.new_session()
        sampler = Sampler(params, 1000, "cuda")
        sampler.observe(torch.tensor(prompt, device="cuda"))
        tok = sampler.sample(sess.forward(prompt, last_only=True)[-1])
        step = sess.stepper(sampler)
        toks, logits = [int(tok)], []
        for _ in range(steps):
            tok = step(tok)
            assert tok.dtype == torch.int64 and tuple(tok.shape) == (1,) and tok.device.type == "cuda"
            assert step.logits.dtype == torch.float32 and tuple(step.logits.shape) == (1000,)
            logits.append(step.logits.clone())       # a static buffer on the graph path: overwritten
            toks.append(int(tok))
        return toks, torch.stack(logits), sess

    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_k=50, top_p=0.9,
                                                                  repetition_penalty=1.1, seed=3)):
        eager_toks, eager_logits, s1 = run(False, params)
        graph_toks, graph_logits, s2 = run(True, params)
        differ = [i for i in range(steps) if not torch.equal(eager_logits[i], graph_logits[i])]
        assert not differ, f"{params}: graph logits differ from eager at steps {differ}"
        assert eager_toks == graph_toks
        assert s1.position == s2.position == 30 + steps
        assert int(s1.state.pos) == s1.position and int(s2.state.pos) == s2.position
        assert s1.state.position == s2.state.position
        t1, t2 = s1.state.tensors(), s2.state.tensors()      # every field: k, v, beta, alpha, memory
        assert set(t1) == set(t2) and {"k", "v", "memory"} <= set(t1)
        for name in t1:
            assert torch.equal(t1[name], t2[name]), f"{params}: state field {name} differs between graph and eager"


def test_generate_reuses_graph_across_calls_and_full_mode_grows():
    _, gpu = _models(CFG, "full", 8, 0)
    sess = gpu.new_session()
    ids = list(range(1, 250))
    logits = sess.forward(ids, last_only=True)
    sampler = Sampler(SamplingParams(temperature=0), 1000, "cuda")
    step = sess.stepper(sampler)
    tok = sampler.sample(logits[-1])
    for _ in range(20):                     # capacity 256 -> 512: buffers move, graph is recaptured
        tok = step(tok)
    assert sess.state.capacity == 512 and sess.position == 249 + 20
    # the same tokens from a fresh eager session
    ref = gpu.new_session()
    lg = ref.forward(ids, last_only=True)
    toks = [int(lg[-1].argmax())]
    for _ in range(20):
        toks.append(int(ref.forward([toks[-1]])[-1].argmax()))
    assert toks[-1] == int(tok)


def test_a_graph_captured_before_a_prefill_grew_the_cache_is_not_replayed():
    """Full mode's cache also grows in a prefill (and a load), not only in the decode step that captured the
    graph: a short generate captured its step at 256 slots, a second generate on the same (reused) session
    with a prompt of 300 tokens grew the cache to 512 in its prefill, and the next step replayed the old graph
    into the freed buffers. Now the graph is captured again (State.layout): the tokens of eager steps."""
    _, gpu = _models(CFG, "full", 8, 0)
    sess = gpu.new_session()
    sampler = Sampler(SamplingParams(temperature=0), 1000, "cuda")
    step = sess.stepper(sampler)
    tok = sampler.sample(sess.forward(list(range(1, 20)), last_only=True)[-1])
    for _ in range(3):
        tok = step(tok)                     # captured at 256 slots
    captured = dict(sess.graphs)
    assert captured and sess.state.capacity == 256
    sess.reset()
    ids = list(range(1, 301))
    tok = sampler.sample(sess.forward(ids, last_only=True)[-1])   # the prefill grows the cache to 512
    assert sess.state.capacity == 512
    toks = [int(tok)]
    for _ in range(10):
        tok = step(tok)
        toks.append(int(tok))
    assert all(sess.graphs.get(k) is not g for k, g in captured.items())
    ref = gpu.new_session()
    want = [int(ref.forward(ids, last_only=True)[-1].argmax())]
    for _ in range(10):
        want.append(int(ref.forward([want[-1]])[-1].argmax()))
    assert toks == want


# ---- bug 1: "float32 on CUDA crashes in prefill for any GQA model (view size is not compatible with input
# tensor's size and stride)" -- the dtype x GQA x mode matrix, prefill and decode, against float32 on the CPU.
TINY = dict(model_type="qwen2", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512,
            tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=4096,
            _ahn_implementation="GatedDeltaNet", eos_token_id=[])
TINY_MHA = dict(TINY, num_key_value_heads=4)
M_WINDOW, M_SINKS, M_CHUNK = 24, 4, 16     # S + W = 28 falls inside the second chunk of 16
M_PROMPT, M_DECODE = 40, 24


def _tiny(cfg, sd, mode, dtype, device):
    return from_state_dict(cfg, {k: v.to(device) for k, v in sd.items()}, window=M_WINDOW, sinks=M_SINKS,
                           mode=mode, dtype=dtype, device=device)


def _prefill_decode(model, ids):
    """Logits [T, vocab] (float32, CPU) of: the prompt in one forward and one chunk (crossing S + W inside
    it); the prompt in one forward of chunks of 16 (crossing S + W inside the second); then single-token
    forwards (decode) after the chunked prefill."""
    one = model.new_session().forward(ids[:M_PROMPT])
    sess = model.new_session(chunk_size=M_CHUNK)
    chunked = sess.forward(ids[:M_PROMPT])
    decode = torch.cat([sess.forward([int(t)]) for t in ids[M_PROMPT:]])
    assert sess.position == M_PROMPT + M_DECODE
    return {"prefill one chunk": one.float().cpu(), "prefill chunks of 16": chunked.float().cpu(),
            "decode": decode.float().cpu()}


@pytest.mark.parametrize("mode", ["ahn", "swa", "full"])
@pytest.mark.parametrize("cfg", [TINY, TINY_MHA], ids=["gqa-4q-2kv", "mha-4q-4kv"])
@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_dtype_gqa_mode_matrix_matches_fp32_cpu(dtype, cfg, mode):
    sd = random_state_dict(cfg, seed=0, dtype=torch.float32, ahn=True, std=0.05)
    ids = torch.randint(0, cfg["vocab_size"], (M_PROMPT + M_DECODE,), generator=torch.Generator().manual_seed(5))
    ref = _prefill_decode(_tiny(cfg, sd, mode, "float32", "cpu"), ids)
    got = _prefill_decode(_tiny(cfg, sd, mode, dtype, "cuda"), ids)
    calib = _prefill_decode(_tiny(cfg, sd, mode, "bf16", "cpu"), ids) if dtype == "bf16" else None
    for part in ref:
        assert got[part].shape == ref[part].shape, f"{part}: shape {tuple(got[part].shape)}"
        assert bool(torch.isfinite(got[part]).all()), f"{part}: non-finite logits"
        err = _rel(got[part], ref[part])
        if dtype == "float32":
            print(f"{part}: GPU float32 rel err {err:.3e}")
            assert err <= FP32_REL, f"{part}: GPU float32 vs CPU float32 rel err {err:.3e} > {FP32_REL}"
        else:
            err_cpu = _rel(calib[part], ref[part])
            print(f"{part}: GPU bf16 rel err {err:.3e}, CPU bf16 {err_cpu:.3e}")
            assert err < BF16_FACTOR * err_cpu + BF16_SLACK and err < BF16_MAX, \
                f"{part}: GPU bf16 rel err {err:.3e} vs CPU bf16 {err_cpu:.3e}"
    if dtype == "bf16":
        r, g, c = (torch.cat(list(x.values())) for x in (ref, got, calib))
        agree = float((g.argmax(-1) == r.argmax(-1)).float().mean())
        agree_cpu = float((c.argmax(-1) == r.argmax(-1)).float().mean())
        assert agree > min(agree_cpu, TOP1_FLOOR) - TOP1_SLACK, (agree, agree_cpu)

