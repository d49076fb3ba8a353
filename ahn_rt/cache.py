"""The one place that owns the per-sequence state layout.

For every layer: keys and values ``[Hkv, C, D]`` (post-RoPE) in C = sinks + window slots — slots
``[0, S)`` hold the sink tokens, slots ``[S, S + W)`` a ring buffer where position ``p >= S`` lives in slot
``S + (p - S) % W`` (so positions below S + W sit in slot p); per-slot AHN gates ``beta [C, H]`` (model
dtype) and ``alpha [C, H]`` (float32) computed when the token was first processed; the GatedDeltaNet state
``[H, D, D]`` float32. All layers live in one layer-stacked buffer each. Allocated once per session: in
``ahn``/``swa`` modes the state never grows. In ``full`` mode the cache is a growing buffer (sinks 0,
window = capacity, capacity doubling when needed), i.e. plain causal attention.

The position is kept twice: ``position`` on the host (the session's bookkeeping) and ``pos`` as an int64
device tensor that the decode kernels read, so a captured CUDA graph serves every step.
"""
from __future__ import annotations

import warnings

import torch

from .config import Config

FULL_MIN_CAPACITY = 256


class State:
    def __init__(self, config: Config, device, capacity: int | None = None):
        self.config = config
        self.device = torch.device(device)
        c = config
        self.full = c.mode == "full"
        if self.full:
            self.sinks = 0
            self.capacity = max(FULL_MIN_CAPACITY, capacity or 0)
            self.window = self.capacity
        else:
            self.sinks, self.window = c.sinks, c.window
            self.capacity = c.sinks + c.window
        self.ahn = c.mode == "ahn"
        L, Hkv, D, H = c.num_layers, c.num_kv_heads, c.head_dim, c.num_heads
        kw = dict(device=self.device)
        self.k = torch.zeros(L, Hkv, self.capacity, D, dtype=c.dtype, **kw)
        self.v = torch.zeros_like(self.k)
        if self.ahn:
            self.beta = torch.zeros(L, self.capacity, H, dtype=c.dtype, **kw)
            self.alpha = torch.zeros(L, self.capacity, H, dtype=torch.float32, **kw)
            self.gdn = torch.zeros(L, H, D, D, dtype=torch.float32, **kw)
        else:
            self.beta = self.alpha = self.gdn = None
        # Scratch for the token handed from the ring to the memory during a decode step.
        self.k_evict = torch.zeros(Hkv, D, dtype=c.dtype, **kw)
        self.v_evict = torch.zeros(Hkv, D, dtype=c.dtype, **kw)
        self.beta_evict = torch.zeros(H, dtype=c.dtype, **kw) if self.ahn else None
        self.alpha_evict = torch.zeros(H, dtype=torch.float32, **kw) if self.ahn else None
        self.pos = torch.zeros(1, dtype=torch.int64, **kw)
        self.position = 0
        self._warned_positions = False

    # ---- layout ------------------------------------------------------------------------------
    def slot(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot of each absolute position (int64 tensor)."""
        S, W = self.sinks, self.window
        return torch.where(positions < S, positions, S + (positions - S) % W)

    def cached_positions(self) -> torch.Tensor:
        """Absolute position held by each valid slot [0, min(position, C)) before the next write."""
        P, S, W = self.position, self.sinks, self.window
        n = min(P, self.capacity)
        slots = torch.arange(n, dtype=torch.int64, device=self.device)
        if P <= S + W:
            return slots
        last = P - 1
        r = slots - S
        ring = last - torch.remainder(last - S - r, W)
        return torch.where(slots < S, slots, ring)

    def layer(self, i: int):
        """Views of layer i: (k [Hkv, C, D], v, beta [C, H] | None, alpha | None, gdn [H, D, D] | None)."""
        return (self.k[i], self.v[i], self.beta[i] if self.ahn else None,
                self.alpha[i] if self.ahn else None, self.gdn[i] if self.ahn else None)

    def ensure_capacity(self, total: int) -> bool:
        """Full mode: grow (doubling) so ``total`` positions fit. Returns True when buffers moved.
        Warns once per session when full attention goes past max_position_embeddings (AHN_SPEC §8);
        ahn/swa modes run any length without a word, as the official model does."""
        if not self.full:
            return False
        if total > self.config.max_position_embeddings and not self._warned_positions:
            self._warned_positions = True
            warnings.warn(f"full attention past max_position_embeddings ({self.config.max_position_embeddings}): "
                          "the base model was not trained for these positions; consider mode 'ahn'", stacklevel=3)
        if total <= self.capacity:
            return False
        new = self.capacity
        while new < total:
            new *= 2
        k = torch.zeros(*self.k.shape[:2], new, self.k.shape[3], dtype=self.k.dtype, device=self.device)
        v = torch.zeros_like(k)
        k[:, :, : self.capacity] = self.k
        v[:, :, : self.capacity] = self.v
        self.k, self.v = k, v
        self.capacity = self.window = new
        return True

    def advance(self, n: int):
        self.position += n
        self.pos.fill_(self.position)

    def reset(self):
        for t in (self.k, self.v, self.beta, self.alpha, self.gdn):
            if t is not None:
                t.zero_()
        self.position = 0
        self.pos.zero_()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.k, self.v, self.beta, self.alpha, self.gdn, self.k_evict, self.v_evict,
            self.beta_evict, self.alpha_evict, self.pos) if t is not None)
