"""The memory-module seam: everything the runtime needs from one AHN memory variant (docs/semantics.md §11).

The decoder, the State, the loader and ``init_weights`` only ever talk to a ``Memory``; they never name a
variant. A variant is one subclass in its own file of this package, registered in ``ahn_rt.memory``:

* identity: ``name`` (the config's ``_ahn_implementation``) and ``short`` (the CLI name, ``--ahn``);
* checkpoint: ``params(c)`` (official parameter name -> shape, per layer: the key map of §8) and
  ``random_param`` (the values ``init_weights`` writes);
* layout: ``proj_rows(c)`` (the rows the memory adds to the layer's fused input projection: its per-token
  projections of the prenormed hidden state x), ``load(c, get)`` (those rows, their bias, and the layer's
  other memory tensors in runtime layout), ``gate_fields(c)`` (the per-token values computed when a token is
  first processed and kept in its ring slot until it is evicted, §4 / §7) and ``state_shape(c)`` (the
  per-layer float32 memory);
* math: ``gates`` (prefill: the projection tail -> the gates of every token and the output gate z),
  ``prefill`` (n (write, read) pairs through the memory and its output head, the state updated in place),
  ``decode_front`` (one decoded token: q/k norm + RoPE, the ring write that hands the slot's old token
  to the eviction scratch, the new token's gates) and ``decode_step`` (that token's memory step, added
  into the attention output; a no-op while pos < S + W). Both take a ``cache.DecodeBatch`` (proj [B, P],
  the layer's tensors over the batch's storage entries and ``slots``: every row in one kernel) and run
  without a host sync, so the CUDA decode graph captures them (``ahn_rt.graph``).

Hot math goes through ``ahn_rt.ops`` (the one backend switch), whose references live in ``ahn_rt.ref``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch

from ..config import Config


@dataclasses.dataclass(frozen=True)
class GateField:
    """One per-token value kept per ring slot, ``[C, H]`` per layer. ``float32``: stored in float32, else in
    the model dtype. ``random``: the (low, high) range ``State.fill_random`` draws it from."""
    float32: bool
    random: tuple[float, float]


# The loader's accessor: official parameter name (e.g. "b_proj.weight") -> tensor in the runtime dtype
# on the model's device.
Getter = Callable[[str], torch.Tensor]


class Memory:
    name: str = ""
    short: str = ""

    # ---- checkpoint --------------------------------------------------------------------------
    def params(self, c: Config) -> dict[str, tuple]:
        raise NotImplementedError

    def random_param(self, name: str, shape: tuple, c: Config, normal, generator, device) -> torch.Tensor:
        """float32 values of parameter ``name`` for a random checkpoint (``init_weights``): the official
        initial values, except that o_proj is random (so the memory is exercised). ``normal(shape, std)``
        draws N(0, std) from ``generator``."""
        raise NotImplementedError

    # ---- layout ------------------------------------------------------------------------------
    def proj_rows(self, c: Config) -> int:
        raise NotImplementedError

    def gate_fields(self, c: Config) -> dict[str, GateField]:
        raise NotImplementedError

    def state_shape(self, c: Config) -> tuple:
        return (c.num_heads, c.head_dim, c.head_dim)

    def load(self, c: Config, get: Getter):
        """(rows [proj_rows, d], bias [proj_rows] or None, weights: dict name -> tensor)."""
        raise NotImplementedError

    # ---- math --------------------------------------------------------------------------------
    @functools.cached_property
    def ops(self):
        """The runtime's ops (``ahn_rt.ops``), imported at first use (once): the training path reads this
        registry's names and shapes without loading the compiled extension or the decode state."""
        from .. import ops
        return ops

    def gates(self, tail: torch.Tensor, mw: dict):
        """tail: [T, proj_rows] (the projection rows after q | k | v) -> ({field: [T, H]}, z [T, H])."""
        raise NotImplementedError

    def prefill(self, q, k, v, gates: dict, z, state, mw: dict) -> torch.Tensor:
        """n pairs: q [n, H, D] (reading tokens), k, v [n, Hkv, D] and gates {field: [n, H]} (written tokens),
        z [n, H] (reading tokens); state [*state_shape] float32, updated in place. Returns the memory
        term m [n, H, D] in the model dtype, to be added to the attention output of the reading rows."""
        raise NotImplementedError

    def decode_front(self, dec, b, i: int, lw, proj: torch.Tensor) -> torch.Tensor:
        """Layer i of one decoded token per row of the batch ``b`` (a ``DecodeBatch``): proj [B, P] (the fused projection, biases added)
        -> q [B, H, D] after norm + RoPE; writes k, v and the gates into each row's ring slot, handing the
        slot's old token to the eviction scratch (k_evict / v_evict / gate_evict) first when pos >= S + W."""
        raise NotImplementedError

    def decode_step(self, dec, b, i: int, lw, q: torch.Tensor, proj: torch.Tensor, attn: torch.Tensor) -> None:
        """The memory step of each row's decoded token (write the evicted token, read with q, output head
        with the gate from proj), added into attn [B, H, D] in place; nothing for a row with pos < S + W."""
        raise NotImplementedError
