"""AHN-Mamba2: a per-head scalar-decay state space memory (docs/semantics.md §11.2).

Per layer: dt_proj and g_proj (d -> H, with bias) fused into the layer's input projection as rows [dt | g]
(their biases in the projection bias); one per-slot gate dt = softplus(dt_proj(x) + dt_bias) (float32),
computed when the token is first processed; the state M [H, Dk, Dv] float32 (the transpose of mamba's
[headdim, dstate] layout) under

    M <- exp(dt A) M + dt k^ v^T,   o = M^T q^,   A = -exp(A_log),  k^ = normalize(k),  q^ = normalize(q)

(no 1/sqrt(D) scale, no D skip), then an RMSNorm over the whole H*D vector of o * silu(z) and the grouped
o_proj. Decode runs the compiled ops (``decode_prep`` with its Mamba2 gate, ``mamba2_decode``: C++ on the
CPU, CUDA kernels on the GPU, captured in the decode graph like GatedDeltaNet's); prefill runs the compiled
chunk-local kernel (``mamba2_chunk_prep``) and the scan shared with GatedDeltaNet (``gdn_chunk_scan``, without
the delta correction), then the output head's gate and norm in torch and the grouped o_proj, all behind
``ahn_rt.ops``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import AHN_NORM_EPS, Config
from .base import GateField, Memory


class Mamba2(Memory):
    name = "Mamba2"
    short = "mamba2"

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
        o = self.ops.mamba2_chunk(q, k, v, gates["dt"], mw["a_log"], state)
        return self.ops.mamba2_output(o, z, mw["norm"], mw["o_proj"], AHN_NORM_EPS)

    def decode_front(self, dec, b, i, lw, proj):
        c, mw = dec.config, lw.mem
        # decode_prep's Mamba2 gate (dt_bias without a_log): dt = softplus(dt_proj(x) + dt_bias) into the
        # float32 gate field, the slot's old token handed to the eviction scratch first.
        return self.ops.decode_prep(proj, dec.inv_freq, b.pos, lw.q_norm, lw.k_norm, c.rms_norm_eps, None,
                                    mw["dt_bias"], b.k[i], b.v[i], None, b.gates["dt"][i], b.sinks, b.window,
                                    b.k_evict, b.v_evict, None, b.gate_evict["dt"], slots=b.slots)

    def decode_step(self, dec, b, i, lw, q, proj, attn):
        mw, H = lw.mem, dec.config.num_heads
        self.ops.mamba2_decode(b.memory[i], q, b.k_evict, b.v_evict, b.gate_evict["dt"], mw["a_log"], proj[:, -H:],
                               mw["norm"], mw["o_proj"], attn, b.pos, b.sinks, b.window, AHN_NORM_EPS, slots=b.slots)
