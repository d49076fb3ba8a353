"""What a CUDA graph capture refuses, seen on the CPU: a tensor made from host data inside the captured
region (a Python scalar assigned by index, ``torch.tensor(...)``: on CUDA a host-to-device copy) or a value
read back to the host (``.item()``, ``bool(t)``, ``nonzero``: a sync). The graph path's Python code runs
under ``HostSpy`` on the CPU, where those ops show up by name, so CI catches them before a GPU run does."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_OPS = {
    "aten.lift_fresh.default": "a tensor made from host data",
    "aten.lift_fresh_copy.default": "a tensor made from host data",
    "aten._local_scalar_dense.default": "a value read back to the host",
    "aten.is_nonzero.default": "a value read back to the host",
    "aten.equal.default": "a value read back to the host",
    "aten.nonzero.default": "a shape that depends on the values (a sync)",
}


class HostSpy(TorchDispatchMode):
    """Records every op of ``HOST_OPS`` run inside the ``with`` block (``found``: 'op: why')."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        why = HOST_OPS.get(str(func))
        if why is not None:
            self.found.append(f"{func}: {why}")
        return func(*args, **(kwargs or {}))
