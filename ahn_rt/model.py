"""The AHN-augmented Qwen decoder: prefill over a chunk of tokens and the single-token decode step.

Semantics: docs/semantics.md §2–§6 (the consistent rule; §9 says where the official decode path differs).
For a query at absolute position t the attention sees the sinks {0..S-1} and the window {t-W+1..t}; once
t >= S + W, the token t - W has left the window and was written into the layer's GatedDeltaNet memory
(with the beta/alpha computed when it was first processed), and the memory is read with q_t, gated by
x_t, and added to the attention output before o_proj. Every hot op goes through ``ahn_rt.ops``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .cache import State
from .config import AHN_NORM_EPS, Config, rope_inv_freq
from .weights import Weights


class Decoder:
    def __init__(self, config: Config, weights: Weights, device):
        self.config = config
        self.w = weights
        self.device = torch.device(device)
        self.inv_freq = rope_inv_freq(config, self.device)
        self.scale = config.head_dim ** -0.5
        c = config
        self._q_end = c.q_size
        self._k_end = c.q_size + c.kv_size
        self._v_end = c.q_size + 2 * c.kv_size

    def new_state(self, capacity: int | None = None) -> State:
        return State(self.config, self.device, capacity)

    # ------------------------------------------------------------------------------------------
    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = ops.rms_norm(h, self.w.norm, self.config.rms_norm_eps)
        return ops.linear(h, self.w.lm_head).float()

    def _mlp(self, h: torch.Tensor, lw) -> torch.Tensor:
        x = ops.rms_norm(h, lw.ln_post, self.config.rms_norm_eps)
        gate, up = ops.linear(x, lw.w_gu).chunk(2, dim=-1)
        return h + ops.linear(F.silu(gate) * up, lw.w_down)

    def _gates(self, proj: torch.Tensor, lw):
        """beta (model dtype), alpha (float32), z for every token of a projection [T, P]."""
        H, v_end = self.config.num_heads, self._v_end
        a, b, z = proj[:, v_end:v_end + H], proj[:, v_end + H:v_end + 2 * H], proj[:, v_end + 2 * H:]
        beta = torch.sigmoid(b)
        alpha = -lw.a_log.exp() * F.softplus(a.float() + lw.dt_bias)
        return beta, alpha, z

    # ------------------------------------------------------------------------------------------
    def prefill(self, st: State, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Run T >= 1 tokens at positions st.position.. through every layer; advance the state.

        The State plans the chunk (which keys it attends, which of its tokens it writes where, which
        tokens it hands to the memory); this function only computes. Returns float32 logits [T, vocab]
        (or [1, vocab] with ``last_only``).
        """
        c = self.config
        T = ids.numel()
        plan = st.plan(T)
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        cos, sin = ops.rope_cos_sin(plan.positions, self.inv_freq, c.dtype)
        ev, r = plan.evict_index, plan.read_rows

        h = F.embedding(ids, self.w.embed)
        for i, lw in enumerate(self.w.layers):
            x = ops.rms_norm(h, lw.ln_in, c.rms_norm_eps)
            proj = ops.linear(x, lw.w_in, lw.b_in)
            q = proj[:, : self._q_end].view(T, H, D)
            k = proj[:, self._q_end: self._k_end].view(T, Hkv, D)
            v = proj[:, self._k_end: self._v_end].view(T, Hkv, D)
            if c.qk_norm:
                q = ops.rms_norm(q, lw.q_norm, c.rms_norm_eps)
                k = ops.rms_norm(k, lw.k_norm, c.rms_norm_eps)
            q = ops.rope(q, cos, sin)
            k = ops.rope(k, cos, sin)
            k_all, v_all = st.keys(i, plan, k, v)
            attn = ops.window_attention(q, k_all, v_all, plan.positions, plan.key_positions, st.sinks, st.window,
                                        self.scale)
            beta = alpha = None
            if st.ahn:
                beta, alpha, z = self._gates(proj, lw)
                if plan.n_evict:
                    beta_all, alpha_all = st.gates(i, plan, beta, alpha)
                    o = ops.gdn_chunk(q[r], k_all[ev], v_all[ev], beta_all[ev], alpha_all[ev], st.memory[i])
                    attn[r] += ops.gdn_output(o, z[r], lw.o_norm, lw.ahn_o_proj, AHN_NORM_EPS)
            st.write(i, plan, k, v, beta, alpha)
            h = h + ops.linear(attn.reshape(T, H * D), lw.w_o, lw.b_o)
            h = self._mlp(h, lw)
        st.advance(T)
        return self._logits(h[-1:] if last_only else h)

    # ------------------------------------------------------------------------------------------
    def decode_step(self, st: State, ids: torch.Tensor) -> torch.Tensor:
        """One token (ids: int64 [1] on the device) at position st.pos (device). Does not advance the
        position: the caller does (eagerly, or inside a captured CUDA graph). Returns logits [1, vocab].

        Per layer: one fused GEMV (RMSNorm + q|k|v|a|b|g + bias), decode_prep (q/k norm, RoPE, gates,
        ring write with eviction), window attention, the fused memory step, then three fused GEMVs
        (o_proj + residual, RMSNorm + gate|up + SiLU*mul, down + residual)."""
        c = self.config
        S, W, H, eps = st.sinks, st.window, c.num_heads, c.rms_norm_eps
        h = F.embedding(ids, self.w.embed)[0]
        for i, lw in enumerate(self.w.layers):
            k_cache, v_cache, beta_cache, alpha_cache, memory = st.layer(i)
            proj = ops.gemv(h, lw.w_in, lw.b_in, lw.ln_in, eps, None, False, False)
            q = ops.decode_prep(proj, self.inv_freq, st.pos, lw.q_norm, lw.k_norm, eps,
                                lw.a_log, lw.dt_bias, k_cache, v_cache, beta_cache, alpha_cache, S, W,
                                st.k_evict, st.v_evict, st.beta_evict, st.alpha_evict)
            attn = ops.swa_decode(q, k_cache, v_cache, st.pos, S, W, self.scale)
            if st.ahn:
                ops.gdn_decode(memory, q, st.k_evict, st.v_evict, st.beta_evict, st.alpha_evict,
                               proj[-H:], lw.o_norm, lw.ahn_o_proj, attn, st.pos, S, W, AHN_NORM_EPS)
            h = ops.gemv(attn.view(-1), lw.w_o, lw.b_o, None, 0.0, h, False, False)
            act = ops.gemv(h, lw.w_gu, None, lw.ln_post, eps, None, True, False)
            h = ops.gemv(act, lw.w_down, None, None, 0.0, h, False, False)
        return ops.gemv(h, self.w.lm_head, None, self.w.norm, eps, None, False, True)[None]

    def forward(self, st: State, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Tokens through the model. A single token takes the decode kernels, longer feeds the
        prefill path; both follow the same rule (tests check they agree)."""
        if ids.numel() == 1:
            st.ensure_capacity(st.position + 1)   # full mode: the decode kernels write slot `position`
            logits = self.decode_step(st, ids)
            st.advance(1)
            return logits
        return self.prefill(st, ids, last_only)
