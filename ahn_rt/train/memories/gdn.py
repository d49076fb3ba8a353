"""Trainable AHN-GatedDeltaNet (docs/semantics.md §4–§6, §10): the same function as
``ahn_rt.memory.GatedDeltaNet`` in a batch, through ``chunk_gdn``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import AHN_NORM_EPS
from ..gdn import chunk_gdn
from .base import MemoryLayer, Weight, expand_heads, take


class GatedDeltaNetLayer(MemoryLayer):
    """Parameters with the official names (A_log, D, dt_bias, a_proj.weight, b_proj.weight, g_proj.weight,
    o_norm.weight, o_proj.weight; docs/semantics.md §8). D is stored but unused (§4). Created zero; call
    ``init_`` or load a state dict."""
    NAME = "GatedDeltaNet"
    NO_DECAY = ("A_log", "dt_bias", "D", "o_norm.weight")

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
        self.o_norm = Weight(torch.ones(D, **kw))
        self.o_proj = Weight(torch.zeros(H, D, D, **kw))   # [H, D_in, D_out]

    @torch.no_grad()
    def init_(self, generator=None):
        """The official initial values (docs/semantics.md §10): A_log = log U(0, 16); dt_bias = softplus^-1
        of dt ~ logU[1e-3, 0.1] floored at 1e-4; D = 1; o_norm = 1; a/b/g projections N(0, 0.02); o_proj = 0.
        Draws on the CPU with ``generator`` (same values on every device)."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        H = self.A_log.shape[0]

        def put(p, t):
            p.copy_(t.to(p.device, p.dtype))

        put(self.A_log, torch.log((1 - torch.rand(H, generator=g)) * 16))   # (0, 16]: never log(0)
        dt = torch.exp(torch.rand(H, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        put(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))
        self.D.fill_(1.0)
        for lin in (self.a_proj, self.b_proj, self.g_proj):
            put(lin.weight, torch.randn(lin.weight.shape, generator=g) * 0.02)
        self.o_norm.weight.fill_(1.0)
        self.o_proj.weight.zero_()
        return self

    def gates(self, x: torch.Tensor):
        """(a, b, z) = x [Wa; Wb; Wg]^T in x's dtype: one small GEMM for the three projections."""
        w = torch.cat([self.a_proj.weight, self.b_proj.weight, self.g_proj.weight]).to(x.dtype)
        return F.linear(x, w).split(self.A_log.shape[0], dim=-1)

    def write_gates(self, x: torch.Tensor):
        """beta = sigmoid(x Wb^T), alpha = -exp(A_log) softplus(x Wa^T + dt_bias) (float32), z = x Wg^T."""
        a, b, z = self.gates(x)
        cf = torch.float64 if x.dtype == torch.float64 else torch.float32   # float64 only in the tests
        alpha = -self.A_log.to(cf).exp() * F.softplus(a.to(cf) + self.dt_bias.to(cf))
        return torch.sigmoid(b), alpha, z

    def forward(self, x, q, k, v, pairs):
        H = q.shape[2]
        beta, alpha, z = self.write_gates(x)
        kw, vw = expand_heads(take(k, pairs.write), H), expand_heads(take(v, pairs.write), H)
        bw, aw = take(beta, pairs.write), take(alpha, pairs.write)
        if pairs.valid is not None:   # padded pairs at the end: beta = alpha = 0 leaves the state unchanged
            bw, aw = bw * pairs.valid, aw * pairs.valid
        o, _ = chunk_gdn(take(q, pairs.read), kw, vw, bw, aw)
        dt = q.dtype
        cf = torch.float64 if dt == torch.float64 else torch.float32   # float64 only in the tests
        with torch.autocast(q.device.type, enabled=False):
            of = o.to(dt).to(cf)   # the memory read is rounded to the model dtype (§5)
            zf = take(z, pairs.read).to(cf)[..., None]
            y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + AHN_NORM_EPS) * self.o_norm.weight.to(cf) \
                * zf * torch.sigmoid(zf)
            m = torch.einsum("bnhi,hio->bnho", y.to(dt), self.o_proj.weight.to(dt))
        if pairs.valid is not None:
            m = m * pairs.valid[..., None].to(dt)
        return m
