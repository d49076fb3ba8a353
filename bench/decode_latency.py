"""Decode (tg) and prefill (pp) latency of ahn_rt next to the physical floor and its peers, in the style
of llama-bench: a header that names the machine, one row per (implementation, context), a markdown table
for people and --json for machines. Columns and recorded results: bench/README.md.

    python bench/decode_latency.py --preset qwen2.5-3b --json tg.json     # ~2 min on an H200, under 6 on an H100
    python bench/decode_latency.py --quick                                 # smoke: 1k and 32k, few steps
    python bench/decode_latency.py --device cpu --preset tiny --contexts 64,128 --steps 3   # CPU path

Decode rows never prefill: ``State.fill_random`` stands the session at the depth with random valid values
(K/V in the occupied slots, gates, the memory, the position), which costs exactly what a real context of
that depth costs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

import ahn_rt  # noqa: E402
import ahn_rt.graph  # noqa: E402
from ahn_rt import ops  # noqa: E402
from ahn_rt.config import AHN_NORM_EPS, param_count, parse_dtype  # noqa: E402
from ahn_rt.init_weights import preset_config, random_state_dict  # noqa: E402
from ahn_rt.runtime import from_state_dict  # noqa: E402
from ahn_rt.sampling import Sampler, SamplingParams  # noqa: E402

GiB = 1 << 30
TOKEN = 11  # the token fed at every decode step (any id works: cost does not depend on it)


# ==============================================================================================
# Timing
# ==============================================================================================
def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def per_call_ms(fn, n: int, dev: torch.device) -> list[float]:
    """Time n calls of fn one by one: CUDA events around each call on the GPU (fn may sync inside,
    e.g. to read a token), perf_counter elsewhere. Returns milliseconds per call."""
    if dev.type == "cuda":
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in evs:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(dev)
        return [a.elapsed_time(b) for a, b in evs]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def back_to_back_ms(fn, n: int, dev: torch.device) -> float:
    """Mean milliseconds per call of n calls issued with no host sync between them."""
    sync(dev)
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        torch.cuda.synchronize(dev)
        return a.elapsed_time(b) / n
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) * 1e3 / n


def summary(ms: list[float]) -> dict:
    """Median and spread (half the interquartile range, robust to the odd slow step)."""
    ms = sorted(ms)
    med = statistics.median(ms)
    if len(ms) >= 4:
        q = statistics.quantiles(ms, n=4)
        spread = (q[2] - q[0]) / 2
    else:
        spread = (ms[-1] - ms[0]) / 2
    return dict(ms=med, spread_ms=spread, min_ms=ms[0], max_ms=ms[-1],
                std_ms=statistics.pstdev(ms), n=len(ms))


def free_memory(dev: torch.device):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / GiB if dev.type == "cuda" else None


# ==============================================================================================
# The machine
# ==============================================================================================
def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def driver_version() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def copy_bandwidth(dev: torch.device, nbytes: int, iters: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read + written (median of iters)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = statistics.median(per_call_ms(lambda: dst.copy_(src), iters, dev))
    del src, dst
    return 2 * nbytes / (ms / 1e3)


def matmul_flops(dev: torch.device, n: int, dtype: torch.dtype, iters: int) -> float:
    """FLOP/s of an n^3 matrix product (median of iters), on inputs rotated so none sits in L2."""
    xs = [torch.randn(n, n, device=dev, dtype=dtype) for _ in range(3)]
    for i in range(3):
        xs[i] @ xs[(i + 1) % 3]
    turn = itertools.count()

    def mm():
        i = next(turn) % 3
        xs[i] @ xs[(i + 1) % 3]

    ms = statistics.median(per_call_ms(mm, iters, dev))
    del xs
    return 2 * n ** 3 / (ms / 1e3)


def header(args, dev: torch.device) -> dict:
    h = dict(torch=torch.__version__, commit=args.commit or git_commit(), device=str(dev), dtype=args.dtype,
             ahn_rt_backend=ops.backend(), graphs=ahn_rt.graph.GRAPHS_ENABLED,
             date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command="python bench/decode_latency.py " + shlex.join(args.argv))
    try:
        import transformers
        h["transformers"] = transformers.__version__
    except ImportError:
        h["transformers"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        h.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / GiB, 1), sms=p.multi_processor_count,
                 driver=driver_version(), cuda=torch.version.cuda)
        bw_bytes, bw_iters, mm_n, mm_iters, mm_dtype = GiB, 50, 8192, 20, torch.bfloat16
    else:
        h.update(gpu=None, cpu=os.cpu_count(), driver=None, cuda=None)
        bw_bytes, bw_iters, mm_n, mm_iters, mm_dtype = 256 << 20, 5, 1024, 5, torch.float32
    h["copy_bytes"] = bw_bytes
    h["copy_GBps"] = copy_bandwidth(dev, bw_bytes, bw_iters) / 1e9
    h["matmul"] = f"{mm_n}^3 {str(mm_dtype).replace('torch.', '')}"
    h["matmul_TFLOPs"] = matmul_flops(dev, mm_n, mm_dtype, mm_iters) / 1e12
    free_memory(dev)
    return h


# ==============================================================================================
# The floor (bench/README.md, "What is measured"): bytes that must cross memory once per decoded token
# ==============================================================================================
def weight_bytes(c, elem: int) -> int:
    """All base weights, the (tied) LM head read once in full; biases and Qwen3 q/k norms included."""
    n = param_count(c)
    if c.attention_bias:
        n += c.num_layers * (c.q_size + 2 * c.kv_size)
    if c.qk_norm:
        n += c.num_layers * 2 * c.head_dim
    return n * elem


def ahn_weight_bytes(c, elem: int) -> int:
    """Per layer: a/b/g projections [H, d], grouped o_proj [H, D, D], o_norm [D], A_log/D/dt_bias [H]."""
    H, D, d = c.num_heads, c.head_dim, c.hidden_size
    return c.num_layers * (3 * H * d + H * D * D + D + 3 * H) * elem


def floor_terms(c, ctx: int, mode: str, elem: int) -> dict:
    """The bytes one decode step at depth ctx must move, term by term: all base weights, the K/V the step
    attends (ctx keys with full attention, min(ctx, S + W) with sinks and window), and in ahn mode the AHN
    weights and, once a token leaves the window (ctx >= S + W), the float32 memory read and written."""
    L, Hkv, H, D = c.num_layers, c.num_kv_heads, c.num_heads, c.head_dim
    keys = ctx if mode == "full" else min(ctx, c.sinks + c.window)
    t = dict(weights=weight_bytes(c, elem), kv=keys * 2 * L * Hkv * D * elem)
    if mode == "ahn":
        t["ahn_weights"] = ahn_weight_bytes(c, elem)
        t["gdn_state"] = L * H * D * D * 4 * 2 if ctx >= c.sinks + c.window else 0
    t["total"] = sum(t.values())
    return t


def prefill_flops(c, n: int, mode: str) -> float:
    """FLOPs of a prompt of n tokens with last_only logits: 2 per matmul parameter per token (the LM
    head once, only the last position's logits are made), attention 4*H*D per attended key per layer, and in ahn mode the gate
    projections for every token plus one GDN step (~9*H*D^2) per evicted token per layer."""
    L, H, D, d = c.num_layers, c.num_heads, c.head_dim, c.hidden_size
    head = c.vocab_size * d
    dense = 2 * (param_count(c) - head) * n + 2 * head
    K = n if mode == "full" else c.sinks + c.window       # keys attended: c_t = min(t + 1, K)
    m = min(n, K)
    keys = m * (m + 1) // 2 + (n - m) * K
    flops = dense + 4 * H * D * keys * L
    if mode == "ahn":
        flops += 2 * 3 * H * d * n * L + 9 * H * D * D * max(0, n - (c.sinks + c.window)) * L
    return float(flops)


# ==============================================================================================
# ahn_rt rows
# ==============================================================================================
def parse_ctx(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)


def ctx_list(s: str) -> list[int]:
    return [parse_ctx(x) for x in s.split(",") if x.strip()]


def build_model(args, mode: str, dev: torch.device):
    """The model from --weights, or random weights of --preset made directly on the device."""
    dtype = parse_dtype(args.dtype)
    if args.weights:
        return ahn_rt.load(args.weights, ahn=args.ahn, window=args.window, sinks=args.sinks, mode=mode,
                           dtype=dtype, device=dev)
    cfg = preset_config(args.preset, ahn=True, dtype=dtype)
    sd = random_state_dict(cfg, seed=args.seed, dtype=dtype, device=dev)
    model = from_state_dict(cfg, sd, window=args.window, sinks=args.sinks, mode=mode, dtype=dtype, device=dev)
    del sd
    free_memory(dev)
    return model


def probe_kernels(dev: torch.device, dtype: torch.dtype) -> str | None:
    """None when ahn_rt's compiled decode ops run on this device, else why not (a CPU-only build of
    ahn_rt._C on a GPU machine, a build for another torch, a missing op)."""
    if not ops.ext_available():
        return f"ahn_rt._C is not importable ({ops._ext_error})"
    H, Hkv, C, D = 4, 2, 16, 32
    try:
        with torch.inference_mode():
            ops.rms_norm(torch.ones(1, D, device=dev, dtype=dtype), torch.ones(D, device=dev, dtype=dtype), 1e-6)
            kc = torch.randn(Hkv, C, D, device=dev, dtype=dtype)
            pos = torch.tensor([C - 1], dtype=torch.int64, device=dev)
            ops.swa_decode(torch.randn(H, D, device=dev, dtype=dtype), kc, kc.clone(), pos, 4, C - 4, D ** -0.5)
            q = torch.randn(H, D, device=dev, dtype=dtype)
            ops.gdn_decode(torch.zeros(H, D, D, device=dev), q, kc[:, 0], kc[:, 1], torch.rand(H, device=dev, dtype=dtype),
                           -torch.rand(H, device=dev), torch.randn(H, device=dev, dtype=dtype),
                           torch.ones(D, device=dev, dtype=dtype), torch.randn(H, D, D, device=dev, dtype=dtype),
                           torch.zeros(H, D, device=dev, dtype=dtype), pos, 4, C - 4, AHN_NORM_EPS)
        sync(dev)
    except Exception as e:  # noqa: BLE001 - any failure means: no usable kernels here
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
    return None


@contextlib.contextmanager
def reference_path():
    """The pure-torch reference ops, eager (the references read the position with .item(), so they
    cannot be captured in a CUDA graph)."""
    old = ahn_rt.graph.GRAPHS_ENABLED
    ahn_rt.graph.GRAPHS_ENABLED = False
    try:
        with ops.use_backend("ref"):
            yield
    finally:
        ahn_rt.graph.GRAPHS_ENABLED = old


def ahn_rt_decode_row(model, impl: str, ctx: int, steps: int, warmup: int, dev: torch.device,
                      ref: bool = False) -> dict:
    c = model.config
    free_memory(dev)
    # full mode: a cache sized to the run, so it never grows (and its buffers never move)
    sess = model.new_session(capacity=ctx + warmup + 2 * steps + 8 if c.mode == "full" else None)
    sess.state.fill_random(ctx)
    sampler = Sampler(SamplingParams(temperature=0), c.vocab_size, dev)
    tok = torch.tensor([TOKEN], dtype=torch.int64, device=dev)
    row = dict(kind="tg", ctx=ctx, impl=impl, mode=c.mode, steps=steps)
    with reference_path() if ref else contextlib.nullcontext():
        stepper = sess.stepper(sampler)
        graphed = stepper.graphed

        def step():
            int(stepper(tok))   # the one host sync per token that a streaming caller pays

        for _ in range(warmup):  # the first call runs eagerly and captures the graph
            step()
        row.update(summary(per_call_ms(step, steps, dev)))
        if graphed:
            row["replay_ms"] = back_to_back_ms(lambda: stepper(tok), steps, dev)
    row["peak_gib"] = peak_gib(dev)
    row["graph"] = graphed
    st = sess.state
    # the step ran on real values: the position moved by one per call and the memory stayed finite;
    # calls: warmup + steps timed one by one (+ steps back to back on the graph path)
    row["position_ok"] = st.position == ctx + warmup + steps * (2 if graphed else 1) == int(st.pos)
    if st.ahn:
        row["gdn_finite"] = bool(torch.isfinite(st.memory).all())
    row["note"] = "state filled randomly" + ("; reference ops, eager" if ref else "")
    if not row["position_ok"]:
        row["note"] += f"; CHECK FAILED: position {st.position} / device {int(st.pos)}"
    if row.get("gdn_finite") is False:
        row["note"] += "; CHECK FAILED: GDN memory not finite"
    del stepper, sess, sampler, st
    free_memory(dev)
    return row


def prefill_row(model, n: int, dev: torch.device, impl: str) -> dict:
    c = model.config
    free_memory(dev)
    g = torch.Generator(device="cpu").manual_seed(n)
    ids = torch.randint(0, c.vocab_size, (n,), generator=g).to(dev)
    sess = model.new_session()
    sync(dev)
    t = time.perf_counter()
    sess.forward(ids, last_only=True)
    sync(dev)
    s = time.perf_counter() - t
    flops = prefill_flops(c, n, c.mode)
    row = dict(kind="pp", n=n, impl=impl, mode=c.mode, s=s, tok_s=n / s, TFLOPs=flops / s / 1e12,
               flops=flops, chunk=sess.chunk_size, peak_gib=peak_gib(dev))
    del sess, ids
    free_memory(dev)
    return row


# ==============================================================================================
# The GDN memory step alone: ahn_rt.ops.gdn_decode over every layer, and fla when importable
# ==============================================================================================
def gdn_only_row(c, dev: torch.device, iters: int) -> dict:
    L, H, Hkv, D = c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim
    dt = c.dtype
    torch.manual_seed(0)
    state = torch.randn(L, H, D, D, device=dev) * 0.02
    o_proj = torch.randn(L, H, D, D, device=dev, dtype=dt) * D ** -0.5
    norm_w = torch.ones(L, D, device=dev, dtype=dt)
    q = torch.randn(L, H, D, device=dev, dtype=dt)
    k = torch.randn(L, Hkv, D, device=dev, dtype=dt)
    v = torch.randn(L, Hkv, D, device=dev, dtype=dt)
    beta = torch.rand(L, H, device=dev, dtype=dt)
    alpha = -torch.rand(L, H, device=dev) * 0.5
    z = torch.randn(L, H, device=dev, dtype=dt)
    out = torch.zeros(L, H, D, device=dev, dtype=dt)
    S, W = c.sinks, c.window
    pos = torch.full((1,), S + W, dtype=torch.int64, device=dev)   # past the window: the memory runs

    def all_layers():
        for i in range(L):
            ops.gdn_decode(state[i], q[i], k[i], v[i], beta[i], alpha[i], z[i], norm_w[i], o_proj[i], out[i],
                           pos, S, W, AHN_NORM_EPS)

    row = dict(kind="gdn", impl="ahn_rt gdn_decode", layers=L, shape=f"H={H} D={D} Hkv={Hkv}")
    if dev.type == "cuda":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                all_layers()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            all_layers()
        graph.replay()
        row["us"] = back_to_back_ms(graph.replay, iters, dev) * 1e3
        row["note"] = f"{L} layers in one CUDA graph, replayed back to back"
        del graph
    else:
        all_layers()
        row["us"] = back_to_back_ms(all_layers, iters, dev) * 1e3
        row["note"] = f"{L} layers, eager"
    free_memory(dev)
    return row


def fla_row(c, dev: torch.device, iters: int) -> dict:
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    L, H, D = c.num_layers, c.num_heads, c.head_dim
    dt = c.dtype
    q = torch.randn(L, 1, 1, H, D, device=dev, dtype=dt)
    k = torch.randn(L, 1, 1, H, D, device=dev, dtype=dt)
    v = torch.randn(L, 1, 1, H, D, device=dev, dtype=dt)
    g = -torch.rand(L, 1, 1, H, device=dev) * 0.5
    beta = torch.rand(L, 1, 1, H, device=dev, dtype=dt)
    state = torch.randn(L, 1, H, D, D, device=dev) * 0.02

    def all_layers():
        for i in range(L):
            fused_recurrent_gated_delta_rule(q[i], k[i], v[i], g=g[i], beta=beta[i], initial_state=state[i],
                                             output_final_state=True, use_qk_l2norm_in_kernel=True)

    for _ in range(3):
        all_layers()
    us = back_to_back_ms(all_layers, iters, dev) * 1e3
    return dict(kind="gdn", impl="fla fused_recurrent_gated_delta_rule", layers=L, us=us,
                shape=f"B=1 T=1 H={H} D={D}",
                note=f"{L} eager calls; the recurrence only (no output norm, gate or o_proj)")


# ==============================================================================================
# Hugging Face transformers peers (full attention, random weights at the same shape)
# ==============================================================================================
def hf_model(c, dev: torch.device):
    import transformers
    fam = "Qwen3" if c.family == "qwen3" else "Qwen2"
    Cfg, Model = getattr(transformers, fam + "Config"), getattr(transformers, fam + "ForCausalLM")
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
              num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.rms_norm_eps,
              max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
              rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, use_sliding_window=False)
    if c.family == "qwen3":
        kw.update(head_dim=c.head_dim, attention_bias=c.attention_bias)
    hc = Cfg(**kw)
    hc._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(c.dtype)
    try:
        with torch.device(dev):
            m = Model(hc)
    finally:
        torch.set_default_dtype(old)
    return m.to(dtype=c.dtype).eval(), hc


def _random_kv(c, ctx: int, dev: torch.device):
    return (torch.randn(1, c.num_kv_heads, ctx, c.head_dim, device=dev, dtype=c.dtype),
            torch.randn(1, c.num_kv_heads, ctx, c.head_dim, device=dev, dtype=c.dtype))


def hf_eager_row(m, hc, c, ctx: int, steps: int, warmup: int, dev: torch.device) -> dict:
    from transformers import DynamicCache
    free_memory(dev)
    with torch.no_grad(), warnings.catch_warnings():
        # past_key_values is the keyword that both transformers 5.17 and 5.24 take (5.24 warns)
        warnings.simplefilter("ignore", FutureWarning)
        cache = DynamicCache(config=hc)
        for i in range(c.num_layers):
            cache.update(*_random_kv(c, ctx, dev), i)
        tok = torch.tensor([[TOKEN]], device=dev)

        def step():
            out = m(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            int(out.logits[0, -1].argmax())

        for _ in range(warmup):
            step()
        row = dict(kind="tg", ctx=ctx, impl="HF eager (sdpa, DynamicCache)", mode="full", steps=steps,
                   **summary(per_call_ms(step, steps, dev)))
    row.update(peak_gib=peak_gib(dev), graph=False,
               note="DynamicCache filled with random K/V of the context length")
    del cache
    free_memory(dev)
    return row


def hf_compile_row(m, hc, c, ctx: int, steps: int, warmup: int, dev: torch.device) -> dict:
    from transformers import StaticCache
    free_memory(dev)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cache = StaticCache(config=hc, max_cache_len=ctx + warmup + steps + 8)
        for i in range(c.num_layers):   # fills slots [0, ctx) and sets the cache length to ctx
            cache.update(*_random_kv(c, ctx, dev), i)
        fwd = torch.compile(m, mode="reduce-overhead")
        tok = torch.tensor([[TOKEN]], device=dev)

        def step():
            torch.compiler.cudagraph_mark_step_begin()
            out = fwd(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            int(out.logits[0, -1].argmax())

        for _ in range(warmup):   # compiles, then records the CUDA graph
            step()
        compile_s = time.perf_counter() - t0
        row = dict(kind="tg", ctx=ctx, impl="HF StaticCache + torch.compile(reduce-overhead)", mode="full",
                   steps=steps, **summary(per_call_ms(step, steps, dev)))
    row.update(peak_gib=peak_gib(dev), graph=True, compile_s=compile_s,
               note=f"StaticCache of {ctx + warmup + steps + 8} slots filled randomly to ctx "
                    f"(attends the whole cache, masked); compile + warm-up {compile_s:.0f} s")
    del cache, fwd
    torch.compiler.reset()
    free_memory(dev)
    return row


# ==============================================================================================
# Run
# ==============================================================================================
@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    dev: torch.device
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    rows: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    failed: list = dataclasses.field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def budget_ok(self, what: str, need_s: float = 0.0) -> bool:
        left = self.args.budget_s - self.elapsed()
        if left < need_s or left <= 0:
            self.skip(what, f"time budget: {max(left, 0):.0f} s of --budget-s {self.args.budget_s:.0f} left, "
                            f"the row needs ~{need_s:.0f} s")
            return False
        return True

    def skip(self, what: str, why: str):
        self.skipped.append(dict(what=what, why=why))
        log(f"skipped {what}: {why}")

    def attempt(self, what: str, fn):
        """Run one row; an exception becomes a 'failed' entry instead of ending the benchmark."""
        t = time.perf_counter()
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 - report any failure of a row and go on
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            self.failed.append(dict(what=what, error=msg))
            log(f"FAILED {what}: {msg}")
            free_memory(self.dev)
            return None
        row["wall_s"] = time.perf_counter() - t
        self.rows.append(row)
        log(f"{what}: " + (f"{row['ms']:.3f} ms/token" if "ms" in row else
                           f"{row['s']:.3f} s" if "s" in row else f"{row['us']:.1f} us"))
        return row


def log(msg: str):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def fits(dev: torch.device, need: int) -> bool:
    if dev.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(dev)
    return need < free


def kv_bytes(c, tokens: int) -> int:
    return tokens * 2 * c.num_layers * c.num_kv_heads * c.head_dim * c.dtype.itemsize


def run(args, dev: torch.device) -> dict:
    r = Run(args, dev)
    cuda = dev.type == "cuda"
    torch.manual_seed(args.seed)
    log("measuring copy bandwidth and matmul throughput")
    hdr = header(args, dev)
    log(f"copy {hdr['copy_GBps']:.0f} GB/s, matmul {hdr['matmul_TFLOPs']:.1f} TFLOP/s")

    # ---- ahn_rt, ahn mode: the CUDA-graph stepper, then the GDN op alone, prefill, references ----
    log("building the ahn model" + ("" if args.weights else f" (random {args.preset} weights on {dev})"))
    model = None
    no_kernels = None
    try:
        model = build_model(args, "ahn", dev)
    except Exception as e:  # noqa: BLE001 - e.g. --weights without AHN weights
        r.failed.append(dict(what="build ahn_rt ahn model", error=f"{type(e).__name__}: {e}"[:300]))
        log(f"FAILED building the ahn model: {e}")
    c = model.config if model is not None else None
    if model is not None:
        hdr["model"] = dict(family=c.family, layers=c.num_layers, hidden=c.hidden_size, heads=c.num_heads,
                            kv_heads=c.num_kv_heads, head_dim=c.head_dim, vocab=c.vocab_size,
                            params=param_count(c), window=c.window, sinks=c.sinks,
                            dtype=str(c.dtype).replace("torch.", ""), source=args.weights or f"random {args.preset}")
        no_kernels = probe_kernels(dev, c.dtype)
        hdr["kernels"] = "yes" if no_kernels is None else f"NO — {no_kernels}"
        if no_kernels:
            log(f"no compiled ahn_rt kernels on {dev}: {no_kernels}")
            no_kernels = (f"no compiled ahn_rt kernels on {dev} ({no_kernels}); build them with "
                          "`pip install --no-build-isolation -e .` (the reference-ops rows still run)")
        elem = c.dtype.itemsize
        hdr["floor"] = {str(ctx): {m: floor_terms(c, ctx, m, elem) for m in ("ahn", "full")}
                        for ctx in args.ctx}
        for ctx in args.ctx:
            if no_kernels:
                r.skip(f"ahn_rt ahn tg @ d{ctx}", no_kernels)
                continue
            r.attempt(f"ahn_rt ahn tg @ d{ctx}",
                      lambda: ahn_rt_decode_row(model, "ahn_rt ahn (CUDA graph)" if cuda else "ahn_rt ahn (eager)",
                                                ctx, args.steps, args.warmup, dev))
        if "gdn" in args.skip:
            r.skip("GDN-only", "--skip gdn")
        else:
            if no_kernels:
                r.skip("GDN-only ahn_rt", no_kernels)
            else:
                r.attempt("GDN-only ahn_rt", lambda: gdn_only_row(c, dev, args.gdn_iters))
            if "fla" in args.skip:
                r.skip("fla GDN", "--skip fla")
            elif not cuda:
                r.skip("fla GDN", "needs CUDA (Triton)")
            else:
                try:
                    import fla.ops.gated_delta_rule  # noqa: F401
                except Exception as e:  # noqa: BLE001
                    r.skip("fla fused_recurrent_gated_delta_rule", f"fla not importable ({type(e).__name__}: {e})"[:200])
                else:
                    r.attempt("GDN-only fla", lambda: fla_row(c, dev, args.gdn_iters))
        if args.prefill and "prefill" not in args.skip:
            # one untimed short prompt first, so the first pp row does not pay one-time set-up
            with ops.use_backend("ref") if no_kernels else contextlib.nullcontext():
                r.attempt("prefill warm-up (untimed, not a row)", lambda: prefill_row(model, 512, dev, "warm-up"))
            r.rows = [x for x in r.rows if x.get("impl") != "warm-up"]
        for i, n in enumerate(args.prefill):
            what = f"ahn_rt ahn pp{n}"
            if "prefill" in args.skip:
                r.skip(what, "--skip prefill")
            elif i == 0 or r.budget_ok(what, 30):
                if no_kernels:   # the prefill path calls rms_norm through the extension too
                    with ops.use_backend("ref"):
                        r.attempt(what, lambda: prefill_row(model, n, dev, "ahn_rt ahn (reference ops)"))
                else:
                    r.attempt(what, lambda: prefill_row(model, n, dev, "ahn_rt ahn"))
        if "ref" in args.skip:
            r.skip("ahn_rt reference ops", "--skip ref")
        else:
            for ctx in args.ref_ctx:
                what = f"ahn_rt ref tg @ d{ctx}"
                if r.budget_ok(what, 20):
                    r.attempt(what, lambda: ahn_rt_decode_row(model, "ahn_rt ahn, reference ops (eager)", ctx,
                                                              args.ref_steps, 1, dev, ref=True))
        del model
        free_memory(dev)

    # ---- ahn_rt, full mode: plain causal attention over a growing cache (the crossover) ----
    if c is not None and no_kernels and "full" not in args.skip:
        r.skip("ahn_rt full mode", no_kernels)
    elif c is not None and "full" not in args.skip and r.budget_ok("ahn_rt full mode", 20):
        log("building the full-attention model")
        try:
            full = build_model(args, "full", dev)
        except Exception as e:  # noqa: BLE001
            r.failed.append(dict(what="build ahn_rt full model", error=f"{type(e).__name__}: {e}"[:300]))
            full = None
        for ctx in args.ctx if full is not None else []:
            what = f"ahn_rt full tg @ d{ctx}"
            need = kv_bytes(c, ctx + args.warmup + 2 * args.steps + 8) + GiB
            if not fits(dev, need):
                r.skip(what, f"needs ~{need / GiB:.1f} GiB free for the cache")
            elif r.budget_ok(what, 5):
                r.attempt(what, lambda: ahn_rt_decode_row(full, "ahn_rt full (CUDA graph)" if cuda else
                                                          "ahn_rt full (eager)", ctx, args.steps, args.warmup, dev))
        del full
        free_memory(dev)
    elif "full" in args.skip:
        r.skip("ahn_rt full mode", "--skip full")

    # ---- Hugging Face transformers ----
    want_hf = c is not None and "hf" not in args.skip
    want_compile = c is not None and args.hf_compile and "hf-compile" not in args.skip
    if not want_hf:
        r.skip("HF transformers eager", "--skip hf" if c is not None else "no model")
    if not want_compile:
        r.skip("HF StaticCache + torch.compile", "--no-hf-compile / --skip hf-compile")
    elif not cuda:
        r.skip("HF StaticCache + torch.compile", "needs CUDA (reduce-overhead = CUDA graphs)")
        want_compile = False
    if want_hf or want_compile:
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            r.skip("HF transformers (all rows)", f"transformers not installed ({e})")
            want_hf = want_compile = False
    if (want_hf or want_compile) and r.budget_ok("HF transformers", 15):
        log("building the HF model")
        try:
            hm, hc = hf_model(c, dev)
        except Exception as e:  # noqa: BLE001
            r.failed.append(dict(what="build HF model", error=f"{type(e).__name__}: {e}"[:300]))
            hm = hc = None
        if hm is not None:
            for ctx in args.hf_ctx if want_hf else []:
                what = f"HF eager tg @ d{ctx}"
                need = 2 * kv_bytes(c, ctx + args.hf_steps + args.warmup) + 2 * GiB
                if not fits(dev, need):
                    r.skip(what, f"needs ~{need / GiB:.1f} GiB free")
                elif r.budget_ok(what, 10):
                    r.attempt(what, lambda: hf_eager_row(hm, hc, c, ctx, args.hf_steps, min(args.warmup, 3), dev))
            for ctx in args.hf_compile_ctx if want_compile else []:
                what = f"HF compile tg @ d{ctx}"
                need = 2 * kv_bytes(c, ctx + args.steps + args.warmup) + 4 * GiB
                if not fits(dev, need):
                    r.skip(what, f"needs ~{need / GiB:.1f} GiB free")
                elif r.budget_ok(what, args.compile_need_s):
                    r.attempt(what, lambda: hf_compile_row(hm, hc, c, ctx, args.steps, max(args.warmup, 4), dev))
        del hm
        free_memory(dev)

    # ---- share of the GDN step in a token ----
    gdn = next((x for x in r.rows if x["kind"] == "gdn" and x["impl"].startswith("ahn_rt")), None)
    deep = [x for x in r.rows if x["kind"] == "tg" and x["impl"].startswith("ahn_rt ahn")
            and "reference" not in x["impl"] and c is not None and x["ctx"] >= c.sinks + c.window]
    if gdn and deep:
        t = deep[0].get("replay_ms", deep[0]["ms"])
        gdn["share"] = gdn["us"] / 1e3 / t
        gdn["share_of"] = f"tg @ d{deep[0]['ctx']} ({'replay' if 'replay_ms' in deep[0] else 'ms/token'} {t:.3f} ms)"

    # ---- derived columns ----
    bw = hdr["copy_GBps"] * 1e9
    for x in r.rows:
        if x["kind"] == "tg":
            fb = floor_terms(c, x["ctx"], x["mode"], c.dtype.itemsize)["total"]
            x["tok_s"] = 1e3 / x["ms"]
            x["floor_bytes"] = fb
            x["floor_ms"] = fb / bw * 1e3
            x["GBps"] = fb / (x["ms"] / 1e3) / 1e9
            x["pct_floor"] = 100 * x["floor_ms"] / x["ms"]
        elif x["kind"] == "pp":
            x["pct_matmul"] = 100 * x["TFLOPs"] / hdr["matmul_TFLOPs"]
    return dict(header=hdr, rows=r.rows, skipped=r.skipped, failed=r.failed, elapsed_s=r.elapsed(),
                budget_s=args.budget_s)


# ==============================================================================================
# Output
# ==============================================================================================
def _f(x, fmt="{:.2f}", none="—"):
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def markdown(res: dict) -> str:
    h = res["header"]
    out = ["## decode_latency", ""]
    if h.get("gpu"):
        out.append(f"- GPU: {h['gpu']} ({h['gpu_memory_gib']} GiB, {h['sms']} SMs), driver {h['driver']}, "
                   f"CUDA {h['cuda']}")
    else:
        out.append(f"- device: {h['device']} ({h['cpu']} CPUs)")
    out.append(f"- torch {h['torch']}, transformers {h['transformers'] or 'not installed'}, commit {h['commit']}, "
               f"ahn_rt backend {h['ahn_rt_backend']}, {h['date']}")
    out.append(f"- measured: copy {h['copy_GBps']:.0f} GB/s ({h['copy_bytes'] / GiB:g} GiB device-to-device, "
               f"read + write, median); matmul {h['matmul']} {h['matmul_TFLOPs']:.1f} TFLOP/s (median)")
    if h.get("kernels"):
        out.append(f"- ahn_rt compiled kernels on {h['device']}: {h['kernels']}")
    out.append(f"- command: `{h['command']}`")
    if "model" in h:
        m = h["model"]
        out.append(f"- model: {m['source']}, {m['family']} {m['layers']} layers, hidden {m['hidden']}, "
                   f"{m['heads']}/{m['kv_heads']} heads × {m['head_dim']}, vocab {m['vocab']}, "
                   f"{m['params'] / 1e9:.3f} B params, {m['dtype']}, W={m['window']} S={m['sinks']}")
        bw = h["copy_GBps"] * 1e9
        out += ["", "Floor per token (bytes that must cross memory once / measured copy bandwidth):", "",
                "| context | ahn bytes | ahn floor ms | full-attention bytes | full floor ms |",
                "|---|---:|---:|---:|---:|"]
        for ctx, f in h["floor"].items():
            a, fu = f["ahn"]["total"], f["full"]["total"]
            out.append(f"| {ctx} | {a / 1e9:.3f} GB | {a / bw * 1e3:.3f} | {fu / 1e9:.3f} GB | {fu / bw * 1e3:.3f} |")

    tg = [x for x in res["rows"] if x["kind"] == "tg"]
    if tg:
        out += ["", "| test | implementation | ms/token | replay ms | tok/s | GB/s | % of floor | floor ms | "
                "peak GiB | note |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for x in tg:
            out.append(f"| tg @ d{x['ctx']} | {x['impl']} | {x['ms']:.3f} ± {x['spread_ms']:.3f} | "
                       f"{_f(x.get('replay_ms'), '{:.3f}')} | {x['tok_s']:.1f} | {x['GBps']:.0f} | "
                       f"{x['pct_floor']:.1f} | {x['floor_ms']:.3f} | {_f(x['peak_gib'])} | {x['note']} |")
    pp = [x for x in res["rows"] if x["kind"] == "pp"]
    if pp:
        out += ["", "| test | implementation | s | tok/s | TFLOP/s | % of matmul | peak GiB |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for x in pp:
            out.append(f"| pp{x['n']} | {x['impl']} | {x['s']:.3f} | {x['tok_s']:.0f} | {x['TFLOPs']:.2f} | "
                       f"{x['pct_matmul']:.1f} | {_f(x['peak_gib'])} |")
    gd = [x for x in res["rows"] if x["kind"] == "gdn"]
    if gd:
        out += ["", "| GDN step | shape | µs per token (all layers) | share of token | note |",
                "|---|---|---:|---:|---|"]
        for x in gd:
            share = f"{100 * x['share']:.1f}% of {x['share_of']}" if "share" in x else "—"
            out.append(f"| {x['impl']} | {x['layers']} × {x['shape']} | {x['us']:.1f} | {share} | {x['note']} |")
    if res["skipped"] or res["failed"]:
        out += ["", "Skipped / failed:", ""]
        out += [f"- skipped {s['what']}: {s['why']}" for s in res["skipped"]]
        out += [f"- FAILED {s['what']}: {s['error']}" for s in res["failed"]]
    out += ["", f"elapsed {res['elapsed_s']:.0f} s (budget {res['budget_s']:.0f} s)"]
    return "\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python bench/decode_latency.py", description=__doc__.split("\n\n")[0])
    src = ap.add_argument_group("model")
    src.add_argument("--preset", default="qwen2.5-3b", help="random weights of this shape (default qwen2.5-3b)")
    src.add_argument("--weights", help="a real checkpoint instead (file or folder; ahn_rt.load)")
    src.add_argument("--ahn", help="a separate AHN checkpoint for --weights")
    src.add_argument("--window", type=int, default=32640)
    src.add_argument("--sinks", type=int, default=128)
    src.add_argument("--dtype", default="bf16")
    src.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke path: no graphs, no peaks)")
    src.add_argument("--seed", type=int, default=0)
    rows = ap.add_argument_group("rows")
    rows.add_argument("--contexts", help="decode depths, e.g. 1k,8k,32k (default 1k,8k,32k,64k,128k "
                                         "+256k when the card has >= 40 GiB)")
    rows.add_argument("--max-context", type=parse_ctx,
                      help="add powers of two past 128k up to this depth (e.g. 256k)")
    rows.add_argument("--steps", type=int, default=64, help="timed decode steps per row (default 64)")
    rows.add_argument("--warmup", type=int, default=8, help="untimed steps first; the first captures the graph")
    rows.add_argument("--prefill", default="2k,32k", help="prompt lengths for pp rows (default 2k,32k)")
    rows.add_argument("--prefill-long", action="store_true", help="also pp131072 (the prefill path is slow today)")
    rows.add_argument("--ref-contexts", default="1k,32k", help="depths for the reference-ops row (default 1k,32k)")
    rows.add_argument("--ref-steps", type=int, default=4)
    rows.add_argument("--hf-contexts", default="1k,32k,128k", help="depths for HF eager (default 1k,32k,128k)")
    rows.add_argument("--hf-steps", type=int, default=16)
    rows.add_argument("--hf-compile", action=argparse.BooleanOptionalAction, default=None,
                      help="HF StaticCache + torch.compile rows (default on, off with --quick)")
    rows.add_argument("--hf-compile-contexts", default="4k,32k")
    rows.add_argument("--compile-need-s", type=float, default=60,
                      help="skip a compile row when less than this much budget is left (default 60)")
    rows.add_argument("--gdn-iters", type=int, default=200)
    rows.add_argument("--skip", default="", help="comma list of: full,ref,hf,hf-compile,fla,gdn,prefill")
    ap.add_argument("--budget-s", type=float, default=420,
                    help="after this many seconds the remaining optional rows are skipped (default 420)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1k and 32k, few steps, no compile")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--commit", help="the commit to print when the run has no git checkout (a copied tree)")
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    bad = a.skip - {"full", "ref", "hf", "hf-compile", "fla", "gdn", "prefill"}
    if bad:
        ap.error(f"--skip: unknown {', '.join(sorted(bad))}")
    if a.quick:
        a.contexts = a.contexts or "1k,32k"
        a.steps, a.warmup = min(a.steps, 16), min(a.warmup, 3)
        a.prefill = "2k" if a.prefill == "2k,32k" else a.prefill
        a.ref_contexts = "1k" if a.ref_contexts == "1k,32k" else a.ref_contexts
        a.ref_steps, a.hf_steps, a.gdn_iters = min(a.ref_steps, 2), min(a.hf_steps, 4), min(a.gdn_iters, 50)
        a.hf_contexts = "1k" if a.hf_contexts == "1k,32k,128k" else a.hf_contexts
        a.hf_compile = bool(a.hf_compile)
    elif a.hf_compile is None:
        a.hf_compile = True
    if min(a.steps, a.ref_steps, a.hf_steps, a.gdn_iters) < 1 or a.warmup < 1:
        ap.error("--steps, --ref-steps, --hf-steps, --gdn-iters and --warmup must be >= 1")
    try:
        a.ctx = ctx_list(a.contexts) if a.contexts else None
        a.prefill = ctx_list(a.prefill) + ([131072] if a.prefill_long else [])
        a.ref_ctx, a.hf_ctx = ctx_list(a.ref_contexts), ctx_list(a.hf_contexts)
        a.hf_compile_ctx = ctx_list(a.hf_compile_contexts)
    except ValueError as e:
        ap.error(f"bad context list ({e}); use e.g. 1k,32k or 1024,32768")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        print(f"decode_latency: unknown device {args.device!r}; use cuda or cpu", file=sys.stderr)
        return 2
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"decode_latency: needs a CUDA GPU (torch {torch.__version__} sees none). "
              "For the CPU smoke path: --device cpu --preset tiny --contexts 64,128 --steps 3", file=sys.stderr)
        return 2
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if args.ctx is None:
        args.ctx = ctx_list("1k,8k,32k,64k,128k")
        if dev.type == "cuda" and torch.cuda.get_device_properties(dev).total_memory >= 40 * GiB:
            args.ctx.append(262144)
    if dev.type == "cpu":   # the smoke path: peers at the given depths, short prompts, unless asked
        given = {a.split("=", 1)[0] for a in args.argv}
        small = sorted({min(args.ctx), max(args.ctx)})
        if "--ref-contexts" not in given:
            args.ref_ctx = small
        if "--hf-contexts" not in given:
            args.hf_ctx = small
        if "--prefill" not in given:
            args.prefill = [256] + ([131072] if args.prefill_long else [])
    if args.max_context:
        nxt = max(args.ctx) * 2
        while nxt <= args.max_context:
            args.ctx.append(nxt)
            nxt *= 2
    res = run(args, dev)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        log(f"wrote {args.json}")
    print(markdown(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
