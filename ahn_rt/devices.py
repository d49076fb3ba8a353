"""The one reading of a device name: ``--device`` of every command (generate, serve, train, the benches) and
``device=`` of ``ahn_rt.load``, so that each refuses the same names with the same one-line AhnError."""
from __future__ import annotations

import torch

from .errors import AhnError


def _cuda_devices(n: int) -> str:
    return f"{n} CUDA device{'' if n == 1 else 's'} (" + ("cuda:0" if n == 1 else f"cuda:0 to cuda:{n - 1}") + ")"


def parse_device(device) -> torch.device:
    """``device`` (a name such as cpu, cuda, cuda:1, or a torch.device; None: cuda when available, else cpu)
    as a torch.device, or AhnError naming it and what exists: a name torch does not know, a type ahn_rt does
    not run on, a CPU index other than 0 (torch has one CPU device: cpu, also cpu:0), CUDA where torch sees
    none, a GPU index past the last one. cpu:0 comes back as cpu; cuda keeps no index (the current GPU)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise AhnError(f"unknown device {device!r}; use cpu or cuda[:N]") from None
    name = str(device) if isinstance(device, (str, torch.device)) else str(dev)
    if dev.type not in ("cpu", "cuda"):
        raise AhnError(f"device {name!r} is not supported; use cpu or cuda[:N]")
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise AhnError(f"device {name!r} does not exist: torch has one CPU device, cpu (also cpu:0); use cpu")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise AhnError(f"device {name!r} requested but CUDA is not available here (torch sees no GPU); use cpu")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise AhnError(f"device {name!r} does not exist: this machine has {_cuda_devices(n)}")
    return dev
