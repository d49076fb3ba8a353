"""The one reading of a device name: ``--device`` of every command (generate, serve, train, the benches) and
``device=`` of ``ahn_rt.load``, so that each refuses the same names with the same one-line AhnError."""
from __future__ import annotations

import os

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


# The caching allocator's settings variables: PYTORCH_ALLOC_CONF, and its older name, which torch still reads.
_ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def prefer_expandable_segments(environ=None) -> bool:
    """Training's allocator setting: expandable segments, unless the user set the allocator's variables
    (then theirs stand). A training step frees and reallocates activations of many sizes; in fixed
    segments a long step fragments the cache (the 3B shape at 8192 tokens with ``memory`` checkpointing:
    6,484 tokens/s in fixed segments, 7,335 expandable, on one H100; bench/README.md). Takes effect only
    before the process's first CUDA allocation: call it first thing in a command's ``main``, never from a
    library function. Returns whether it set the variable."""
    env = os.environ if environ is None else environ
    if allocator_setting(env) is not None:
        return False
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return True


def allocator_setting(environ=None) -> str | None:
    """The caching allocator's setting as ``VAR=value`` (the variable torch reads first), or None (its
    defaults)."""
    env = os.environ if environ is None else environ
    return next((f"{k}={env[k]}" for k in _ALLOC_CONF_VARS if env.get(k)), None)


def free_bytes(device, swap: bool = False) -> int | None:
    """Memory free for new tensors on ``device``: the GPU's free memory, or on the CPU the machine's available
    RAM (Linux's MemAvailable; with ``swap``, plus SwapFree: what can be had at all, slowly), or None where it
    cannot be read. On the CPU the kernel hands out address space it may not have (overcommit): an allocation
    beyond this succeeds, and zeroing it gets the process killed without a word, so a large one checks first."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        free = info["MemAvailable"] + (info.get("SwapFree", 0) if swap else 0)
    except (OSError, KeyError, ValueError, IndexError):
        try:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    room = _cgroup_room()   # a container's limit: /proc/meminfo shows the host's memory
    return free if room is None else min(free, room)


def _cgroup_room() -> int | None:
    """What this process's memory cgroup still lets it allocate (its limit less its usage; cgroup v2, else v1),
    or None where there is no limit or it cannot be read."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f:
                text = f.read().strip()
            if text == "max":
                return None
            with open(usage) as f:
                cap, used = int(text), int(f.read().strip())
        except (OSError, ValueError):
            continue
        return None if cap >= 1 << 60 else max(0, cap - used)   # v1 writes "no limit" as a huge number
    return None
