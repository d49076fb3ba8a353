"""ahn_rt's own rows: a decode step at a given depth (tg), a prompt (pp), the GDN memory step alone, the
same decode step on the pure-torch reference ops; and what they need (the model, a probe for compiled
kernels). Row keys: bench/README.md, "What is measured"."""
from __future__ import annotations

import contextlib
import time

import torch

import ahn_rt
import ahn_rt.graph
from ahn_rt import ops
from ahn_rt.config import AHN_NORM_EPS, parse_dtype
from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict
from ahn_rt.sampling import Sampler, SamplingParams
from floor import prefill_flops
from timing import back_to_back_ms, capture_graph, free_memory, peak_gib, per_call_ms, summary, sync

TOKEN = 11  # the token fed at every decode step (any id works: cost does not depend on it)


def build_model(args, mode: str, dev: torch.device):
    """The model from --weights, or random weights of --preset made directly on the device."""
    dtype = parse_dtype(args.dtype)
    if args.weights:
        return ahn_rt.load(args.weights, ahn=args.ahn, window=args.window, sinks=args.sinks, mode=mode,
                           dtype=dtype, device=dev)
    cfg = preset_config(args.preset, ahn=getattr(args, "ahn_impl", None) or True, dtype=dtype)
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


def decode_row(model, impl: str, ctx: int, steps: int, warmup: int, dev: torch.device,
               ref: bool = False) -> dict:
    """tg @ d{ctx}: no prefill — ``State.fill_random`` stands the session at depth ctx; then `warmup`
    untimed steps (on CUDA the first runs eagerly and captures the graph), `steps` steps timed one by
    one, each reading the token on the host, and on the graph path the same number of steps back to
    back (replay_ms). Checks afterwards that the position moved by one per step and the memory stayed
    finite."""
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

        def step():
            int(stepper(tok))   # the one host sync per token that a streaming caller pays

        for _ in range(warmup):
            step()
        row.update(summary(per_call_ms(step, steps, dev)))
        if stepper.graphed:
            row["replay_ms"] = back_to_back_ms(lambda: stepper(tok), steps, dev)
    row["peak_gib"] = peak_gib(dev)
    row["graph"] = stepper.graphed
    # every call is one step: warmup + steps timed one by one (+ steps back to back on the graph path)
    calls = warmup + steps * (2 if stepper.graphed else 1)
    _check_states(row, [sess.state], ctx + calls, "state filled randomly" + ("; reference ops, eager" if ref else ""))
    del stepper, sess, sampler
    free_memory(dev)
    return row


def _check_states(row: dict, states, want: int, note: str):
    """After a row's steps: every state stands at position ``want`` (host and device) and its memory is
    finite; a failed check is named in the row's note."""
    row["position_ok"] = all(st.position == want == int(st.pos) for st in states)
    if states[0].ahn:
        row["gdn_finite"] = all(bool(torch.isfinite(st.memory).all()) for st in states)
    row["note"] = note
    if not row["position_ok"]:
        got = sorted({(st.position, int(st.pos)) for st in states})
        row["note"] += f"; CHECK FAILED: positions (host, device) {got}, want {want}"
    if row.get("gdn_finite") is False:
        row["note"] += "; CHECK FAILED: GDN memory not finite"


def batch_row(model, impl: str, ctx: int, batch: int, steps: int, warmup: int, dev: torch.device) -> dict:
    """tg @ d{ctx} b{B}: B sessions in one state pool, each stood at depth ctx (``fill_random``), stepped
    together: one ``model.step(sessions, tokens)`` and the B greedy tokens read on the host per step,
    timed one step at a time. Checks that every position moved by one per step and the memories stayed
    finite."""
    c = model.config
    free_memory(dev)
    pool = model.new_pool(batch)
    sessions = [model.new_session(pool=pool) for _ in range(batch)]
    for s in sessions:
        s.state.fill_random(ctx)
    tok = torch.full((batch,), TOKEN, dtype=torch.int64, device=dev)

    def step():
        model.step(sessions, tok).argmax(-1).tolist()   # the host sync a serving loop pays

    for _ in range(warmup):
        step()
    row = dict(kind="tg", ctx=ctx, batch=batch, impl=impl, mode=c.mode, steps=steps)
    row.update(summary(per_call_ms(step, steps, dev)))
    row["peak_gib"] = peak_gib(dev)
    row["graph"] = dev.type == "cuda" and ahn_rt.graph.GRAPHS_ENABLED and model.decoder.graph_safe
    _check_states(row, [s.state for s in sessions], ctx + warmup + steps,
                  f"{batch} sessions from one pool, states filled randomly")
    for s in sessions:
        s.close()
    del sessions, pool
    free_memory(dev)
    return row


def prefill_row(model, n: int, dev: torch.device, impl: str) -> dict:
    """pp{n}: one ``forward(ids, last_only=True)`` of n random tokens from an empty session, wall time."""
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


def gdn_only_row(c, dev: torch.device, iters: int) -> dict:
    """The GDN memory step alone: ``ops.gdn_decode`` for every layer past the window (so the memory
    runs); on CUDA captured in one graph and replayed back to back, else eager."""
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
        graph = capture_graph(all_layers, warm=3)
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
