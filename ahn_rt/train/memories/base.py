"""The training side of the memory seam: one trainable ``MemoryLayer`` per decoder layer
(docs/semantics.md §10, §11).

A variant is an ``nn.Module`` whose parameters carry the official names (so ``named_parameters`` gives the
checkpoint keys ``model.layers.N.ahn.fn.<name>`` in the official order), float32 master weights, and:

* ``NAME``: the config's ``_ahn_implementation``; ``NO_DECAY``: parameter names that a weight decay
  should leave alone (decay rates, biases, norm weights);
* ``init_(generator)``: the official initial values, with o_proj = 0 (the student starts as sinks + window);
* ``init_long_decay_()`` (variants with a decay gate): start every head with a long memory instead (see
  ``long_decay_bias``);
* ``forward(x, q, k, v, pairs)``: the memory term of every (write, read) pair of the batch, [B, N, H, D]
  in the model dtype (0 for padded pairs), given the layer's prenormed hidden states x [B, L, d], its
  post-RoPE q [B, L, H, D] and k, v [B, L, Hkv, D]. The caller adds it to the attention output of the
  reading rows.

``pairs`` (``ahn_rt.train.model._Pairs``): write [B, N] and read [B, N] row indices, valid [B, N, 1] (0/1)
or None when every sequence has N pairs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...errors import AhnError

# --decay-init long: the heads' starting half-lives (tokens), log-spaced from the first to the last head.
LONG_HALF_LIVES = (64.0, 4096.0)


class Weight(nn.Module):
    """Holds one parameter named ``weight`` (so the state dict carries the official suffix)."""

    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(t)


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows idx [B, N] of t [B, L, ...] -> [B, N, ...]."""
    B, N = idx.shape
    return t.gather(1, idx.view(B, N, *([1] * (t.dim() - 2))).expand(B, N, *t.shape[2:]))


def expand_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """[B, N, Hkv, D] -> [B, N, H, D]: query head h reads kv head h // (H / Hkv)."""
    G = H // t.shape[2]
    return t.repeat_interleave(G, dim=2) if G > 1 else t


class MemoryLayer(nn.Module):
    NAME = ""
    NO_DECAY: tuple[str, ...] = ()

    def init_(self, generator: torch.Generator | None = None) -> "MemoryLayer":
        raise NotImplementedError

    @torch.no_grad()
    def init_long_decay_(self) -> "MemoryLayer":
        """dt_bias = ``long_decay_bias(A_log)`` for a variant whose log-decay is -exp(A_log) * softplus(. +
        dt_bias) (GatedDeltaNet, Mamba2); refused for one without a decay gate."""
        A_log, dt_bias = getattr(self, "A_log", None), getattr(self, "dt_bias", None)
        if A_log is None or dt_bias is None:
            raise AhnError(f"--decay-init long: the {self.NAME} memory has no decay gate; it applies to "
                           f"GatedDeltaNet and Mamba2")
        dt_bias.copy_(long_decay_bias(A_log).to(dt_bias.device))
        return self

    def forward(self, x, q, k, v, pairs) -> torch.Tensor:
        raise NotImplementedError


def long_decay_bias(A_log: torch.Tensor, half_lives=LONG_HALF_LIVES) -> torch.Tensor:
    """dt_bias for a memory that starts long: with a zero input to the decay projection, head h's log-decay
    per token, -exp(A_log[h]) * softplus(dt_bias[h]), is ln(1/2) / T_h, with the half-lives T_h log-spaced
    over ``half_lives`` (tokens). The official initializations forget within 1-50 tokens for most heads,
    far less than the distance between a token's eviction and a later read. Same dtype as A_log."""
    H = A_log.shape[0]
    lo, hi = half_lives
    T = torch.logspace(math.log10(lo), math.log10(hi), H, dtype=torch.float64) if H > 1 else \
        torch.tensor([math.sqrt(lo * hi)], dtype=torch.float64)
    sp = math.log(2.0) / (T * A_log.detach().to(torch.float64).cpu().exp())   # the softplus value
    return (sp + torch.log(-torch.expm1(-sp))).to(A_log.dtype)                # softplus^-1, exact for small sp
