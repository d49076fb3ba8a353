"""The peers measured in the same process on the same card: Hugging Face transformers at the same shape
(random weights, full attention) eager with a DynamicCache and with a StaticCache under
torch.compile(mode="reduce-overhead"), and fla's GDN recurrence (the memory step of another library).
Row keys: bench/README.md, "What is measured"."""
from __future__ import annotations

import sys

if __name__ == "__main__":   # a module of the benches' rows: run as a script it measured nothing and said nothing
    sys.stderr.write("error: bench/peers.py holds the peer rows that bench/decode_latency.py runs and measures "
                     "nothing by itself; run python bench/decode_latency.py (without a GPU: --device cpu --preset "
                     "tiny)\n")
    sys.exit(2)

import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

from ahn_rt_rows import TOKEN  # noqa: E402
from timing import back_to_back_ms, free_memory, peak_gib, per_call_ms, summary  # noqa: E402


def hf_model(c, dev: torch.device):
    """Qwen2ForCausalLM / Qwen3ForCausalLM, random init at the shape of config c, sdpa attention. head_dim is
    given for both families: a Qwen2 config may set it apart from hidden_size / heads (weights/demo: 128, not
    64), and HF's Qwen2 default then made K/V of another width than the cache the rows fill."""
    import transformers
    fam = "Qwen3" if c.family == "qwen3" else "Qwen2"
    Cfg, Model = getattr(transformers, fam + "Config"), getattr(transformers, fam + "ForCausalLM")
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
              num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
              max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
              rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, use_sliding_window=False)
    if c.family == "qwen3":
        kw.update(attention_bias=c.attention_bias)
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
    """tg @ d{ctx}, HF eager: a DynamicCache filled with random K/V of the context length (growing by
    concatenation as HF does), then steps timed one by one, each reading the argmax on the host."""
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
    """tg @ d{ctx}, HF StaticCache + torch.compile(reduce-overhead): compile and record the CUDA graph
    in the warm-up (its time is compile_s), then steps timed one by one. The static cache attends the
    whole buffer under a mask."""
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


def fla_importable() -> str | None:
    """None when fla's gated delta rule imports, else why not."""
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception as e:  # noqa: BLE001 - fla pulls Triton, which fails in many ways
        return f"fla not importable ({type(e).__name__}: {e})"[:200]
    return None


def fla_row(c, dev: torch.device, iters: int) -> dict:
    """fla's fused_recurrent_gated_delta_rule for every layer, one token each, eager, back to back: the
    recurrence only (no output norm, gate or grouped o_proj). fla names the log-decay g (ahn_rt: alpha)."""
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule
    L, H, D = c.num_layers, c.num_heads, c.head_dim
    dt = c.dtype
    q = torch.randn(L, 1, 1, H, D, device=dev, dtype=dt)
    k = torch.randn(L, 1, 1, H, D, device=dev, dtype=dt)
    v = torch.randn(L, 1, 1, H, D, device=dev, dtype=dt)
    alpha = -torch.rand(L, 1, 1, H, device=dev) * 0.5
    beta = torch.rand(L, 1, 1, H, device=dev, dtype=dt)
    state = torch.randn(L, 1, H, D, D, device=dev) * 0.02

    def all_layers():
        for i in range(L):
            fused_recurrent_gated_delta_rule(q[i], k[i], v[i], g=alpha[i], beta=beta[i], initial_state=state[i],
                                             output_final_state=True, use_qk_l2norm_in_kernel=True)

    for _ in range(3):
        all_layers()
    us = back_to_back_ms(all_layers, iters, dev) * 1e3
    return dict(kind="gdn", impl="fla fused_recurrent_gated_delta_rule", layers=L, us=us,
                shape=f"B=1 T=1 H={H} D={D}",
                note=f"{L} eager calls; the recurrence only (no output norm, gate or o_proj)")
