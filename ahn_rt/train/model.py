"""The model for self-distillation: a frozen Qwen base (teacher: full causal attention; student: sinks +
window attention plus the AHN memory in every layer) and the trainable AHN modules.

The student computes the same function as ``ahn_rt.model.Decoder.prefill`` in mode ``ahn`` for the same
window W and sinks S (docs/semantics.md §2-§6, §11), for a batch of sequences that may each have their own
(W, S): per layer, x = RMSNorm(h); q, k, v (+ bias), Qwen3's q_norm / k_norm, RoPE at absolute positions;
attention over the sinks and the window; the pairs (write S + i, read S + W + i) for i < L - (S + W) (§3)
run through the layer's memory module from a zero state (``ahn_rt.train.memories``: GatedDeltaNet and
DeltaNet through ``chunk_gdn``, Mamba2 through ``chunk_scalar_decay``: gates of the written token, read with
the reading token's q, output head gated by its x) and the memory term is added to the attention output of
the reading row before the base o_proj (§6). The teacher is the same base with plain causal attention and
no memory.

Precision: base weights are stored in ``base_dtype`` (bf16 by default; float32 master weights with
``train_base``), AHN parameters in float32; the caller wraps the forward passes in
``torch.autocast("cuda", torch.bfloat16)`` on a GPU. The memory recurrences always run in float32.
Nothing is global: every table and plan is built per call and hangs off the call or the instance.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..config import Config, rope_inv_freq
from ..errors import AhnError
from ..functional import rms_norm
from ..functional import rope as apply_rope
from ..memory import resolve
from ..weights import ahn_key, ahn_shapes, base_shapes, check_tensors, fuse_layer, is_ahn_key, split_layer
from .attention import causal_attention, window_attention, window_plan
from .memories import GatedDeltaNetLayer, MemoryLayer, make_layer


class _Rope:
    """cos / sin for positions 0..L-1, computed once per forward: float32 angles, cos/sin evaluated in
    float32 and rounded to the compute dtype on first use of that dtype (docs/semantics.md §1)."""

    def __init__(self, config: Config, L: int, device):
        with torch.autocast(torch.device(device).type, enabled=False):
            inv = rope_inv_freq(config, device)
            ang = torch.arange(L, device=device).float()[:, None] * inv[None, :]
            emb = torch.cat((ang, ang), dim=-1)
            self._f32 = (emb.cos(), emb.sin())
        self._by_dtype = {}

    def __call__(self, dtype):
        if dtype not in self._by_dtype:
            self._by_dtype[dtype] = tuple(t.to(dtype) for t in self._f32)
        return self._by_dtype[dtype]


@dataclasses.dataclass
class _Pairs:
    """The memory's (write, read) pairs of a batch: write[b, i] = S_b + i, read[b, i] = S_b + W_b + i
    (int64 [B, N]); valid [B, N, 1] (0/1) when some sequence has fewer than N pairs, else None."""
    n: int
    write: torch.Tensor
    read: torch.Tensor
    valid: torch.Tensor | None


@dataclasses.dataclass
class _StudentCtx:
    plan: object           # attention.WindowPlan
    pairs: _Pairs | None   # None: no token has left the window in any sequence
    recompute_memory: bool = False   # activation checkpointing "memory": each layer's memory module recomputed


# Activation checkpointing of the student (``checkpoint=`` of forward_student; the trainer's
# ``activation_checkpointing``): "layer" recomputes each decoder layer in backward (the least memory);
# "memory" keeps the layers' activations but recomputes each layer's AHN memory module, whose chunked
# recurrence saves the most per token for the least compute (float32 block tensors and states); "none"
# keeps everything (the fastest, the most memory). The same numbers either way.
CHECKPOINT_MODES = ("layer", "memory", "none")


def checkpoint_mode(checkpoint) -> str:
    """One of CHECKPOINT_MODES from a mode name or a bool (True: "layer", False: "none")."""
    if checkpoint is True or checkpoint is False:
        return "layer" if checkpoint else "none"
    if checkpoint in CHECKPOINT_MODES:
        return checkpoint
    raise AhnError(f"activation checkpointing {checkpoint!r}: use one of {', '.join(CHECKPOINT_MODES)}")


# ----------------------------------------------------------------------------------------------
# The AHN module of one layer: one trainable memory module per variant (ahn_rt.train.memories)
# ----------------------------------------------------------------------------------------------
# The GatedDeltaNet layer keeps its historical name here.
AHNLayer = GatedDeltaNetLayer


def init_ahn_(layer: MemoryLayer, generator: torch.Generator | None = None) -> MemoryLayer:
    """The official initial values of ``layer``'s variant, o_proj = 0 (docs/semantics.md §10, §11): the
    memory term vanishes and the student starts as the sinks + window model. CPU draws from
    ``generator`` (same values on every device)."""
    return layer.init_(generator)


# ----------------------------------------------------------------------------------------------
# The frozen base
# ----------------------------------------------------------------------------------------------
class _BaseLayer(nn.Module):
    """One decoder layer's base weights by role (``weights.layer_parts``: q|k|v and gate|up fused into one
    GEMM each); a role the architecture lacks (biases, q/k norms) is None."""

    ROLES = ("ln_in", "w_qkv", "b_qkv", "q_norm", "k_norm", "w_o", "b_o", "ln_post", "w_gu", "w_down")

    def __init__(self, get, n: int, c: Config, trainable: bool):
        super().__init__()
        fused = fuse_layer(c, n, get)
        for role in self.ROLES:
            t = fused.get(role)
            setattr(self, role, None if t is None else nn.Parameter(t, requires_grad=trainable))


class TrainModel(nn.Module):
    """Teacher and student over one set of base weights, plus the trainable AHN modules.

    config: the model's Config; base: {Hugging Face key: tensor} (any dtype and device; AHN keys in it are
    taken as ``ahn`` when ``ahn`` is None); ahn: {official key: tensor} or None (fresh ``init_ahn_`` with
    o_proj = 0, seeded by ``seed``). ``implementation``: the memory variant, official or short name
    (GatedDeltaNet / gdn, DeltaNet / dn, Mamba2 / mamba2; default: the config's ``_ahn_implementation``,
    else GatedDeltaNet); ``ahn`` tensors must be of that variant. Base weights are stored in ``base_dtype``
    and frozen, unless ``train_base`` (teacher pretraining: trainable, float32 master weights).
    ``with_ahn`` (default: not ``train_base``, or True when AHN tensors are given) says whether the AHN
    modules exist at all. ``decay_init``: "official", or "long" (a fresh memory's heads start with
    half-lives of 64 to 4096 tokens: ``init_long_decay_``; only without ``ahn``).
    """

    def __init__(self, config: Config, base: dict, ahn: dict | None = None, *, base_dtype=torch.bfloat16,
                 train_base: bool = False, seed: int = 0, with_ahn: bool | None = None,
                 implementation: str | None = None, decay_init: str = "official"):
        super().__init__()
        c = self.config = config
        self.implementation = resolve(implementation or config.ahn_implementation)
        self.train_base = bool(train_base)
        dtype = torch.float32 if train_base else base_dtype
        base = dict(base)
        merged = {k: base.pop(k) for k in [k for k in base if is_ahn_key(k)]}
        if merged:
            if ahn is not None:
                raise AhnError("AHN tensors given twice: in the base dict and as ahn=")
            ahn = merged
        check_tensors(base_shapes(c), base, "base weights",
                      optional={"lm_head.weight"} if c.tie_word_embeddings else ())

        def get(key, copy=self.train_base):   # frozen weights may share the caller's storage
            if key not in base:
                return None
            t = base[key].detach().to(dtype=dtype)
            return t.clone() if copy and t.data_ptr() == base[key].data_ptr() else t

        self.embed = nn.Parameter(get("model.embed_tokens.weight"), requires_grad=self.train_base)
        self.norm = nn.Parameter(get("model.norm.weight"), requires_grad=self.train_base)
        self.lm_head = None if c.tie_word_embeddings else nn.Parameter(get("lm_head.weight"),
                                                                       requires_grad=self.train_base)
        self.layers = nn.ModuleList(_BaseLayer(get, n, c, self.train_base)
                                    for n in range(c.num_layers))

        if with_ahn is None:
            with_ahn = ahn is not None or not self.train_base
        if decay_init not in ("official", "long"):
            raise AhnError(f"decay_init {decay_init!r}: use 'official' or 'long'")
        if decay_init == "long" and ahn is not None:
            raise AhnError("--decay-init long sets a fresh memory's gates; it cannot be combined with given AHN "
                           "weights (--init-from-base or --init-ahn)")
        device = self.embed.device
        self.ahn = nn.ModuleList()
        if with_ahn:
            gen = torch.Generator().manual_seed(seed)
            for n in range(c.num_layers):
                layer = make_layer(self.implementation, c.hidden_size, c.num_heads, c.head_dim, device=device)
                if ahn is None:
                    init_ahn_(layer, gen)
                    if decay_init == "long":
                        layer.init_long_decay_()
                self.ahn.append(layer)
            if ahn is not None:
                check_tensors(ahn_shapes(c, self.implementation), ahn, f"AHN weights ({self.implementation})")
                with torch.no_grad():
                    for n, layer in enumerate(self.ahn):
                        for name, p in layer.named_parameters():
                            p.copy_(ahn[ahn_key(n, name)].to(device=device, dtype=torch.float32))

    # ------------------------------------------------------------------------------------------
    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [..., V] of hidden states [..., d] taken after the final norm."""
        return F.linear(hidden, self.lm_head_weight).float()

    def ahn_state_dict(self) -> dict:
        """{official key: tensor} of every AHN parameter (float32, detached)."""
        return {ahn_key(n, name): p.detach() for n, layer in enumerate(self.ahn) for name, p in layer.named_parameters()}

    def base_state_dict(self) -> dict:
        """{Hugging Face key: tensor} of the base model (the fused projections split back)."""
        c = self.config
        out = {"model.embed_tokens.weight": self.embed.detach(), "model.norm.weight": self.norm.detach()}
        if self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head.detach()
        for n, lw in enumerate(self.layers):
            out.update(split_layer(c, n, {role: p.detach() for role, p in lw.named_parameters()}))
        return out

    # ------------------------------------------------------------------------------------------
    def forward_teacher(self, ids: torch.Tensor, *, checkpoint: bool = False) -> torch.Tensor:
        """Hidden states [B, L, d] after the final norm, full causal attention, no memory. Runs without
        gradient unless ``train_base`` (then ``checkpoint`` recomputes each layer in backward)."""
        with torch.set_grad_enabled(self.train_base and torch.is_grad_enabled()):
            return self._run(ids, None, checkpoint)

    def forward_student(self, ids: torch.Tensor, window, sinks, *, checkpoint: bool | str = True) -> torch.Tensor:
        """Hidden states [B, L, d] after the final norm with the attention of sinks[b] + window[b] keys
        (int64 [B]) and the AHN memory in every layer. ``checkpoint``: what backward recomputes
        (``CHECKPOINT_MODES``; True is "layer", False "none")."""
        if not len(self.ahn):
            raise AhnError("this TrainModel has no AHN modules (with_ahn=False)")
        B, L = ids.shape
        W = [int(w) for w in torch.as_tensor(window).reshape(-1).tolist()]
        S = [int(s) for s in torch.as_tensor(sinks).reshape(-1).tolist()]
        if len(W) != B or len(S) != B:
            raise AhnError(f"window and sinks need one value per sequence ({B}), got {len(W)} and {len(S)}")
        dev = ids.device
        plan = window_plan(W, S, L, dev)
        n = [max(0, L - s - w) for w, s in zip(W, S)]
        pairs = None
        if max(n) > 0:
            N = max(n)
            i = torch.arange(N, device=dev)[None, :]
            St, Wt, nt = (torch.tensor(x, device=dev)[:, None] for x in (S, W, n))
            valid = None if min(n) == N else (i < nt).to(torch.float32)[..., None]
            pairs = _Pairs(N, (St + i).clamp(max=L - 1), (St + Wt + i).clamp(max=L - 1), valid)
        mode = checkpoint_mode(checkpoint)
        return self._run(ids, _StudentCtx(plan, pairs, recompute_memory=mode == "memory"), mode == "layer")

    def forward(self, ids, window, sinks, *, checkpoint: bool | str = True):
        return self.forward_student(ids, window, sinks, checkpoint=checkpoint)

    # ------------------------------------------------------------------------------------------
    def _run(self, ids: torch.Tensor, student: _StudentCtx | None, checkpoint: bool) -> torch.Tensor:
        rope = _Rope(self.config, ids.shape[1], ids.device)
        h = F.embedding(ids, self.embed)
        use_ckpt = checkpoint and torch.is_grad_enabled()
        for i in range(len(self.layers)):
            if use_ckpt:
                h = _checkpoint(self._layer, i, h, rope, student, use_reentrant=False, preserve_rng_state=False)
            else:
                h = self._layer(i, h, rope, student)
        return rms_norm(h, self.norm, self.config.rms_norm_eps)

    def attention_inputs(self, i: int, h: torch.Tensor, rope: _Rope):
        """Layer i's prenormed hidden states x [B, L, d] and its post-RoPE q [B, L, H, D], k and v [B, L, Hkv,
        D] (Qwen3's q_norm / k_norm before RoPE), from the layer input h."""
        c, lw = self.config, self.layers[i]
        B, L, _ = h.shape
        H, Hkv, D, eps = c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps
        x = rms_norm(h, lw.ln_in, eps)
        q, k, v = F.linear(x, lw.w_qkv, lw.b_qkv).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q, k, v = q.view(B, L, H, D), k.view(B, L, Hkv, D), v.view(B, L, Hkv, D)
        if c.qk_norm:
            q, k = rms_norm(q, lw.q_norm, eps), rms_norm(k, lw.k_norm, eps)
        cos, sin = rope(q.dtype)
        return x, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _layer(self, i: int, h: torch.Tensor, rope: _Rope, student: _StudentCtx | None) -> torch.Tensor:
        c, lw = self.config, self.layers[i]
        B, L, _ = h.shape
        H, D, eps = c.num_heads, c.head_dim, c.rms_norm_eps
        x, q, k, v = self.attention_inputs(i, h, rope)
        if student is None:
            attn = causal_attention(q, k, v)
        else:
            attn = window_attention(q, k, v, None, None, plan=student.plan)
            if student.pairs is not None:
                if student.recompute_memory and torch.is_grad_enabled():
                    m = _checkpoint(self.ahn[i], x, q, k, v, student.pairs, use_reentrant=False,
                                    preserve_rng_state=False)
                else:
                    m = self.ahn[i](x, q, k, v, student.pairs)
                m = m.to(attn.dtype)
                pairs = student.pairs
                attn = attn.scatter_add(1, pairs.read.view(B, pairs.n, 1, 1).expand_as(m), m)
        h = h + F.linear(attn.reshape(B, L, H * D), lw.w_o, lw.b_o)
        gate, up = F.linear(rms_norm(h, lw.ln_post, eps), lw.w_gu).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, lw.w_down)
