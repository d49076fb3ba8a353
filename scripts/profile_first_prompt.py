"""Where the first prompt after ``load`` spends the time a warm one does not (torch.profiler, host and device).

    PYTHONPATH=. python scripts/profile_first_prompt.py --tokens 2048

Loads random weights of the preset (as bench/prefill_bench.py does, with its warm-up at load), then runs the
same N-token prompt three times in fresh sessions, each under the profiler: the first after load and two
warm ones. Prints the wall times, then the host ops and the device kernels whose time grew most from the
last warm run to the first, so the one-time work shows by name.
"""
import argparse
import time

import torch

from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict
from profile_common import kernel_rows   # scripts/ (this script's folder)


def host_rows(prof) -> dict:
    """{host op name: (self CPU time in us, calls)}."""
    return {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2.5-3b")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=15)
    args = ap.parse_args()
    cfg_dict = preset_config(args.preset, True, torch.bfloat16)
    t = time.perf_counter()
    model = from_state_dict(cfg_dict, random_state_dict(cfg_dict, device="cuda"), window=32640, sinks=128,
                            dtype="bf16", device="cuda")
    torch.cuda.synchronize()
    print(f"load (random weights, warm-up included): {time.perf_counter() - t:.2f} s")
    ids = torch.randint(0, model.config.vocab_size, (args.tokens,), device="cuda")
    runs = []
    for label in ("first", "warm 1", "warm 2"):
        s = model.new_session()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            s.forward(ids, last_only=True)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        runs.append((label, wall, host_rows(prof), kernel_rows(prof, cut=("(", "<"), width=70)))
        del s
    print(" | ".join(f"{label}: {wall * 1e3:.1f} ms (under the profiler)" for label, wall, _, _ in runs))
    (_, _, h_first, k_first), (_, _, h_warm, k_warm) = runs[0], runs[-1]
    for title, first, warm in (("host ops (self CPU us)", h_first, h_warm), ("kernels (device us)", k_first, k_warm)):
        grew = sorted(((first[n][0] - warm.get(n, (0.0, 0))[0], n) for n in first), reverse=True)[:args.rows]
        print(f"\n{title}: first - warm, first, warm, calls first / warm")
        for d, n in grew:
            w = warm.get(n, (0.0, 0))
            print(f"  {d:10.0f} {first[n][0]:10.0f} {w[0]:10.0f}  {first[n][1]:5d}/{w[1]:<5d} {n[:70]}")


if __name__ == "__main__":
    main()
