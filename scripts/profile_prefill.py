"""Per-kernel breakdown of one prefill chunk at a depth (torch.profiler), for the notes.

    PYTHONPATH=. python scripts/profile_prefill.py --tokens 100 --context 32768    # a short chunk after a hit
    PYTHONPATH=. python scripts/profile_prefill.py --tokens 8192 --context 65536   # a steady long-prompt chunk

The state is stood at --context (``State.fill_random``), then ``Decoder.prefill`` runs --tokens tokens on a
copy of it (warm-up runs first, then one profiled run). Prints the wall time, the host time the launches
take, the kernel count and the kernels by device time, grouped by name.
"""
import argparse
import time

import torch

from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict
from profile_common import kernel_rows   # scripts/ (this script's folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2.5-3b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--ahn-impl", default=None, help="gdn (default), dn or mamba2")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    cfg_dict = preset_config(args.preset, args.ahn_impl or True, torch.bfloat16)
    model = from_state_dict(cfg_dict, random_state_dict(cfg_dict, device=args.device), window=32640, sinks=128,
                            dtype="bf16", device=args.device)
    dec, cfg = model.decoder, model.config
    base = dec.new_state()
    base.fill_random(args.context)
    st = dec.new_state()
    ids = torch.randint(0, cfg.vocab_size, (args.tokens,), device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def run():
        st.copy_from(base)
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            dec.prefill(st, ids, last_only=True)
        sync()
        return time.perf_counter() - t0

    walls = [run() for _ in range(4)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
    rows = kernel_rows(prof, cut=("(", "<"), width=70)
    launches = sum(e.cpu_time_total for e in prof.events()
                   if e.name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"))
    total = sum(t for t, _ in rows.values())
    count = sum(c for _, c in rows.values())
    print(f"{args.preset} {cfg.ahn_implementation} prefill of {args.tokens} tokens at depth {args.context}: "
          f"wall {min(walls[1:]) * 1e3:.1f} ms (warm runs {', '.join(f'{w * 1e3:.1f}' for w in walls)}), "
          f"kernel time {total / 1e3:.1f} ms, {count} kernels ({count / cfg.num_layers:.0f} per layer), "
          f"launch calls {launches / 1e3:.1f} ms of host time")
    print("| kernel | ms | calls | share |\n|---|---|---|---|")
    for name, (t, c) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:args.rows]:
        print(f"| {name} | {t / 1e3:.2f} | {c} | {100 * t / total:.1f}% |")
    print("\nhost ops by count:")
    print(prof.key_averages().table(sort_by="count", row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
