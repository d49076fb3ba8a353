"""The model for self-distillation: a frozen Qwen base (teacher: full causal attention; student: sinks +
window attention plus the AHN GatedDeltaNet memory in every layer) and the trainable AHN modules.

The student computes the same function as ``ahn_rt.model.Decoder.prefill`` in mode ``ahn`` for the same
window W and sinks S (docs/semantics.md §2-§6), for a batch of sequences that may each have their own
(W, S): per layer, x = RMSNorm(h); q, k, v (+ bias), Qwen3's q_norm / k_norm, RoPE at absolute positions;
attention over the sinks and the window; the gates beta = sigmoid(x Wb^T), alpha = -exp(A_log) *
softplus(x Wa^T + dt_bias) (float32), z = x Wg^T; the pairs (write S + i, read S + W + i) for
i < L - (S + W) (§3) run through ``chunk_gdn`` from a zero state; the memory output
y = RMSNorm_D(o) * o_norm * z * sigmoid(z) (float32, eps 1e-5) goes through the grouped o_proj and is added
to the attention output of the reading row before the base o_proj (§6). The teacher is the same base
with plain causal attention and no memory.

Precision: base weights are stored in ``base_dtype`` (bf16 by default; float32 master weights with
``train_base``), AHN parameters in float32; the caller wraps the forward passes in
``torch.autocast("cuda", torch.bfloat16)`` on a GPU. The memory (``chunk_gdn``) always runs in float32.
Nothing is global: every table and plan is built per call and hangs off the call or the instance.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from ..config import AHN_NORM_EPS, Config, rope_inv_freq
from ..errors import AhnError
from ..weights import ahn_key, ahn_shapes, base_shapes, is_ahn_key
from .attention import causal_attention, window_attention, window_plan
from .gdn import chunk_gdn


# ----------------------------------------------------------------------------------------------
# Small pieces, written exactly as ahn_rt.ref computes them
# ----------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen RMSNorm: normalize in float32, round to x.dtype, then multiply by the weight."""
    xf = x.float()
    r = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * r.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [B, L, nh, D]; cos, sin: [L, D] in x.dtype."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


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


# ----------------------------------------------------------------------------------------------
# The AHN module of one layer
# ----------------------------------------------------------------------------------------------
class _Weight(nn.Module):
    """Holds one parameter named ``weight`` (so the state dict carries the official suffix)."""

    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(t)


class AHNLayer(nn.Module):
    """The trainable GatedDeltaNet memory of one decoder layer, with the official parameter names
    (A_log, D, dt_bias, a_proj.weight, b_proj.weight, g_proj.weight, o_norm.weight, o_proj.weight;
    docs/semantics.md §8). float32 master weights. D is stored but unused (§4). Created zero; call
    ``init_ahn_`` or load a state dict."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, device=None):
        super().__init__()
        H, d, D = num_heads, hidden_size, head_dim
        kw = dict(device=device, dtype=torch.float32)
        self.A_log = nn.Parameter(torch.zeros(H, **kw))
        self.D = nn.Parameter(torch.ones(H, **kw))
        self.dt_bias = nn.Parameter(torch.zeros(H, **kw))
        self.a_proj = nn.Linear(d, H, bias=False, **kw)
        self.b_proj = nn.Linear(d, H, bias=False, **kw)
        self.g_proj = nn.Linear(d, H, bias=False, **kw)
        self.o_norm = _Weight(torch.ones(D, **kw))
        self.o_proj = _Weight(torch.zeros(H, D, D, **kw))   # [H, D_in, D_out]

    def gates(self, x: torch.Tensor):
        """(a, b, z) = x [Wa; Wb; Wg]^T in x's dtype: one small GEMM for the three projections."""
        w = torch.cat([self.a_proj.weight, self.b_proj.weight, self.g_proj.weight]).to(x.dtype)
        return F.linear(x, w).split(self.A_log.shape[0], dim=-1)


