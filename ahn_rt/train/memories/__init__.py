"""The trainable AHN memory modules, one file each behind one interface (``base.MemoryLayer``;
docs/semantics.md §10, §11). ``make_layer("Mamba2", d, H, D)`` (official or short name) builds one layer's
module; the runtime twin of each is in ``ahn_rt.memory``."""
from __future__ import annotations

from ...memory import resolve
from .base import MemoryLayer
from .deltanet import DeltaNetLayer
from .gdn import GatedDeltaNetLayer
from .mamba2 import Mamba2Layer

LAYERS: dict[str, type[MemoryLayer]] = {cls.NAME: cls for cls in (GatedDeltaNetLayer, DeltaNetLayer, Mamba2Layer)}

__all__ = ["DeltaNetLayer", "GatedDeltaNetLayer", "LAYERS", "Mamba2Layer", "MemoryLayer", "make_layer"]


def make_layer(implementation: str | None, hidden_size: int, num_heads: int, head_dim: int, device=None) -> MemoryLayer:
    """A fresh (uninitialized) memory layer of ``implementation`` (None: GatedDeltaNet)."""
    return LAYERS[resolve(implementation)](hidden_size, num_heads, head_dim, device=device)
