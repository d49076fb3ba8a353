"""The training side of the memory seam: one trainable ``MemoryLayer`` per decoder layer
(docs/semantics.md §10, §11).

A variant is an ``nn.Module`` whose parameters carry the official names (so ``named_parameters`` gives the
checkpoint keys ``model.layers.N.ahn.fn.<name>`` in the official order), float32 master weights, and:

* ``NAME``: the config's ``_ahn_implementation``; ``NO_DECAY``: parameter names that a weight decay
  should leave alone (decay rates, biases, norm weights);
* ``init_(generator)``: the official initial values, with o_proj = 0 (the student starts as sinks + window);
* ``forward(x, q, k, v, pairs)``: the memory term of every (write, read) pair of the batch, [B, N, H, D]
  in the model dtype (0 for padded pairs), given the layer's prenormed hidden states x [B, L, d], its
  post-RoPE q [B, L, H, D] and k, v [B, L, Hkv, D]. The caller adds it to the attention output of the
  reading rows.

``pairs`` (``ahn_rt.train.model._Pairs``): write [B, N] and read [B, N] row indices, valid [B, N, 1] (0/1)
or None when every sequence has N pairs.
"""
from __future__ import annotations

import torch
import torch.nn as nn


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

    def forward(self, x, q, k, v, pairs) -> torch.Tensor:
        raise NotImplementedError
