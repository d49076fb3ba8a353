"""Trainable AHN-Mamba2 (docs/semantics.md §11.2): the same function as ``ahn_rt.memory.Mamba2`` in a batch,
through the chunked scalar-decay scan ``chunk_scalar_decay`` (no per-token loop)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import AHN_NORM_EPS
from ..gla import chunk_scalar_decay
from .base import MemoryLayer, Weight, expand_heads, take

L2_EPS = 1e-12   # torch.nn.functional.normalize's default, as the official module uses it


class Mamba2Layer(MemoryLayer):
    """Parameters with the official names, in the official order (dt_bias, A_log, norm.weight [H*D],
    dt_proj.weight/.bias, g_proj.weight/.bias, o_proj.weight [H, D_in, D_out])."""
    NAME = "Mamba2"
    NO_DECAY = ("dt_bias", "A_log", "norm.weight", "dt_proj.bias", "g_proj.bias")

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, device=None):
        super().__init__()
        H, d, D = num_heads, hidden_size, head_dim
        kw = dict(device=device, dtype=torch.float32)
        self.dt_bias = nn.Parameter(torch.ones(H, **kw))
        self.A_log = nn.Parameter(torch.zeros(H, **kw))
        self.norm = Weight(torch.ones(H * D, **kw))
        self.dt_proj = nn.Linear(d, H, bias=True, **kw)
        self.g_proj = nn.Linear(d, H, bias=True, **kw)
        self.o_proj = Weight(torch.zeros(H, D, D, **kw))

    @torch.no_grad()
    def init_(self, generator=None):
        """The official initial values: A_log = log(1..H), dt_bias = 1, norm = 1 (the constructor's);
        dt_proj / g_proj weights N(0, 0.02) and biases 0 (the Hugging Face init of missing Linear weights);
        o_proj = 0. Draws on the CPU with ``generator``."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        H = self.A_log.shape[0]
        self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)).to(self.A_log.device))
        self.dt_bias.fill_(1.0)
        self.norm.weight.fill_(1.0)
        for lin in (self.dt_proj, self.g_proj):
            lin.weight.copy_((torch.randn(lin.weight.shape, generator=g) * 0.02).to(lin.weight.device))
            lin.bias.zero_()
        self.o_proj.weight.zero_()
        return self

    def forward(self, x, q, k, v, pairs):
        B, L, H, D = q.shape
        w = torch.cat([self.dt_proj.weight, self.g_proj.weight]).to(x.dtype)
        b = torch.cat([self.dt_proj.bias, self.g_proj.bias]).to(x.dtype)
        dt_raw, z = F.linear(x, w, b).chunk(2, dim=-1)                          # model dtype, bias included
        cf = torch.float64 if q.dtype == torch.float64 else torch.float32   # float64 only in the tests
        with torch.autocast(q.device.type, enabled=False):
            dt = F.softplus(dt_raw.to(cf) + self.dt_bias.to(cf))               # [B, L, H]
            dtw = take(dt, pairs.write)
            la = dtw * -self.A_log.to(cf).exp()                                 # log-decay dt * A
            # q^, k^ normalized in their own dtype (as the official module does on bf16 q/k), then float32
            kn = expand_heads(F.normalize(take(k, pairs.write), dim=-1, eps=L2_EPS), H).to(cf)
            qn = F.normalize(take(q, pairs.read), dim=-1, eps=L2_EPS).to(cf)
            vw = expand_heads(take(v, pairs.write), H).to(cf) * dtw[..., None]   # dt v
            if pairs.valid is not None:   # padded pairs: no write (v = 0) and no decay
                la, vw = la * pairs.valid, vw * pairs.valid[..., None]
            o, _ = chunk_scalar_decay(qn, kn, vw, la)
            dtype = q.dtype
            y = o.to(dtype).to(cf) * F.silu(take(z, pairs.read).to(cf))[..., None]   # o rounded to the model dtype
            y = y * torch.rsqrt(y.pow(2).mean(dim=(-2, -1), keepdim=True) + AHN_NORM_EPS) \
                * self.norm.weight.to(cf).view(H, D)
            m = torch.einsum("bnhi,hio->bnho", y.to(dtype), self.o_proj.weight.to(dtype))
        if pairs.valid is not None:
            m = m * pairs.valid[..., None].to(dtype)
        return m
