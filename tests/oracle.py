"""Independent float64 oracle for AHN-augmented Qwen2/Qwen3 (docs/semantics.md §1–§6), written from
the semantics only: no ahn_rt import. Slow, literal and float64 on purpose; test sizes are tiny.

    logits = Oracle(folder, ahn=None, window=W, sinks=S, mode="ahn").logits(ids)   # float64 [T, vocab]

Rule implemented (docs/semantics.md §2–§3, the consistent rule, not the official decode path of §9 a/b):
query t attends keys {0..S-1} ∪ {t-W+1..t} (all of 0..t while t < S+W); in mode "ahn", for t >= S+W the layer
also adds the read of the AHN memory that holds evicted tokens S..t-W, written in order, before
self_attn.o_proj. The memory is the config's `_ahn_implementation`, each written out below from its math
(docs/semantics.md §5–§6 and §11): GatedDeltaNet, DeltaNet (the delta rule without decay) and Mamba2 (scalar
decay, outer-product write, RMSNorm over all heads; its state kept here in mamba's own [Dv, Dk] layout).

No tolerances live here: the oracle returns float64 logits and rel_err; each test file's tolerance table
bounds rel_err.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional

import torch
from safetensors.torch import load_file

GDN_NORM_EPS = 1e-5     # FusedRMSNormSwishGate eps (docs/semantics.md §6); also Mamba2's RMSNormGated (§11)
L2_EPS = 1e-6           # fused_recurrent l2norm: x / (||x|| + eps) (docs/semantics.md §5)
M2_L2_EPS = 1e-12       # torch.nn.functional.normalize: x / max(||x||, eps) (Mamba2, docs/semantics.md §11)
AHN_FIELDS = {
    "GatedDeltaNet": ("A_log", "dt_bias", "a_proj.weight", "b_proj.weight", "g_proj.weight", "o_norm.weight",
                      "o_proj.weight"),
    "DeltaNet": ("b_proj.weight", "g_proj.weight", "o_norm.weight", "o_proj.weight"),
    "Mamba2": ("A_log", "dt_bias", "norm.weight", "dt_proj.weight", "dt_proj.bias", "g_proj.weight",
               "g_proj.bias", "o_proj.weight"),
}


# ----------------------------------------------------------------------------------------------- loading
def read_tensors(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a folder (model.safetensors or an index + shards)."""
    if os.path.isfile(path):
        return dict(load_file(path))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        out: Dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(load_file(os.path.join(path, shard)))
        return out
    return dict(load_file(os.path.join(path, "model.safetensors")))


def read_config(path: str) -> dict:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def rope_theta(cfg: dict) -> float:
    # transformers <= 4.x writes rope_theta; 5.x writes rope_parameters = {rope_theta, rope_type}.
    rp = cfg.get("rope_parameters") or {}
    rs = cfg.get("rope_scaling") or {}
    for d in (rp, rs):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            raise NotImplementedError(f"oracle only knows default RoPE, got {kind}")
    if "rope_theta" in cfg and cfg["rope_theta"] is not None:
        return float(cfg["rope_theta"])
    return float(rp["rope_theta"])