@torch.no_grad()
def init_ahn_(layer: AHNLayer, generator: torch.Generator | None = None) -> AHNLayer:
    """The official initial values (docs/semantics.md §10): A_log = log U(1, 16); dt_bias = softplus^-1 of
    dt ~ logU[1e-3, 0.1] floored at 1e-4; D = 1; o_norm = 1; a/b/g projections N(0, 0.02); o_proj = 0, so
    that the memory term vanishes and the student starts as the sinks + window model. Draws on the CPU
    with ``generator`` (same values on every device)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    H = layer.A_log.shape[0]

    def put(p, t):
        p.copy_(t.to(p.device, p.dtype))

    put(layer.A_log, torch.log(torch.rand(H, generator=g) * 15 + 1))
    dt = torch.exp(torch.rand(H, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    put(layer.dt_bias, dt + torch.log(-torch.expm1(-dt)))
    layer.D.fill_(1.0)
    for lin in (layer.a_proj, layer.b_proj, layer.g_proj):
        put(lin.weight, torch.randn(lin.weight.shape, generator=g) * 0.02)
    layer.o_norm.weight.fill_(1.0)
    layer.o_proj.weight.zero_()
    return layer


# ----------------------------------------------------------------------------------------------
# The frozen base
# ----------------------------------------------------------------------------------------------
class _BaseLayer(nn.Module):
    """One decoder layer's base weights, with q|k|v and gate|up fused into one GEMM each."""

    def __init__(self, get, p: str, c: Config, trainable: bool):
        super().__init__()

        def param(t):
            return None if t is None else nn.Parameter(t, requires_grad=trainable)

        a = p + "self_attn."
        self.ln_in = param(get(p + "input_layernorm.weight"))
        self.w_qkv = param(torch.cat([get(a + f"{x}_proj.weight") for x in "qkv"]))
        self.b_qkv = param(torch.cat([get(a + f"{x}_proj.bias") for x in "qkv"]) if c.attention_bias else None)
        self.q_norm = param(get(a + "q_norm.weight") if c.qk_norm else None)
        self.k_norm = param(get(a + "k_norm.weight") if c.qk_norm else None)
        self.w_o = param(get(a + "o_proj.weight"))
        self.b_o = param(get(a + "o_proj.bias") if c.attention_bias and c.family == "qwen3" else None)
        self.ln_post = param(get(p + "post_attention_layernorm.weight"))
        self.w_gu = param(torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]))
        self.w_down = param(get(p + "mlp.down_proj.weight"))


class TrainModel(nn.Module):
    """Teacher and student over one set of base weights, plus the trainable AHN modules.

    config: the model's Config; base: {Hugging Face key: tensor} (any dtype and device; AHN keys in it are
    taken as ``ahn`` when ``ahn`` is None); ahn: {official key: tensor} or None (fresh ``init_ahn_`` with
    o_proj = 0, seeded by ``seed``). Base weights are stored in ``base_dtype`` and frozen, unless
    ``train_base`` (teacher pretraining: trainable, float32 master weights). ``with_ahn`` (default: not
    ``train_base``, or True when AHN tensors are given) says whether the AHN modules exist at all.
    """

    def __init__(self, config: Config, base: dict, ahn: dict | None = None, *, base_dtype=torch.bfloat16,
                 train_base: bool = False, seed: int = 0, with_ahn: bool | None = None):
        super().__init__()
        c = self.config = config
        self.train_base = bool(train_base)
        dtype = torch.float32 if train_base else base_dtype
        base = dict(base)
        merged = {k: base.pop(k) for k in [k for k in base if is_ahn_key(k)]}
        if merged:
            if ahn is not None:
                raise AhnError("AHN tensors given twice: in the base dict and as ahn=")
            ahn = merged
        _check(base, base_shapes(c), "base weights", optional={"lm_head.weight"} if c.tie_word_embeddings else ())

        def get(key, copy=self.train_base):   # frozen weights may share the caller's storage
            if key not in base:
                return None
            t = base[key].detach().to(dtype=dtype)
            return t.clone() if copy and t.data_ptr() == base[key].data_ptr() else t

        self.embed = nn.Parameter(get("model.embed_tokens.weight"), requires_grad=self.train_base)
        self.norm = nn.Parameter(get("model.norm.weight"), requires_grad=self.train_base)
        self.lm_head = None if c.tie_word_embeddings else nn.Parameter(get("lm_head.weight"),
                                                                       requires_grad=self.train_base)
        self.layers = nn.ModuleList(_BaseLayer(get, f"model.layers.{n}.", c, self.train_base)
                                    for n in range(c.num_layers))

        if with_ahn is None:
            with_ahn = ahn is not None or not self.train_base
        device = self.embed.device
        self.ahn = nn.ModuleList()
        if with_ahn:
            gen = torch.Generator().manual_seed(seed)
            for n in range(c.num_layers):
                layer = AHNLayer(c.hidden_size, c.num_heads, c.head_dim, device=device)
                if ahn is None:
                    init_ahn_(layer, gen)
                self.ahn.append(layer)
            if ahn is not None:
                _check(ahn, ahn_shapes(c, "GatedDeltaNet"), "AHN weights")
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
        split = [c.q_size, c.kv_size, c.kv_size]
        for n, lw in enumerate(self.layers):
            p, a = f"model.layers.{n}.", f"model.layers.{n}.self_attn."
            out[p + "input_layernorm.weight"] = lw.ln_in.detach()
            for x, w in zip("qkv", lw.w_qkv.detach().split(split)):
                out[a + f"{x}_proj.weight"] = w
            if lw.b_qkv is not None:
                for x, b in zip("qkv", lw.b_qkv.detach().split(split)):
                    out[a + f"{x}_proj.bias"] = b
            if lw.q_norm is not None:
                out[a + "q_norm.weight"], out[a + "k_norm.weight"] = lw.q_norm.detach(), lw.k_norm.detach()
            out[a + "o_proj.weight"] = lw.w_o.detach()
            if lw.b_o is not None:
                out[a + "o_proj.bias"] = lw.b_o.detach()
            out[p + "post_attention_layernorm.weight"] = lw.ln_post.detach()
            gate, up = lw.w_gu.detach().chunk(2)
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            out[p + "mlp.down_proj.weight"] = lw.w_down.detach()
        return out

    # ------------------------------------------------------------------------------------------
    def forward_teacher(self, ids: torch.Tensor, *, checkpoint: bool = False) -> torch.Tensor:
        """Hidden states [B, L, d] after the final norm, full causal attention, no memory. Runs without
        gradient unless ``train_base`` (then ``checkpoint`` recomputes each layer in backward)."""
        with torch.set_grad_enabled(self.train_base and torch.is_grad_enabled()):
            return self._run(ids, None, checkpoint)

    def forward_student(self, ids: torch.Tensor, window, sinks, *, checkpoint: bool = True) -> torch.Tensor:
        """Hidden states [B, L, d] after the final norm with the attention of sinks[b] + window[b] keys
        (int64 [B]) and the AHN memory in every layer; each layer recomputed in backward when
        ``checkpoint``."""
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
        return self._run(ids, _StudentCtx(plan, pairs), checkpoint)

    def forward(self, ids, window, sinks, *, checkpoint: bool = True):
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

    def _layer(self, i: int, h: torch.Tensor, rope: _Rope, student: _StudentCtx | None) -> torch.Tensor:
        c, lw = self.config, self.layers[i]
        B, L, _ = h.shape
        H, Hkv, D, eps = c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps
        x = rms_norm(h, lw.ln_in, eps)
        q, k, v = F.linear(x, lw.w_qkv, lw.b_qkv).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q, k, v = q.view(B, L, H, D), k.view(B, L, Hkv, D), v.view(B, L, Hkv, D)
        if c.qk_norm:
            q, k = rms_norm(q, lw.q_norm, eps), rms_norm(k, lw.k_norm, eps)
        cos, sin = rope(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if student is None:
            attn = causal_attention(q, k, v)
        else:
            attn = window_attention(q, k, v, None, None, plan=student.plan)
            if student.pairs is not None:
                attn = _memory(self.ahn[i], x, q, k, v, attn, student.pairs)
        h = h + F.linear(attn.reshape(B, L, H * D), lw.w_o, lw.b_o)
        gate, up = F.linear(rms_norm(h, lw.ln_post, eps), lw.w_gu).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, lw.w_down)


