"""The cost model: what one decode step must move and what a prefill must compute, from the config alone.

Notation as in docs/semantics.md: L layers, d hidden size, H query heads, Hkv key/value heads, D head dim,
S sinks, W window, V vocabulary, e bytes per element of the model dtype; ctx is the number of tokens
already consumed when the measured step runs (its own position).

**Decode floor** (``floor_terms``): a decode step reads every weight once and the keys it attends, so
its time cannot go below these bytes divided by the card's measured copy bandwidth (bench/machine.py).
Term by term:

- ``weights``: every base parameter × e — the embedding / tied LM head matrix once in full (the head
  reads all of it; an untied model is counted with its embedding table too, although a step reads one
  row of it), every layer's q/k/v/o, gate/up/down and norms, the q/k/v biases of Qwen2 (and Qwen3 with
  ``attention_bias``), Qwen3's q/k norms.
- ``kv``: the cached keys and values the step attends, ``keys × 2 × L × Hkv × D × e`` with keys = ctx
  under full attention and ``min(ctx, S + W)`` with sinks and window (docs/semantics.md §2, §7).
- ``ahn_weights`` (mode ahn): per layer the a/b/g gate projections ``3 × H × d``, the grouped output
  projection ``H × D × D``, the output norm ``D`` and A_log / D / dt_bias ``3 × H`` (§4, §6), × e.
- ``gdn_state`` (mode ahn, once ``ctx ≥ S + W``, i.e. once the step hands a token to the memory, §3): the
  float32 memory ``L × H × D × D × 4 B`` read and written back (× 2; §5, §7). Below S + W the memory step
  does nothing and moves nothing.
- ``total``: their sum. Activations, the gates of the evicted token and the logits are a few KB.

A step of B sequences (``model.step``, rows ``tg @ d{ctx} b{B}``) reads the weights once and each
sequence's ``kv`` and ``gdn_state``: floor = (weights + ahn_weights + B × (kv + gdn_state)) / bandwidth.

Each row is compared with the floor of the algorithm it runs: ahn rows with the ahn floor, full-attention
rows (ahn_rt full mode, HF) with the full one.

**Prefill FLOPs** (``prefill_flops``), for n tokens from an empty session with ``last_only`` logits:

- 2 FLOPs (multiply + add) per parameter per token for every matmul, all parameters but the V × d matrix
  counted as matmul weights (norms and, for an untied model, the embedding table included: a small
  overcount); the V × d LM head once, since only the last position's logits are made;
- attention: ``4 × H × D`` per attended key per layer (q·k and p·v), token t attending ``min(t + 1, K)``
  keys, K = n under full attention, S + W with sinks and window (§2);
- mode ahn: the gate projections ``2 × 3 × H × d`` per token per layer, and per token that enters the
  memory (``max(0, n - (S + W))`` of them, §3) about ``9 × H × D²`` per layer: the recurrence of §5 (decay
  D², M^T k 2D², the rank-1 write 2D², the read 2D²) and the grouped output projection of §6 (2D²). The
  chunked form of §5 that prefill runs does more arithmetic than this; the model counts the useful work.
"""
from __future__ import annotations

from ahn_rt.config import param_count


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


def kv_bytes(c, tokens: int, elem: int | None = None) -> int:
    """Keys and values of `tokens` positions over all layers (default: the model dtype's size)."""
    return tokens * 2 * c.num_layers * c.num_kv_heads * c.head_dim * (elem or c.dtype.itemsize)


def floor_terms(c, ctx: int, mode: str, elem: int, batch: int = 1) -> dict:
    """The bytes one decode step at depth ctx must move, term by term (this module's docstring); for a
    step of ``batch`` sequences all at depth ctx, the weights once and every sequence's state."""
    L, H, D = c.num_layers, c.num_heads, c.head_dim
    keys = ctx if mode == "full" else min(ctx, c.sinks + c.window)
    t = dict(weights=weight_bytes(c, elem), kv=batch * kv_bytes(c, keys, elem))
    if mode == "ahn":
        t["ahn_weights"] = ahn_weight_bytes(c, elem)
        t["gdn_state"] = batch * L * H * D * D * 4 * 2 if ctx >= c.sinks + c.window else 0
    t["total"] = sum(t.values())
    return t


def floor_table(c, contexts) -> dict:
    """The header's floor: for each context (as a string key), the ahn and full-attention terms."""
    elem = c.dtype.itemsize
    return {str(ctx): {m: floor_terms(c, ctx, m, elem) for m in ("ahn", "full")} for ctx in contexts}


def prefill_flops(c, n: int, mode: str) -> float:
    """FLOPs of a prompt of n tokens with last_only logits (this module's docstring)."""
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


def against_floor(rows: list, c, copy_GBps: float, matmul_TFLOPs: float):
    """Add the derived columns: decode rows against their floor at the measured copy bandwidth (tok_s,
    floor_bytes, floor_ms, GBps = floor bytes per measured step, pct_floor), prefill rows against the
    measured matmul rate (pct_matmul)."""
    bw = copy_GBps * 1e9
    for x in rows:
        if x["kind"] == "tg":
            B = x.get("batch", 1)
            fb = floor_terms(c, x["ctx"], x["mode"], c.dtype.itemsize, B)["total"]
            x["tok_s"] = B * 1e3 / x["ms"]          # aggregate over the batch
            x["floor_bytes"] = fb
            x["floor_ms"] = fb / bw * 1e3
            x["GBps"] = fb / (x["ms"] / 1e3) / 1e9
            x["pct_floor"] = 100 * x["floor_ms"] / x["ms"]
        elif x["kind"] == "pp":
            x["pct_matmul"] = 100 * x["TFLOPs"] / matmul_TFLOPs
