"""AHN-DeltaNet: the GatedDeltaNet memory without its decay (docs/semantics.md §11.1).

The official module has b_proj, g_proj, o_norm and o_proj only; its update is the delta rule
M <- (I - beta k^ k^T) M + beta k^ v^T with the read, output gate and norm of GatedDeltaNet. That is exactly
GatedDeltaNet with a log-decay alpha = 0 at every step, and the loader encodes it so, bit for bit:

    A_log = -inf, dt_bias = 0, a rows of the fused projection = 0
    =>  alpha = -exp(-inf) * softplus(0 + 0) = -0.0 * log(2) = -0.0,  exp(alpha) = 1  (IEEE float32)

No 0 * inf is ever formed (the a projection of a finite x is exactly 0, softplus(0) is finite), so every
GatedDeltaNet path — the prefill chunk form, the C++ and CUDA decode_prep / gdn_decode kernels and the CUDA
graph — runs DeltaNet unchanged. Only the checkpoint key map, the loader and the initial values differ.
"""
from __future__ import annotations

import torch

from ..config import Config
from .base import GateField
from .gdn import GatedDeltaNet


class DeltaNet(GatedDeltaNet):
    name = "DeltaNet"
    short = "dn"

    def params(self, c: Config) -> dict[str, tuple]:
        H, d, D = c.num_heads, c.hidden_size, c.head_dim
        return {
            "b_proj.weight": (H, d),
            "g_proj.weight": (H, d),
            "o_norm.weight": (D,),
            "o_proj.weight": (H, D, D),   # [H, D_in, D_out]
        }

    def gate_fields(self, c: Config) -> dict[str, GateField]:
        return {"beta": GateField(float32=False, random=(0.05, 0.95)),
                "alpha": GateField(float32=True, random=(0.0, 0.0))}   # never a decay

    def load(self, c: Config, get):
        b = get("b_proj.weight")
        rows = torch.cat([torch.zeros_like(b), b, get("g_proj.weight")])
        H = c.num_heads
        mw = {"a_log": torch.full((H,), float("-inf"), dtype=torch.float32, device=b.device),
              "dt_bias": torch.zeros(H, dtype=torch.float32, device=b.device),
              "o_norm": get("o_norm.weight"), "o_proj": get("o_proj.weight")}
        return rows, None, mw
