"""The header of a benchmark run: what machine, what software, and two measurements of the card made in
the same run (device-to-device copy bandwidth, which the floor divides by, and matmul throughput, which
the prefill rows are compared with). Keys: bench/README.md, "Header"."""
from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

import ahn_rt.graph
from ahn_rt import ops
from timing import GiB, free_memory, per_call_ms

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """Short HEAD of the checkout, "+dirty" when tracked files differ from it; "unknown" without git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def driver_version() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def copy_bandwidth(dev: torch.device, nbytes: int, iters: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read + written (median of iters,
    after 3 untimed copies)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = statistics.median(per_call_ms(lambda: dst.copy_(src), iters, dev))
    del src, dst
    return 2 * nbytes / (ms / 1e3)


def matmul_flops(dev: torch.device, n: int, dtype: torch.dtype, iters: int) -> float:
    """FLOP/s of an n^3 matrix product (median of iters), on inputs rotated so none sits in L2."""
    xs = [torch.randn(n, n, device=dev, dtype=dtype) for _ in range(3)]
    for i in range(3):
        xs[i] @ xs[(i + 1) % 3]
    turn = itertools.count()

    def mm():
        i = next(turn) % 3
        xs[i] @ xs[(i + 1) % 3]

    ms = statistics.median(per_call_ms(mm, iters, dev))
    del xs
    return 2 * n ** 3 / (ms / 1e3)


def header(dev: torch.device, dtype: str, commit: str | None, command: str) -> dict:
    """The machine and the run: versions, commit, device, then the measured copy bandwidth (1 GiB, 50
    copies on CUDA) and matmul rate (8192^3 bf16 on CUDA). The caller adds the model and the floor."""
    h = dict(torch=torch.__version__, commit=commit or git_commit(), device=str(dev), dtype=dtype,
             ahn_rt_backend=ops.backend(), graphs=ahn_rt.graph.GRAPHS_ENABLED,
             date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=command,
             # every AHN_RT_* switch set for the run: an A/B's arms differ here, not in the command
             switches={k: v for k, v in sorted(os.environ.items()) if k.startswith("AHN_RT_")})
    try:
        import transformers
        h["transformers"] = transformers.__version__
    except ImportError:
        h["transformers"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        h.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / GiB, 1), sms=p.multi_processor_count,
                 driver=driver_version(), cuda=torch.version.cuda)
        bw_bytes, bw_iters, mm_n, mm_iters, mm_dtype = GiB, 50, 8192, 20, torch.bfloat16
    else:
        h.update(gpu=None, cpu=os.cpu_count(), driver=None, cuda=None)
        bw_bytes, bw_iters, mm_n, mm_iters, mm_dtype = 256 << 20, 5, 1024, 5, torch.float32
    h["copy_bytes"] = bw_bytes
    h["copy_GBps"] = copy_bandwidth(dev, bw_bytes, bw_iters) / 1e9
    h["matmul"] = f"{mm_n}^3 {str(mm_dtype).replace('torch.', '')}"
    h["matmul_TFLOPs"] = matmul_flops(dev, mm_n, mm_dtype, mm_iters) / 1e12
    free_memory(dev)
    return h