# ----------------------------------------------------------------------------------------------- math
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of x [..., D] at absolute position pos: dim i pairs with dim i + D/2."""
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D // 2, dtype=torch.float64) * 2.0 / D)   # [D/2]
    ang = pos * inv_freq
    cos = torch.cat([ang.cos(), ang.cos()])                                          # [D]
    sin = torch.cat([ang.sin(), ang.sin()])
    rot = torch.cat([-x[..., D // 2:], x[..., : D // 2]], dim=-1)
    return x * cos + rot * sin


def attended_keys(t: int, W: int, S: int, mode: str) -> list:
    """Key positions seen by query t (docs/semantics.md §2)."""
    if mode == "full" or t < S + W:
        return list(range(t + 1))
    return list(range(S)) + list(range(t - W + 1, t + 1))


# ----------------------------------------------------------------------------------------------- model
class Oracle:
    def __init__(self, weights: str, ahn: Optional[str] = None, window: Optional[int] = None,
                 sinks: Optional[int] = None, mode: str = "ahn"):
        cfg = read_config(weights)
        sd = read_tensors(weights)
        if ahn is not None:
            sd.update(read_tensors(ahn))
            acfg_path = ahn if os.path.isdir(ahn) else os.path.dirname(ahn)
            if os.path.isfile(os.path.join(acfg_path, "config.json")):
                acfg = read_config(ahn)
                for k in ("sliding_window", "num_attn_sinks", "_ahn_implementation"):
                    if acfg.get(k) is not None and cfg.get(k) is None:
                        cfg[k] = acfg[k]
        self.sd = {k: v.to(torch.float64) for k, v in sd.items()}
        self.cfg = cfg
        self.family = cfg["model_type"]
        assert self.family in ("qwen2", "qwen3"), self.family
        self.d = cfg["hidden_size"]
        self.H = cfg["num_attention_heads"]
        self.Hkv = cfg["num_key_value_heads"]
        self.G = self.H // self.Hkv
        self.D = cfg.get("head_dim") or self.d // self.H
        self.L = cfg["num_hidden_layers"]
        self.eps = cfg["rms_norm_eps"]
        self.theta = rope_theta(cfg)
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        if self.family == "qwen2":
            self.qkv_bias, self.o_bias = True, False
        else:
            self.qkv_bias = self.o_bias = bool(cfg.get("attention_bias", False))
        self.W = window if window is not None else (cfg.get("sliding_window") or 32640)
        self.S = sinks if sinks is not None else (cfg.get("num_attn_sinks") if cfg.get("num_attn_sinks")
                                                  is not None else 128)
        assert mode in ("ahn", "swa", "full"), mode
        self.mode = mode
        self.impl = cfg.get("_ahn_implementation") or "GatedDeltaNet"
        if mode == "ahn":
            for l in range(self.L):
                for f in AHN_FIELDS[self.impl]:
                    assert f"model.layers.{l}.ahn.fn.{f}" in self.sd, f"missing AHN key layer {l} {f}"

    def w(self, name: str) -> torch.Tensor:
        return self.sd[name]

    def linear(self, x, prefix, bias):
        y = x @ self.w(prefix + ".weight").T
        return y + self.w(prefix + ".bias") if bias else y

    @torch.no_grad()
    def logits(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        T, H, Hkv, G, D, W, S = len(ids), self.H, self.Hkv, self.G, self.D, self.W, self.S
        h = self.w("model.embed_tokens.weight")[ids]                        # [T, d]
        for l in range(self.L):
            p = f"model.layers.{l}"
            x = rms_norm(h, self.w(p + ".input_layernorm.weight"), self.eps)    # prenormed hidden [T, d]
            q = self.linear(x, p + ".self_attn.q_proj", self.qkv_bias).view(T, H, D)
            k = self.linear(x, p + ".self_attn.k_proj", self.qkv_bias).view(T, Hkv, D)
            v = self.linear(x, p + ".self_attn.v_proj", self.qkv_bias).view(T, Hkv, D)
            if self.family == "qwen3":                                       # per-head norm before RoPE
                q = rms_norm(q, self.w(p + ".self_attn.q_norm.weight"), self.eps)
                k = rms_norm(k, self.w(p + ".self_attn.k_norm.weight"), self.eps)
            q = torch.stack([rope(q[t], t, self.theta) for t in range(T)])   # [T, H, D], absolute positions
            k = torch.stack([rope(k[t], t, self.theta) for t in range(T)])   # [T, Hkv, D]
            kh = k.repeat_interleave(G, dim=1)                               # [T, H, D]: head h <- kv head h//G
            vh = v.repeat_interleave(G, dim=1)

            attn = torch.zeros(T, H, D, dtype=torch.float64)
            for t in range(T):
                keys = attended_keys(t, W, S, self.mode)
                sc = torch.einsum("hd,khd->hk", q[t], kh[keys]) / math.sqrt(D)   # [H, |keys|]
                attn[t] = torch.einsum("hk,khd->hd", sc.softmax(-1), vh[keys])

            if self.mode == "ahn":
                attn = attn + self.memory(l, x, q, kh, vh)

            h = h + self.linear(attn.reshape(T, H * D), p + ".self_attn.o_proj", self.o_bias)
            y = rms_norm(h, self.w(p + ".post_attention_layernorm.weight"), self.eps)
            gate = y @ self.w(p + ".mlp.gate_proj.weight").T
            up = y @ self.w(p + ".mlp.up_proj.weight").T
            h = h + (torch.nn.functional.silu(gate) * up) @ self.w(p + ".mlp.down_proj.weight").T
        h = rms_norm(h, self.w("model.norm.weight"), self.eps)
        head = self.w("model.embed_tokens.weight") if self.tied else self.w("lm_head.weight")
        return h @ head.T

    def memory(self, l, x, q, kh, vh) -> torch.Tensor:
        """The AHN memory term for every position (zero for t < S+W), [T, H, D]."""
        if self.impl == "Mamba2":
            return self.mamba2(l, x, q, kh, vh)
        return self.delta_rule(l, x, q, kh, vh, gated=self.impl == "GatedDeltaNet")

    def delta_rule(self, l, x, q, kh, vh, gated: bool) -> torch.Tensor:
        """GatedDeltaNet (gated) or DeltaNet (no decay: the state is never scaled), [T, H, D]."""
        T, H, D, W, S = x.shape[0], self.H, self.D, self.W, self.S
        p = f"model.layers.{l}.ahn.fn"
        beta = torch.sigmoid(x @ self.w(p + ".b_proj.weight").T)                         # [T, H]
        if gated:
            A_log, dt_bias = self.w(p + ".A_log"), self.w(p + ".dt_bias")             # [H]
            alpha = -torch.exp(A_log) * torch.nn.functional.softplus(x @ self.w(p + ".a_proj.weight").T + dt_bias)
        z = x @ self.w(p + ".g_proj.weight").T                                           # [T, H]
        onorm = self.w(p + ".o_norm.weight")                                             # [D]
        Wo = self.w(p + ".o_proj.weight")                                                # [H, D_in, D_out]
        out = torch.zeros(T, H, D, dtype=torch.float64)
        state = torch.zeros(H, D, D, dtype=torch.float64)                               # [H, K, V]
        for t in range(S + W, T):
            e = t - W                                                                    # evicted token
            for hh in range(H):
                kk = kh[e, hh] / (kh[e, hh].norm() + L2_EPS)
                qq = q[t, hh] / (q[t, hh].norm() + L2_EPS) * D ** -0.5
                st = torch.exp(alpha[e, hh]) * state[hh] if gated else state[hh]         # decay
                u = beta[e, hh] * (vh[e, hh] - st.T @ kk)                                # delta
                st = st + torch.outer(kk, u)                                             # write
                state[hh] = st
                o = st.T @ qq                                                            # read [D]
                y = o * torch.rsqrt(o.pow(2).mean() + GDN_NORM_EPS) * onorm * z[t, hh] * torch.sigmoid(z[t, hh])
                out[t, hh] = y @ Wo[hh]
        return out

    def mamba2(self, l, x, q, kh, vh) -> torch.Tensor:
        """Mamba2: per head h <- exp(dt A) h + dt v k^T (h [Dv, Dk]), y = h q^ with k^, q^ unit vectors,
        dt = softplus(x Wdt^T + b_dt + dt_bias) of the evicted token, A = -exp(A_log); then over ALL H*D
        lanes of the reading token: RMSNorm(y * silu(z)) * w, z = x Wg^T + b_g; then the grouped o_proj."""
        T, H, D, W, S = x.shape[0], self.H, self.D, self.W, self.S
        p = f"model.layers.{l}.ahn.fn"
        F = torch.nn.functional
        A = -torch.exp(self.w(p + ".A_log"))                                             # [H]
        dt = F.softplus(self.linear(x, p + ".dt_proj", True) + self.w(p + ".dt_bias"))   # [T, H]
        z = self.linear(x, p + ".g_proj", True)                                          # [T, H]
        w = self.w(p + ".norm.weight").view(H, D)
        Wo = self.w(p + ".o_proj.weight")                                                # [H, D_in, D_out]
        out = torch.zeros(T, H, D, dtype=torch.float64)
        h = torch.zeros(H, D, D, dtype=torch.float64)                                    # [H, Dv, Dk]
        for t in range(S + W, T):
            e = t - W
            y = torch.zeros(H, D, dtype=torch.float64)
            for hh in range(H):
                kk = kh[e, hh] / max(float(kh[e, hh].norm()), M2_L2_EPS)
                qq = q[t, hh] / max(float(q[t, hh].norm()), M2_L2_EPS)
                h[hh] = torch.exp(dt[e, hh] * A[hh]) * h[hh] + dt[e, hh] * torch.outer(vh[e, hh], kk)
                y[hh] = h[hh] @ qq
            g = y * (z[t] * torch.sigmoid(z[t]))[:, None]
            g = g * torch.rsqrt(g.pow(2).mean() + GDN_NORM_EPS) * w
            for hh in range(H):
                out[t, hh] = g[hh] @ Wo[hh]
        return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all elements, in float64."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a - b).norm() / b.norm())


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over all elements, in float64 (the training tests' metric)."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def window_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, W, S) -> torch.Tensor:
    """Sinks + window attention of a batch written from the rule (docs/semantics.md §2), a dense masked
    softmax in float64 (differentiable): query t sees key j iff j <= t and (t - j < W[b] or j < S[b]).
    q: [B, L, H, D]; k, v: [B, L, Hkv, D] (key/value head h // G serves query head h); scale D^-1/2.
    Returns float64 [B, L, H, D]."""
    B, L, H, D = q.shape
    G = H // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(G, 2), v.double().repeat_interleave(G, 2)
    t = torch.arange(L, device=q.device)[:, None]
    j = torch.arange(L, device=q.device)[None, :]
    outs = []
    for b in range(B):
        allowed = (j <= t) & ((t - j < W[b]) | (j < S[b]))
        s = torch.einsum("thd,jhd->htj", q[b], k[b]) * D ** -0.5
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        outs.append(torch.einsum("htj,jhd->thd", p, v[b]))
    return torch.stack(outs)
