"""AHN-GatedDeltaNet, the memory of the released AHN-GDN models (docs/semantics.md §4–§6).

Per layer: a_proj, b_proj, g_proj (d -> H, no bias) fused into the layer's input projection as rows
[a | b | g]; per-slot gates beta (model dtype) and alpha (float32 log-decay); the state [H, Dk, Dv] float32
under the gated delta rule; per-head RMSNorm * swish(z) output and the grouped o_proj. Every step runs
through the compiled ops (``decode_prep``, ``gdn_decode``) and their references.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import AHN_NORM_EPS, Config
from .base import GateField, Memory


class GatedDeltaNet(Memory):
    name = "GatedDeltaNet"
    short = "gdn"

    def params(self, c: Config) -> dict[str, tuple]:
        H, d, D = c.num_heads, c.hidden_size, c.head_dim
        return {
            "A_log": (H,),
            "D": (H,),                    # stored by the official module, unused in its forward (§4)
            "dt_bias": (H,),
            "a_proj.weight": (H, d),
            "b_proj.weight": (H, d),
            "g_proj.weight": (H, d),
            "o_norm.weight": (D,),
            "o_proj.weight": (H, D, D),   # [H, D_in, D_out]
        }

    def random_param(self, name, shape, c, normal, generator, device):
        H, g = c.num_heads, generator
        if name == "A_log":
            return torch.log(torch.rand(H, generator=g, device=device) * 15 + 1)      # log U(1, 16)
        if name == "D":
            return torch.ones(H, device=device)
        if name == "dt_bias":   # softplus^-1 of dt ~ logUniform[1e-3, 0.1], floored at 1e-4
            dt = torch.exp(torch.rand(H, generator=g, device=device) * (math.log(0.1) - math.log(1e-3))
                           + math.log(1e-3)).clamp(min=1e-4)
            return dt + torch.log(-torch.expm1(-dt))
        if name == "o_norm.weight":
            return 1.0 + normal(shape, 0.05)
        if name == "o_proj.weight":
            return normal(shape, c.head_dim ** -0.5)
        return normal(shape)

    # ---- layout ------------------------------------------------------------------------------
    def proj_rows(self, c: Config) -> int:
        return 3 * c.num_heads          # [a | b | g]

    def gate_fields(self, c: Config) -> dict[str, GateField]:
        return {"beta": GateField(float32=False, random=(0.05, 0.95)),
                "alpha": GateField(float32=True, random=(-0.5, -0.01))}

    def load(self, c: Config, get):
        rows = torch.cat([get("a_proj.weight"), get("b_proj.weight"), get("g_proj.weight")])
        # The official merge rounds every AHN tensor to the model dtype (§8); the decay parameters are
        # then used in float32.
        mw = {"a_log": get("A_log").float(), "dt_bias": get("dt_bias").float(),
              "o_norm": get("o_norm.weight"), "o_proj": get("o_proj.weight")}
        return rows, None, mw

    # ---- math --------------------------------------------------------------------------------
    def gates(self, tail, mw):
        """beta = sigmoid(b) (model dtype), alpha = -exp(A_log) softplus(a + dt_bias) (float32), z."""
        H = mw["a_log"].numel()
        a, b, z = tail[:, :H], tail[:, H:2 * H], tail[:, 2 * H:3 * H]
        alpha = -mw["a_log"].exp() * F.softplus(a.float() + mw["dt_bias"])
        return {"beta": torch.sigmoid(b), "alpha": alpha}, z

    def prefill(self, q, k, v, gates, z, state, mw):
        o = self.ops.gdn_chunk(q, k, v, gates["beta"], gates["alpha"], state)
        return self.ops.gdn_output(o, z, mw["o_norm"], mw["o_proj"], AHN_NORM_EPS)

    def decode_front(self, dec, b, i, lw, proj):
        c, mw = dec.config, lw.mem
        return self.ops.decode_prep(proj, dec.inv_freq, b.pos, lw.q_norm, lw.k_norm, c.rms_norm_eps,
                                    mw["a_log"], mw["dt_bias"], b.k[i], b.v[i], b.gates["beta"][i],
                                    b.gates["alpha"][i], b.sinks, b.window, b.k_evict, b.v_evict,
                                    b.gate_evict["beta"], b.gate_evict["alpha"], slots=b.slots)

    def decode_step(self, dec, b, i, lw, q, proj, attn):
        mw, H = lw.mem, dec.config.num_heads
        self.ops.gdn_decode(b.memory[i], q, b.k_evict, b.v_evict, b.gate_evict["beta"], b.gate_evict["alpha"],
                            proj[:, -H:], mw["o_norm"], mw["o_proj"], attn, b.pos, b.sinks, b.window, AHN_NORM_EPS,
                            slots=b.slots)
