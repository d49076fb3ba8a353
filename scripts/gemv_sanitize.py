"""One call of each ahn_rt.gemv CUDA path, for compute-sanitizer (memcheck / racecheck): the tensor-core
kernel (bf16, fp16) at 1, 5, 12, 20 and 37 rows (one, two and four column tiles, two launch groups; the
normalized x staged in shared memory where it fits, and at 1 and 5 rows also with AHN_RT_GEMV_X_UNSTAGED=1); the
SIMT kernel (fp32, and bf16 / fp16 with AHN_RT_GEMV_SIMT=1) at 1, 2, 3, 5, 12, 20 and 37 rows (every batch
bucket; K = 11008 and 18944 at 12 or more rows stage x piece by piece); vector and scalar weight / x loads,
SiLU pairs, bias / residual / float32 output. Every case without SiLU also runs with x_add (both kernels'
XADD instances): x_add at x's offset and one element further (with an aligned x: a misaligned x_add,
element-wise loads of both).
    compute-sanitizer --tool memcheck python3 scripts/gemv_sanitize.py
"""
import argparse

argparse.ArgumentParser(description=__doc__,   # no options; --help prints the docstring
                        formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

import os  # noqa: E402

import torch  # noqa: E402

import ahn_rt._C  # noqa: E402, F401

dev = "cuda"
cases = [(2048, 129, False, 0), (7, 3, False, 0), (2048, 258, True, 0), (2048, 65, False, 3),
         (11008, 31, False, 0), (18944, 6, True, 0), (64, 2048, False, 1)]
runs = [("0", "0", torch.bfloat16, (1, 5, 12, 20, 37)), ("0", "1", torch.bfloat16, (1, 5)),
        ("0", "0", torch.float16, (1, 9)), ("0", "0", torch.float32, (1, 2, 12)),
        ("1", "0", torch.bfloat16, (1, 3, 5, 12, 20, 37)), ("1", "0", torch.float16, (1, 9))]
for simt, unstaged, dt, rows in runs:
    os.environ["AHN_RT_GEMV_SIMT"] = simt
    os.environ["AHN_RT_GEMV_X_UNSTAGED"] = unstaged
    for K, N, silu, off in cases:
        for B in rows:
            x = torch.randn(B * K + off, device=dev, dtype=dt)[off:].view(B, K)
            w = torch.randn(N * K + off, device=dev, dtype=dt)[off:].view(N, K)
            n_out = N // 2 if silu else N
            out = torch.ops.ahn_rt.gemv(x, w, torch.randn(N, device=dev, dtype=dt),
                                        torch.rand(K, device=dev, dtype=dt), 1e-6,
                                        torch.randn(B, n_out, device=dev, dtype=dt), silu, off == 1)
            if not silu:  # x_add: x's strides, no norm_weight (refused), vector and element-wise loads
                for a_off in (off, off + 1):
                    x_add = torch.randn(B * K + a_off, device=dev, dtype=dt)[a_off:].view(B, K)
                    out = torch.ops.ahn_rt.gemv(x, w, torch.randn(N, device=dev, dtype=dt), None, 0.0,
                                                torch.randn(B, n_out, device=dev, dtype=dt), False, off == 1,
                                                False, x_add)
torch.cuda.synchronize()
print("ok")
