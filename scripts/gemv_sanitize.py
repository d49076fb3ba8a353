"""One call of each ahn_rt.gemv CUDA path, for compute-sanitizer (memcheck / racecheck): vector and scalar
GEMV paths, vector and scalar staging, SiLU pairs, bias / residual / float32 output, opt-in shared memory.
    compute-sanitizer --tool memcheck python3 scripts/gemv_sanitize.py
"""
import torch

import ahn_rt._C  # noqa: F401

dt, dev = torch.bfloat16, "cuda"
for K, N, silu, off in [(2048, 129, False, 0), (7, 3, False, 0), (2048, 258, True, 0), (2048, 65, False, 3),
                        (11008, 31, False, 0), (18944, 6, True, 0), (64, 2048, False, 1)]:
    x = torch.randn(K + off, device=dev, dtype=dt)[off:]
    w = torch.randn(N * K + off, device=dev, dtype=dt)[off:].view(N, K)
    n_out = N // 2 if silu else N
    out = torch.ops.ahn_rt.gemv(x, w, torch.randn(N, device=dev, dtype=dt), torch.rand(K, device=dev, dtype=dt),
                                1e-6, torch.randn(n_out, device=dev, dtype=dt), silu, off == 1)
torch.cuda.synchronize()
print("ok")
