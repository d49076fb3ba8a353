"""Trainable AHN-DeltaNet (docs/semantics.md §11.1): GatedDeltaNet without its decay parameters. The update
is the delta rule with alpha = 0 at every pair, through ``chunk_gdn``; gates, read and output head as
GatedDeltaNet."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Weight
from .gdn import GatedDeltaNetLayer


class DeltaNetLayer(GatedDeltaNetLayer):
    """Parameters with the official names (b_proj.weight, g_proj.weight, o_norm.weight, o_proj.weight)."""
    NAME = "DeltaNet"
    NO_DECAY = ("o_norm.weight",)

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, device=None):
        nn.Module.__init__(self)
        H, d, D = num_heads, hidden_size, head_dim
        kw = dict(device=device, dtype=torch.float32)
        self.b_proj = nn.Linear(d, H, bias=False, **kw)
        self.g_proj = nn.Linear(d, H, bias=False, **kw)
        self.o_norm = Weight(torch.ones(D, **kw))
        self.o_proj = Weight(torch.zeros(H, D, D, **kw))   # [H, D_in, D_out]

    @torch.no_grad()
    def init_(self, generator=None):
        """The official initial values: b/g projections N(0, 0.02), o_norm = 1, o_proj = 0 (CPU draws)."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        for lin in (self.b_proj, self.g_proj):
            lin.weight.copy_((torch.randn(lin.weight.shape, generator=g) * 0.02).to(lin.weight.device))
        self.o_norm.weight.fill_(1.0)
        self.o_proj.weight.zero_()
        return self

    def write_gates(self, x: torch.Tensor):
        """beta = sigmoid(x Wb^T), alpha = 0 (no decay), z = x Wg^T."""
        b, z = F.linear(x, torch.cat([self.b_proj.weight, self.g_proj.weight]).to(x.dtype)).chunk(2, dim=-1)
        cf = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.sigmoid(b), torch.zeros(b.shape, dtype=cf, device=b.device), z
