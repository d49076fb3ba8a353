"""Attention for training: sinks + sliding window per sequence (the student) and plain causal (the teacher).

Neither builds an L x L mask. The rule (docs/semantics.md §2): query t sees key j iff j <= t and
(t - j < W or j < S), with W >= 1 and S >= 0 given per sequence of the batch.

The student's window attention has two backends, chosen in one place (``attention_backend``, from
AHN_RT_TRAIN_ATTENTION):

* ``flex`` (the default on CUDA): FlexAttention, compiled, with a block mask of the rule built per batch
  (block-sparse: the tiles outside sinks + window are skipped in the forward and the backward; grouped
  heads natively). The first step pays its compile, and the first step at a second sequence length one
  more (then the length is symbolic); new window / sinks values never recompile. Training is not
  latency-bound.
* ``sdpa`` (the CPU, and CUDA on request): ``torch.nn.functional.scaled_dot_product_attention``.

The SDPA path splits the queries in two parts:

* t < C0 = min over the batch of S + W (clamped to L): every sequence attends {0..t}, i.e. plain causal
  attention over the first C0 keys, one SDPA call with is_causal (flash attention on CUDA);
* the rest, query block by query block [s, e): the keys [0, max S) and [s - max W + 1, e), with a boolean
  mask [B, 1, e - s, keys] built per sequence (the memory-efficient kernel on CUDA). The cost is
  (e - s) x (S + W + block) per block instead of (e - s) x e.

Grouped-query attention: key/value head h // G serves query head h; k and v are expanded to the H query
heads before SDPA (an expanded copy of [B, H, L, D] per layer, cheaper than risking the math fallback
that some SDPA kernels take with enable_gqa and a mask).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from ..errors import AhnError
from ..settings import train_attention

FLEX_BLOCK = 128   # FlexAttention's tile (its default): the block mask has one entry per 128 x 128 tile


def attention_backend(device) -> str:
    """'flex' or 'sdpa' for the student's window attention on ``device``: AHN_RT_TRAIN_ATTENTION=auto picks
    flex on CUDA (when torch has FlexAttention) and sdpa elsewhere; an explicit choice is kept (flex runs
    eagerly, forward only, off CUDA: a check, not a training path)."""
    choice = train_attention()
    if choice != "auto":
        return choice
    return "flex" if torch.device(device).type == "cuda" and _flex_api() is not None else "sdpa"


def check_trainable(device):
    """AhnError (one line) when the backend ``attention_backend`` picks for ``device`` cannot train there:
    flex off CUDA (eager and forward only), or flex in a torch without FlexAttention."""
    if attention_backend(device) != "flex":
        return
    if torch.device(device).type != "cuda":
        raise AhnError("AHN_RT_TRAIN_ATTENTION=flex cannot train on the CPU (FlexAttention has no backward there; "
                       "flex off CUDA is for forward checks); use sdpa or auto on the CPU")
    if _flex_api() is None:
        raise AhnError("AHN_RT_TRAIN_ATTENTION=flex needs a torch with FlexAttention; use sdpa or auto")


@functools.cache
def _flex_api():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:   # a torch without FlexAttention
        return None
    return create_block_mask, flex_attention


@functools.cache
def _flex_compiled(device_type: str):
    """(create_block_mask, flex_attention), compiled once per process on CUDA: fused Triton kernels,
    forward and backward. The default dynamic=None matters: the first call compiles for its shapes, the
    first call at another length recompiles once with the sequence length symbolic, and later lengths
    reuse that. (dynamic=False would recompile at every new length, and past Dynamo's recompile limit it
    runs flex eagerly, which materializes the [B, H, L, L] scores.) Elsewhere both run eagerly (for checks:
    the scores are materialized)."""
    create_block_mask, flex = _flex_api()
    if device_type != "cuda":
        return create_block_mask, flex
    return torch.compile(create_block_mask), torch.compile(flex)


def _flex_block_mask(W: list, S: list, L: int, device):
    """The rule's block mask for a batch: per sequence (its W and S), shared by the heads."""
    create_block_mask = _flex_compiled(torch.device(device).type)[0]
    Wt = torch.tensor(W, device=device)
    St = torch.tensor(S, device=device)

    def rule(b, h, q, kv):
        return (kv <= q) & ((q - kv < Wt[b]) | (kv < St[b]))

    return create_block_mask(rule, len(W), None, L, L, device=device, BLOCK_SIZE=FLEX_BLOCK)