def _memory(ahn: AHNLayer, x, q, k, v, attn, pairs: _Pairs) -> torch.Tensor:
    """attn [B, L, H, D] with the memory read added at the reading rows (docs/semantics.md §3-§6)."""
    B, L, H, D = q.shape
    G = H // k.shape[2]
    N = pairs.n
    a, b, z = ahn.gates(x)
    beta = torch.sigmoid(b)
    alpha = -ahn.A_log.float().exp() * F.softplus(a.float() + ahn.dt_bias.float())

    def take(t, idx):   # rows idx [B, N] of t [B, L, ...] -> [B, N, ...]
        return t.gather(1, idx.view(B, N, *([1] * (t.dim() - 2))).expand(B, N, *t.shape[2:]))

    kw, vw = take(k, pairs.write), take(v, pairs.write)
    if G > 1:
        kw, vw = kw.repeat_interleave(G, dim=2), vw.repeat_interleave(G, dim=2)
    bw, aw = take(beta, pairs.write), take(alpha, pairs.write)
    if pairs.valid is not None:   # padded pairs at the end: beta = alpha = 0 leaves the state unchanged
        bw, aw = bw * pairs.valid, aw * pairs.valid
    o, _ = chunk_gdn(take(q, pairs.read), kw, vw, bw, aw)
    dt = attn.dtype
    with torch.autocast(q.device.type, enabled=False):
        of = o.to(dt).float()   # the memory read is rounded to the model dtype (§5)
        zf = take(z, pairs.read).float()[..., None]
        y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + AHN_NORM_EPS) * ahn.o_norm.weight.float() \
            * zf * torch.sigmoid(zf)
        m = torch.einsum("bnhi,hio->bnho", y.to(dt), ahn.o_proj.weight.to(dt))
    if pairs.valid is not None:
        m = m * pairs.valid[..., None].to(dt)
    return attn.scatter_add(1, pairs.read.view(B, N, 1, 1).expand_as(m), m)


def _check(tensors: dict, expected: dict, what: str, optional=()):
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(optional))
    if missing or unexpected:
        raise AhnError(f"{what} do not match the config: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                       f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise AhnError(f"{what}: {k} has shape {list(tensors[k].shape)}, the config needs {list(shape)}")

