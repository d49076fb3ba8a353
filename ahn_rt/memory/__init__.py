"""The AHN memory modules, one file each behind one interface (``base.Memory``; docs/semantics.md §11).

    from ahn_rt import memory
    mem = memory.get("Mamba2")        # by the config's _ahn_implementation, or by its short name "mamba2"

Registered: GatedDeltaNet (``gdn``), DeltaNet (``dn``), Mamba2 (``mamba2``). A new variant is a new file
here with a ``Memory`` subclass, one line in ``_ALL``, its training module in ``ahn_rt.train.memories``
and its float64 oracle in the tests.
"""
from __future__ import annotations

from ..errors import AhnError
from .base import GateField, Memory
from .deltanet import DeltaNet
from .gdn import GatedDeltaNet
from .mamba2 import Mamba2

_ALL = (GatedDeltaNet(), DeltaNet(), Mamba2())
MEMORIES: dict[str, Memory] = {m.name: m for m in _ALL}
NAMES = tuple(MEMORIES)
SHORT_NAMES = tuple(m.short for m in _ALL)
DEFAULT = "GatedDeltaNet"

__all__ = ["DEFAULT", "GateField", "MEMORIES", "Memory", "NAMES", "SHORT_NAMES", "get", "resolve"]


def resolve(name: str | None) -> str:
    """The official implementation name for ``name`` (official or short, any case); None -> DEFAULT."""
    if name is None:
        return DEFAULT
    for m in _ALL:
        if str(name) == m.name or str(name).lower() in (m.short, m.name.lower()):
            return m.name
    raise AhnError(f"AHN implementation {name!r} is not supported (supported: "
                   + ", ".join(f"{m.name} ({m.short})" for m in _ALL) + ")")


def get(name: str | None) -> Memory:
    return MEMORIES[resolve(name)]