def _heads_first(x: torch.Tensor, H: int) -> torch.Tensor:
    """[B, L, Hx, D] -> [B, H, L, D], repeating kv head h // G for query head h."""
    B, L, Hx, D = x.shape
    x = x.transpose(1, 2)
    if Hx != H:
        x = x[:, :, None].expand(B, Hx, H // Hx, L, D).reshape(B, H, L, D)
    return x


@dataclasses.dataclass
class WindowPlan:
    """The query split and masks of one (window, sinks) batch at length L; reusable by every layer."""
    causal_end: int                  # sdpa: queries [0, causal_end) are plain causal
    blocks: list                     # sdpa: [(q_start, q_end, lo, mask)]: keys [0, smax) + [lo, q_end), or [0, q_end) when lo is None
    smax: int
    block_mask: object = None        # flex: the rule's BlockMask (then causal_end = 0 and no blocks)


def window_plan(window, sinks, L: int, device, block: int | None = None, backend: str | None = None) -> WindowPlan:
    """Plan ``window_attention`` for int64 [B] window / sinks (any device; read once on the host).
    ``backend``: 'flex' or 'sdpa'; None asks ``attention_backend``."""
    W = [int(w) for w in torch.as_tensor(window).reshape(-1).tolist()]
    S = [int(s) for s in torch.as_tensor(sinks).reshape(-1).tolist()]
    if len(W) != len(S) or not W:
        raise ValueError(f"window ({len(W)}) and sinks ({len(S)}) must hold one value per sequence")
    if min(W) < 1 or min(S) < 0:
        raise ValueError(f"window must be >= 1 and sinks >= 0, got window {W}, sinks {S}")
    wmax, smax = max(W), max(S)
    backend = backend or attention_backend(device)
    if backend == "flex":
        if _flex_api() is None:
            raise RuntimeError("AHN_RT_TRAIN_ATTENTION=flex needs a torch with FlexAttention; use sdpa")
        return WindowPlan(0, [], smax, _flex_block_mask(W, S, L, device))
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r} (flex or sdpa)")
    c0 = min(L, min(w + s for w, s in zip(W, S)))
    if block is None:   # about an eighth of the attended span: ~1/8 of the keys wasted, few calls
        block = max(64, min(1024, 1 << max(0, (wmax + smax) // 8 - 1).bit_length()))
    uniform = len(set(zip(W, S))) == 1
    Wt = torch.tensor(W[:1] if uniform else W, device=device).view(-1, 1, 1, 1)
    St = torch.tensor(S[:1] if uniform else S, device=device).view(-1, 1, 1, 1)
    blocks = []
    for s in range(c0, L, block):
        e = min(L, s + block)
        lo = s - wmax + 1
        lo -= (-(smax + e - lo)) % 16     # a key count that is a multiple of 16 (no mask padding in SDPA)
        if lo <= smax:
            lo = None
            kpos = torch.arange(e, device=device)
        else:
            kpos = torch.cat([torch.arange(smax, device=device), torch.arange(lo, e, device=device)])
        qpos = torch.arange(s, e, device=device).view(1, 1, -1, 1)
        kpos = kpos.view(1, 1, 1, -1)
        mask = (kpos <= qpos) & ((qpos - kpos < Wt) | (kpos < St))
        blocks.append((s, e, lo, mask))
    return WindowPlan(c0, blocks, smax)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window, sinks, *,
                     block: int | None = None, plan: WindowPlan | None = None) -> torch.Tensor:
    """Sinks + sliding-window attention. q: [B, L, H, D]; k, v: [B, L, Hkv, D]; window, sinks: int64 [B]
    (W >= 1 keys including the query itself, S >= 0 sinks), per sequence. Scale D^-1/2. Returns
    [B, L, H, D] in q's dtype. ``plan`` (from ``window_plan``) skips re-planning when every layer of a
    forward shares the same window / sinks; ``block`` is the query block of the masked part."""
    B, L, H, D = q.shape
    if plan is None:
        plan = window_plan(window, sinks, L, q.device, block)
    if plan.block_mask is not None:
        out = _flex_compiled(q.device.type)[1](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               block_mask=plan.block_mask, enable_gqa=k.shape[2] != H)
        return out.transpose(1, 2)
    qh, kh, vh = q.transpose(1, 2), _heads_first(k, H), _heads_first(v, H)
    outs = []
    c0 = plan.causal_end
    if c0 > 0:
        outs.append(F.scaled_dot_product_attention(qh[:, :, :c0], kh[:, :, :c0], vh[:, :, :c0], is_causal=True))
    for s, e, lo, mask in plan.blocks:
        if lo is None:
            kb, vb = kh[:, :, :e], vh[:, :, :e]
        else:
            sm = plan.smax
            kb = torch.cat([kh[:, :, :sm], kh[:, :, lo:e]], dim=2)
            vb = torch.cat([vh[:, :, :sm], vh[:, :, lo:e]], dim=2)
        outs.append(F.scaled_dot_product_attention(qh[:, :, s:e], kb, vb, attn_mask=mask))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention (the teacher). q: [B, L, H, D]; k, v: [B, L, Hkv, D] -> [B, L, H, D]."""
    H = q.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), _heads_first(k, H), _heads_first(v, H), is_causal=True)
    return out.transpose(1, 2)
