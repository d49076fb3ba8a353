"""AHN-Mamba2: a per-head scalar-decay state space memory (docs/semantics.md §11.2).

Per layer: dt_proj and g_proj (d -> H, with bias) fused into the layer's input projection as rows [dt | g]
(their biases in the projection bias); one per-slot gate dt = softplus(dt_proj(x) + dt_bias) (float32),
computed when the token is first processed; the state M [H, Dk, Dv] float32 (the transpose of mamba's
[headdim, dstate] layout) under

    M <- exp(dt A) M + dt k^ v^T,   o = M^T q^,   A = -exp(A_log),  k^ = normalize(k),  q^ = normalize(q)

(no 1/sqrt(D) scale, no D skip), then an RMSNorm over the whole H*D vector of o * silu(z) and the grouped
o_proj. The math is in ``ahn_rt.ref`` (``mamba2_chunk_ref``, ``mamba2_decode_ref``, ``mamba2_output_ref``)
behind ``ahn_rt.ops``; there are no compiled Mamba2 kernels yet, so the decode step is not CUDA-graph
safe (its reference reads the position on the host) and decodes eagerly on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..config import AHN_NORM_EPS, Config
from .base import GateField, Memory


class Mamba2(Memory):
    name = "Mamba2"
    short = "mamba2"
    graph_safe = False   # ops.mamba2_decode runs its reference (a host read of pos) until a kernel exists
    batched = False      # its decode_front / decode_step take one State (per row of a batch)

    def params(self, c: Config) -> dict[str, tuple]:
        H, d, D = c.num_heads, c.hidden_size, c.head_dim
        return {   # in the official module's registration order
            "dt_bias": (H,),
            "A_log": (H,),
            "norm.weight": (H * D,),
            "dt_proj.weight": (H, d),
            "dt_proj.bias": (H,),
            "g_proj.weight": (H, d),
            "g_proj.bias": (H,),
            "o_proj.weight": (H, D, D),   # [H, D_in, D_out]
        }

    def random_param(self, name, shape, c, normal, generator, device):
        H, g = c.num_heads, generator
        if name == "A_log":            # the constructor: A = 1..H; drawn here so that heads differ randomly
            return torch.log(torch.rand(H, generator=g, device=device) * (H - 1) + 1)
        if name == "dt_bias":          # near the constructor's 1
            return 1.0 + normal(shape, 0.3)
        if name == "norm.weight":
            return 1.0 + normal(shape, 0.05)
        if name.endswith(".bias"):
            return normal(shape, 0.1)
        if name == "o_proj.weight":
            return normal(shape, c.head_dim ** -0.5)
        return normal(shape)

    # ---- layout ------------------------------------------------------------------------------
    def proj_rows(self, c: Config) -> int:
        return 2 * c.num_heads          # [dt | g]

    def gate_fields(self, c: Config) -> dict[str, GateField]:
        return {"dt": GateField(float32=True, random=(0.001, 0.1))}

    def load(self, c: Config, get):
        rows = torch.cat([get("dt_proj.weight"), get("g_proj.weight")])
        bias = torch.cat([get("dt_proj.bias"), get("g_proj.bias")])
        mw = {"a_log": get("A_log").float(), "dt_bias": get("dt_bias").float(),
              "norm": get("norm.weight"), "o_proj": get("o_proj.weight")}
        return rows, bias, mw

    # ---- math --------------------------------------------------------------------------------
    def gates(self, tail, mw):
        """dt = softplus(dt_proj(x) + dt_bias) in float32 (dt_proj(x), bias included, in the model dtype), z."""
        H = mw["a_log"].numel()
        return {"dt": F.softplus(tail[:, :H].float() + mw["dt_bias"])}, tail[:, H:2 * H]

    def prefill(self, q, k, v, gates, z, state, mw):
        o = ops.mamba2_chunk(q, k, v, gates["dt"], mw["a_log"], state)
        return ops.mamba2_output(o, z, mw["norm"], mw["o_proj"], AHN_NORM_EPS)

    def decode_front(self, dec, st, i, lw, proj):
        c, mw = dec.config, lw.mem
        S, W, H = st.sinks, st.window, c.num_heads
        k_cache, v_cache, dt_cache = st.k[i], st.v[i], st.gates["dt"][i]
        # The slot of pos (docs/semantics.md §7) as a device tensor: no host sync.
        pos = st.pos
        slot = torch.where(pos < S, pos, S + torch.remainder(pos - S, W))
        # Hand the slot's old token (position pos - W once pos >= S + W) to the memory before the ring write
        # below overwrites it; before that the copies are never read.
        st.k_evict.copy_(k_cache.index_select(1, slot)[:, 0])
        st.v_evict.copy_(v_cache.index_select(1, slot)[:, 0])
        st.gate_evict["dt"].copy_(dt_cache.index_select(0, slot)[0])
        # q/k norm + RoPE and the k/v ring write: the ungated decode_prep over [q | k | v].
        v_end = dec.v_end
        q = ops.decode_prep(proj[:v_end], dec.inv_freq, pos, lw.q_norm, lw.k_norm, c.rms_norm_eps,
                            None, None, k_cache, v_cache, None, None, S, W, st.k_evict, st.v_evict, None, None)
        dt = F.softplus(proj[v_end:v_end + H].float() + mw["dt_bias"])
        dt_cache.index_copy_(0, slot, dt[None])
        return q

    def decode_step(self, dec, st, i, lw, q, proj, attn):
        mw, H = lw.mem, dec.config.num_heads
        ops.mamba2_decode(st.memory[i], q, st.k_evict, st.v_evict, st.gate_evict["dt"], mw["a_log"], proj[-H:],
                          mw["norm"], mw["o_proj"], attn, st.pos, st.sinks, st.window, AHN_NORM_EPS)
