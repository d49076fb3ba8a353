"""Training throughput of ahn_rt.train (self-distillation, docs/semantics.md §10) on one device.

    python bench/train_throughput.py                      # Qwen2.5-3B shape, 8k tokens, H200
    python bench/train_throughput.py --preset tiny --seq-len 256 --device cpu    # smoke check

Random base weights are built directly on the device (ahn_rt.init_weights.random_state_dict), the AHN
modules get their official initial values, and each step runs: teacher forward (no grad), student
forward (sinks + window + memory; `--checkpoint`: what backward recomputes, each layer by default), the
chunked distillation loss at positions t >= S + W, backward, AdamW on the AHN parameters. (W, S) per step are drawn as the recipe draws them
(seeded) unless --window/--sinks fix them. Reports training tokens/s, peak device memory and the time
split per phase (CUDA events on a GPU), as text, one markdown table row and optionally --json.
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_args import (RUNTIME_SWITCHES, AhnError, ArgParser, check_device, check_fits,  # noqa: E402
                        check_output, fail, nonneg_int, out_of_memory, output_arg, positive_int, script_start,
                        seed_arg, tokens_arg, write_json)

if __name__ == "__main__":   # Ctrl-C handler; the switches ahn_rt reads at import: one line, not a traceback
    script_start(RUNTIME_SWITCHES + ("AHN_RT_TRAIN_ATTENTION",))

import torch  # noqa: E402

from ahn_rt.config import param_count, parse_config, parse_dtype  # noqa: E402
from ahn_rt.devices import allocator_setting, prefer_expandable_segments  # noqa: E402
from ahn_rt.init_weights import PRESETS, preset_config, random_state_dict  # noqa: E402
from ahn_rt.train.attention import attention_backend, check_trainable  # noqa: E402
from ahn_rt.train.data import budget_choices, sample_budget  # noqa: E402
from ahn_rt.train.loss import distill_loss  # noqa: E402
from ahn_rt.train.model import CHECKPOINT_MODES, TrainModel  # noqa: E402

PHASES = ("teacher", "student", "loss", "backward", "optim")


class Marks:
    """Named time marks: CUDA events on a GPU, perf_counter on the CPU; ms between consecutive marks."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def mark(self, name):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((name, e))
        else:
            self.marks.append((name, time.perf_counter()))

    def split(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        return {b[0]: (a[1].elapsed_time(b[1]) if self.cuda else (b[1] - a[1]) * 1e3)
                for a, b in zip(self.marks, self.marks[1:])}


def main(argv=None) -> int:
    ap = ArgParser(prog="python bench/train_throughput.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen2.5-3b")
    ap.add_argument("--seq-len", type=tokens_arg, default=8192, help="tokens per sequence (e.g. 8k or 8192)")
    ap.add_argument("--batch", type=positive_int, default=1)
    ap.add_argument("--steps", type=positive_int, default=6, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=nonneg_int, default=2)
    ap.add_argument("--window", type=positive_int, help="fixed W (with --sinks); default: the recipe's random draws")
    ap.add_argument("--sinks", type=nonneg_int, help="fixed S, with --window (default 0)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (the smoke check)")
    ap.add_argument("--dtype", help="base weights / autocast dtype (default bf16 on cuda, float32 on cpu)")
    ck = ap.add_mutually_exclusive_group()   # (both given: the last won, silently)
    # no default here (layer, set after parsing): argparse counts a value identical to the default as not
    # given, which let `--checkpoint layer --no-checkpoint` pass
    ck.add_argument("--checkpoint", choices=CHECKPOINT_MODES,
                    help="what the student's backward recomputes (ahn_rt.train's --activation-checkpointing): "
                         "layer (default), memory (each layer's AHN memory module only) or none")
    ck.add_argument("--no-checkpoint", dest="checkpoint", action="store_const", const="none",
                    help="the same as --checkpoint none")
    ap.add_argument("--loss-chunk", type=positive_int, default=1024)
    ap.add_argument("--seed", type=seed_arg, default=0)
    ap.add_argument("--json", type=output_arg, help="write the results to this file")
    args = ap.parse_args(argv)
    args.checkpoint = args.checkpoint or "layer"
    prefer_expandable_segments()   # as python -m ahn_rt.train does, before the first CUDA allocation
    if args.preset not in PRESETS:
        ap.error(f"--preset {args.preset!r} is not a preset; choose from {', '.join(PRESETS)}")
    try:
        parse_dtype(args.dtype)
    except AhnError as e:
        ap.error(f"--dtype: {e}")
    if args.sinks is not None and args.window is None:   # it was ignored: the recipe's draws have their own S
        ap.error(f"--sinks {args.sinks} goes with a fixed --window; without --window (W, S) are drawn as the recipe "
                 "draws them")
    args.sinks = args.sinks or 0
    if args.window is not None and args.window + args.sinks >= args.seq_len:
        ap.error(f"--window + --sinks ({args.window} + {args.sinks}) must be < --seq-len ({args.seq_len}): the loss "
                 "is taken at the positions past them")
    if args.window is None and not budget_choices(args.seq_len):
        ap.error(f"--seq-len {args.seq_len} is shorter than every window the recipe draws; give a longer --seq-len "
                 "or a fixed --window (with --sinks)")
    dev = check_device(args.device, cpu_hint="; for the CPU smoke check: --device cpu --preset tiny --seq-len 256")
    try:   # the training attention this device would use can train here (flex: CUDA only), before any work
        check_trainable(dev)
    except AhnError as e:
        fail(str(e))
    check_fits(least_bytes(args, dev), dev, f"--preset {args.preset} --seq-len {args.seq_len} --batch {args.batch}",
               "use a smaller --preset, --seq-len or --batch")
    if args.json:   # before the run, so that its results are never lost at the end
        check_output(args.json)
    try:
        return measure(args, dev)
    except AhnError as e:
        fail(str(e))
    except (RuntimeError, MemoryError) as e:   # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):   # the CPU allocator's failure is a plain RuntimeError
            raise
        fail(f"out of memory on {dev} ({str(e).strip().splitlines()[0][:200]}); use a smaller --preset, "
             "--seq-len or --batch")


def least_bytes(args, dev) -> int:
    """A lower bound of the bytes a step holds at once: the base weights, the token ids, and the hidden
    states [batch, seq, hidden] that stay until the backward: the teacher's, the student's, and each
    layer's input (what the least recomputing, --checkpoint layer, keeps)."""
    dtype = parse_dtype(args.dtype or ("bf16" if dev.type == "cuda" else "float32"))
    c = parse_config(preset_config(args.preset, ahn=False, dtype=dtype), args.preset)
    per_token = 8 + c.hidden_size * dtype.itemsize * (c.num_layers + 2)
    return param_count(c) * dtype.itemsize + args.batch * args.seq_len * per_token


def measure(args, dev) -> int:
    cuda = dev.type == "cuda"
    dtype = parse_dtype(args.dtype or ("bf16" if cuda else "float32"))
    cfg = preset_config(args.preset, ahn=False, dtype=dtype)
    sd = random_state_dict(cfg, seed=args.seed, dtype=dtype, device=dev, ahn=False)
    model = TrainModel(parse_config(cfg, args.preset), sd, base_dtype=dtype, seed=args.seed)
    del sd
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    rng = random.Random(args.seed)
    B, L, V = args.batch, args.seq_len, cfg["vocab_size"]
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)

    rows, budgets = [], []
    for step in range(args.warmup + args.steps):
        WS = [(args.window, args.sinks) if args.window else sample_budget(L, rng) for _ in range(B)]
        window = torch.tensor([w for w, _ in WS])
        sinks = torch.tensor([s for _, s in WS])
        ids = torch.randint(0, V, (B, L), device=dev, generator=gen)
        valid = torch.arange(L, device=dev)[None, :] >= (window + sinks).to(dev)[:, None]
        m = Marks(cuda)
        m.mark("start")
        with autocast:
            with torch.no_grad():
                h_t = model.forward_teacher(ids)
            m.mark("teacher")
            h_s = model.forward_student(ids, window, sinks, checkpoint=args.checkpoint)
            m.mark("student")
            loss, _ = distill_loss(model, h_t, h_s, valid, chunk=args.loss_chunk)
            m.mark("loss")
        loss.backward()
        m.mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.mark("optim")
        split = m.split()
        if step >= args.warmup:
            rows.append(split)
            budgets.append(WS)
        print(f"step {step}{' (warm-up)' if step < args.warmup else ''}: W,S={WS} loss={loss.item():.4g} "
              + " ".join(f"{k}={v:.1f}ms" for k, v in split.items()), flush=True)

    ms = {k: statistics.mean(r[k] for r in rows) for k in PHASES}
    total = sum(ms.values())
    res = {"preset": args.preset, "seq_len": L, "batch": B, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
           "dtype": str(dtype).replace("torch.", ""), "checkpoint": args.checkpoint, "steps": len(rows),
           "budgets": budgets, "attention": attention_backend(dev), "tokens_per_s": B * L * 1e3 / total, "step_ms": total, "phase_ms": ms,
           "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
           "peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30 if cuda else None,
           "allocator": (allocator_setting() or "default") if cuda else None,
           "torch": torch.__version__}
    peak = f"{res['peak_gib']:.1f} GiB" if cuda else "n/a (cpu)"
    more = f", {res['peak_reserved_gib']:.1f} GiB reserved; allocator: {res['allocator']}" if cuda else ""
    print(f"\n{res['tokens_per_s']:.0f} training tokens/s ({total:.0f} ms/step), peak memory {peak}{more}")
    print("| preset | seq | batch | ckpt | attention | tokens/s | peak | teacher | student fwd | loss | backward | optim |")
    print(f"| {args.preset} | {L} | {B} | {res['checkpoint']} | {res['attention']} | "
          f"{res['tokens_per_s']:.0f} | {peak} | "
          + " | ".join(f"{ms[k]:.0f} ms" for k in PHASES) + " |")
    sys.stdout.flush()
    if args.json and not write_json(res, args.json, indent=2):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
