"""Bit-for-bit A/B of the CUDA ops a kernel change should leave unchanged: run ``save`` in two built trees
(each with its own ``PYTHONPATH``), then ``compare`` their files.

    (cd OLD && PYTHONPATH=$PWD python scripts/ab_outputs.py save /tmp/old.pt)
    (cd NEW && PYTHONPATH=$PWD python scripts/ab_outputs.py save /tmp/new.pt)
    python scripts/ab_outputs.py compare /tmp/old.pt /tmp/new.pt     # exit 1 when any output differs

``save`` runs fixed random inputs (seeded on the GPU) through ``ops.gemv`` (norm + bias, fp32 out, residual,
SiLU, ``x_add``, plain; batch 1 .. 40; the 3B layer's shapes, the LM head and an odd shape; bf16 and fp16) and
through the memories' chunked prefill (``gdn_chunk``, ``mamba2_chunk``: outputs and final states; float32,
bf16, fp16; head dims 128, 96, 64, 32; token counts with partial chunks). A refactor that claims "the same
bits" must give ``compare``'s "all equal".
"""
from __future__ import annotations

import argparse
import sys

import torch

GEMV_SHAPES = {"qkv": (2048, 2608), "o": (2048, 2048), "gate_up": (2048, 22016), "down": (11008, 2048),
               "odd": (1000, 300), "lm_head": (2048, 151936)}   # name: (K, N)
BATCHES = (1, 2, 3, 8, 16, 17, 32, 40)
MEMORY_SHAPES = ((128, 16, 2, 8192), (128, 4, 1, 4095), (96, 6, 3, 1000), (64, 5, 1, 130), (32, 2, 2, 64))  # D, H, Hkv, n


def save(path: str) -> None:
    from ahn_rt import ops

    g = torch.Generator(device="cuda").manual_seed(0)

    def rn(*shape, dt=torch.bfloat16):
        return torch.randn(*shape, generator=g, device="cuda").to(dt)

    def ru(*shape):
        return torch.rand(*shape, generator=g, device="cuda")

    out = {}
    for dt in (torch.bfloat16, torch.float16):
        for name, (K, N) in GEMV_SHAPES.items():
            W = rn(N, K, dt=dt) * K ** -0.5
            nw = 1 + 0.1 * rn(K, dt=dt)
            bias = rn(N, dt=dt)
            for B in BATCHES:
                if name == "lm_head" and B not in (1, 16):
                    continue
                x = rn(B, K, dt=dt)
                calls = {
                    "norm": lambda: ops.gemv(x, W, bias, nw, 1e-6, None, False, name == "lm_head", True),
                    "silu": lambda: ops.gemv(x, W, None, nw, 1e-6, None, True, False, True),
                    "xadd": lambda: ops.gemv(x, W, None, None, 0.0, rn(B, N, dt=dt), False, False, True,
                                             x_add=rn(B, K, dt=dt)),
                    "plain": lambda: ops.gemv(x, W, None, None, 0.0, None, False, False, False),
                }
                if N == 2048:   # o_proj and down: residual rows of the output's width
                    calls["res"] = lambda: ops.gemv(x, W, None, None, 0.0, rn(B, N, dt=dt), False, False, True)
                for opt, call in calls.items():
                    out[f"gemv/{dt}/{name}/{B}/{opt}"] = call().cpu()
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for D, H, Hkv, n in MEMORY_SHAPES:
            q, k, v = rn(n, H, D, dt=dt), rn(n, Hkv, D, dt=dt), rn(n, Hkv, D, dt=dt)
            beta, alpha = ru(n, H).to(dt), -ru(n, H) * 0.1
            state = torch.randn(H, D, D, generator=g, device="cuda") * 0.1
            s = state.clone()
            out[f"gdn/{dt}/{D}/{n}"] = ops.gdn_chunk(q, k, v, beta, alpha, s).cpu()
            out[f"gdn_state/{dt}/{D}/{n}"] = s.cpu()
            dt_m2, a_log = ru(n, H) * 0.1, ru(H)
            s = state.clone()
            out[f"mamba2/{dt}/{D}/{n}"] = ops.mamba2_chunk(q, k, v, dt_m2, a_log, s).cpu()
            out[f"mamba2_state/{dt}/{D}/{n}"] = s.cpu()
    torch.save(out, path)
    print(f"saved {len(out)} outputs to {path}")


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    if a.keys() != b.keys():
        print(f"the files hold different outputs ({len(a)} and {len(b)}): run both with the same script")
        return 1
    differ = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8))]
    print(f"bit for bit: {len(a) - len(differ)} of {len(a)} equal" + ("" if differ else " (all equal)"))
    for k in differ[:20]:
        d = (a[k].float() - b[k].float()).abs().max().item() if a[k].shape == b[k].shape else float("nan")
        print(f"  differs: {k} (max abs difference {d:.3g})")
    return 1 if differ else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("save", help="run the ops, save their outputs").add_argument("path")
    c = sub.add_parser("compare", help="compare two saved files bit for bit")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "save":
        if not torch.cuda.is_available():
            print("error: ab_outputs.py save needs a CUDA GPU", file=sys.stderr)
            return 2
        save(args.path)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
