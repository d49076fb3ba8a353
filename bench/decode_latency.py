"""Decode (tg) and prefill (pp) latency of ahn_rt next to the physical floor and its peers, in the style
of llama-bench: a header that names the machine, one row per (implementation, context), a markdown table
for people and --json for machines. Columns and recorded results: bench/README.md.

    python bench/decode_latency.py --preset qwen2.5-3b --json tg.json     # ~2 min on an H200, under 6 on an H100
    python bench/decode_latency.py --quick                                 # smoke: 1k and 32k, few steps
    python bench/decode_latency.py --device cpu --preset tiny --contexts 64,128 --steps 3   # CPU path

Decode rows never prefill: ``State.fill_random`` stands the session at the depth with random valid values
(K/V in the occupied slots, gates, the memory, the position), which costs exactly what a real context of
that depth costs.

This file is the list of rows; each concern lives in one module beside it:
timing.py (every timing helper), machine.py (the header), floor.py (the cost model), ahn_rt_rows.py
(ahn_rt's rows), peers.py (HF transformers and fla), budget.py (time budget, skipped and failed rows),
report.py (markdown, --json, progress lines).
"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from bench_args import (AhnError, ArgParser, check_device, check_exists, check_output,  # noqa: E402
                        fail, int_list, nonneg_float, nonneg_int, output_arg, positive_float, positive_int,
                        script_start, seed_arg, token_list, tokens_arg, write_json)

if __name__ == "__main__":
    script_start()   # Ctrl-C handler; the switches ahn_rt reads at import: one line here, not a traceback there

import torch  # noqa: E402

import ahn_rt.graph  # noqa: E402
from ahn_rt import ops  # noqa: E402
from ahn_rt.config import param_count  # noqa: E402
from ahn_rt_rows import batch_row, build_model, decode_row, gdn_only_row, prefill_row, probe_kernels  # noqa: E402
from budget import Run  # noqa: E402
from floor import against_floor, floor_table, kv_bytes  # noqa: E402
from machine import header  # noqa: E402
from peers import fla_importable, fla_row, hf_compile_row, hf_eager_row, hf_model  # noqa: E402
from report import gdn_share, log, markdown  # noqa: E402
from timing import GiB, free_memory  # noqa: E402


def variant_tag(c) -> str:
    """Row label of the model's mode: 'ahn' for GatedDeltaNet, 'ahn-dn' / 'ahn-mamba2' for the others."""
    return {"GatedDeltaNet": "ahn", "DeltaNet": "ahn-dn", "Mamba2": "ahn-mamba2"}[c.ahn_implementation]


def run(args, dev: torch.device) -> dict:
    r = Run(args.budget_s, dev)
    torch.manual_seed(args.seed)
    log("measuring copy bandwidth and matmul throughput")
    hdr = header(dev, args.dtype, args.commit, "python bench/decode_latency.py " + shlex.join(args.argv))
    log(f"copy {hdr['copy_GBps']:.0f} GB/s, matmul {hdr['matmul_TFLOPs']:.1f} TFLOP/s")
    c, no_kernels = ahn_mode_rows(r, args, dev, hdr)
    full_mode_rows(r, args, dev, c, no_kernels)
    hf_rows(r, args, dev, c)
    gdn_share(r.rows, c)
    if c is not None:
        against_floor(r.rows, c, hdr["copy_GBps"], hdr["matmul_TFLOPs"])
    return dict(header=hdr, rows=r.rows, skipped=r.skipped, failed=r.failed, elapsed_s=r.elapsed(),
                budget_s=args.budget_s)


def ahn_mode_rows(r: Run, args, dev: torch.device, hdr: dict):
    """ahn_rt in ahn mode: the decode step at every --contexts depth, the GDN step alone (and fla's), the
    prefill rows, the decode step on the reference ops. Returns (config, why there are no compiled
    kernels or None). The model under test that cannot be built ends the run: a user's mistake (bad
    --weights, --preset, --dtype, --window, --sinks) with one line and exit 2."""
    cuda = dev.type == "cuda"
    log("building the ahn model" + ("" if args.weights else f" (random {args.preset} weights on {dev})"))
    try:
        model = build_model(args, "ahn", dev)
    except AhnError as e:
        fail(str(e))
    except torch.OutOfMemoryError as e:
        fail(f"out of memory building the model on {dev} ({str(e).strip().splitlines()[0][:200]}); "
             "use a smaller --preset or free the device")
    c = model.config
    tag = variant_tag(c)
    hdr["model"] = dict(family=c.family, memory=c.ahn_implementation, layers=c.num_layers, hidden=c.hidden_size, heads=c.num_heads,
                        kv_heads=c.num_kv_heads, head_dim=c.head_dim, vocab=c.vocab_size,
                        params=param_count(c), window=c.window, sinks=c.sinks,
                        dtype=str(c.dtype).replace("torch.", ""), source=args.weights or f"random {args.preset}")
    no_kernels = probe_kernels(dev, c.dtype)
    hdr["kernels"] = "yes" if no_kernels is None else f"NO — {no_kernels}"
    if no_kernels:
        log(f"no compiled ahn_rt kernels on {dev}: {no_kernels}")
        no_kernels = (f"no compiled ahn_rt kernels on {dev} ({no_kernels}); build them with "
                      "`pip install --no-build-isolation -e .` (the reference-ops rows still run)")
    hdr["floor"] = floor_table(c, args.ctx)

    for ctx in args.ctx:   # the decode step: CUDA-graph stepper on the GPU
        what = f"ahn_rt {tag} tg @ d{ctx}"
        stepper = "CUDA graph" if cuda and model.decoder.graph_safe else "eager"
        if no_kernels:
            r.skip(what, no_kernels)
        else:
            r.attempt(what, lambda: decode_row(model, f"ahn_rt {tag} ({stepper})",
                                               ctx, args.steps, args.warmup, dev))

    stepper = "CUDA graph" if cuda and model.decoder.graph_safe and ahn_rt.graph.GRAPHS_ENABLED else "eager"
    for ctx in args.batch_ctx:   # several sessions per step: model.step over a state pool
        for B in args.batch_sizes:
            what = f"ahn_rt {tag} tg @ d{ctx} b{B}"
            if "batch" in args.skip:
                r.skip(what, "--skip batch")
            elif no_kernels:
                r.skip(what, no_kernels)
            elif r.budget_ok(what, 10):
                r.attempt(what, lambda: batch_row(model, f"ahn_rt {tag} model.step ({stepper})", ctx, B,
                                                  args.steps, args.warmup, dev))

    if "gdn" in args.skip:   # the GDN memory step alone, ahn_rt's and fla's
        r.skip("GDN-only", "--skip gdn")
    elif c.ahn_implementation == "Mamba2":
        r.skip("GDN-only", "the model's memory is Mamba2")
    else:
        if no_kernels:
            r.skip("GDN-only ahn_rt", no_kernels)
        else:
            r.attempt("GDN-only ahn_rt", lambda: gdn_only_row(c, dev, args.gdn_iters))
        if "fla" in args.skip:
            r.skip("fla GDN", "--skip fla")
        elif not cuda:
            r.skip("fla GDN", "needs CUDA (Triton)")
        elif (why := fla_importable()) is not None:
            r.skip("fla fused_recurrent_gated_delta_rule", why)
        else:
            r.attempt("GDN-only fla", lambda: fla_row(c, dev, args.gdn_iters))

    def prefill_ops():   # the prefill path calls rms_norm through the extension too
        return ops.use_backend("ref") if no_kernels else contextlib.nullcontext()

    if args.prefill and "prefill" not in args.skip:
        # one untimed short prompt first, so the first pp row does not pay one-time set-up
        with prefill_ops():
            r.attempt("prefill warm-up (untimed, not a row)", lambda: prefill_row(model, 512, dev, "warm-up"))
        r.rows = [x for x in r.rows if x.get("impl") != "warm-up"]
    for i, n in enumerate(args.prefill):
        what = f"ahn_rt {tag} pp{n}"
        if "prefill" in args.skip:
            r.skip(what, "--skip prefill")
        elif i == 0 or r.budget_ok(what, 30):
            with prefill_ops():
                r.attempt(what, lambda: prefill_row(model, n, dev, f"ahn_rt {tag} (reference ops)" if no_kernels
                                                    else f"ahn_rt {tag}"))

    if "ref" in args.skip:   # the decode step on the pure-torch reference ops, eager
        r.skip("ahn_rt reference ops", "--skip ref")
    else:
        for ctx in args.ref_ctx:
            what = f"ahn_rt {tag} ref tg @ d{ctx}"
            if r.budget_ok(what, 20):
                r.attempt(what, lambda: decode_row(model, f"ahn_rt {tag}, reference ops (eager)", ctx,
                                                   args.ref_steps, 1, dev, ref=True))
    del model
    free_memory(dev)
    return c, no_kernels


def full_mode_rows(r: Run, args, dev: torch.device, c, no_kernels):
    """ahn_rt in full mode: plain causal attention over a cache sized to the run (the crossover)."""
    if "full" in args.skip:
        r.skip("ahn_rt full mode", "--skip full")
        return
    if c is None:
        return
    if no_kernels:
        r.skip("ahn_rt full mode", no_kernels)
        return
    if not r.budget_ok("ahn_rt full mode", 20):
        return
    log("building the full-attention model")
    full = r.build("build ahn_rt full model", lambda: build_model(args, "full", dev))
    impl = "ahn_rt full (CUDA graph)" if dev.type == "cuda" else "ahn_rt full (eager)"
    for ctx in args.ctx if full is not None else []:
        what = f"ahn_rt full tg @ d{ctx}"
        need = kv_bytes(c, ctx + args.warmup + 2 * args.steps + 8) + GiB
        if r.memory_ok(what, need, " for the cache") and r.budget_ok(what, 5):
            r.attempt(what, lambda: decode_row(full, impl, ctx, args.steps, args.warmup, dev))
    del full
    free_memory(dev)


def hf_rows(r: Run, args, dev: torch.device, c):
    """HF transformers at the same shape: eager with a DynamicCache, and StaticCache + torch.compile."""
    want_hf = c is not None and "hf" not in args.skip
    want_compile = c is not None and args.hf_compile and "hf-compile" not in args.skip
    if not want_hf:
        r.skip("HF transformers eager", "--skip hf" if c is not None else "no model")
    if not want_compile:
        r.skip("HF StaticCache + torch.compile", "--no-hf-compile / --skip hf-compile")
    elif dev.type != "cuda":
        r.skip("HF StaticCache + torch.compile", "needs CUDA (reduce-overhead = CUDA graphs)")
        want_compile = False
    if not (want_hf or want_compile):
        return
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        r.skip("HF transformers (all rows)", f"transformers not installed ({e})")
        return
    if not r.budget_ok("HF transformers", 15):
        return
    log("building the HF model")
    built = r.build("build HF model", lambda: hf_model(c, dev))
    if built is None:
        return
    hm, hc = built
    for ctx in args.hf_ctx if want_hf else []:
        what = f"HF eager tg @ d{ctx}"
        need = 2 * kv_bytes(c, ctx + args.hf_steps + args.warmup) + 2 * GiB
        if r.memory_ok(what, need) and r.budget_ok(what, 10):
            r.attempt(what, lambda: hf_eager_row(hm, hc, c, ctx, args.hf_steps, min(args.warmup, 3), dev))
    for ctx in args.hf_compile_ctx if want_compile else []:
        what = f"HF compile tg @ d{ctx}"
        need = 2 * kv_bytes(c, ctx + args.steps + args.warmup) + 4 * GiB
        if r.memory_ok(what, need) and r.budget_ok(what, args.compile_need_s):
            r.attempt(what, lambda: hf_compile_row(hm, hc, c, ctx, args.steps, max(args.warmup, 4), dev))
    del hm, built
    free_memory(dev)


# ==============================================================================================
# Arguments
# ==============================================================================================
def parse_args(argv=None):
    ap = ArgParser(prog="python bench/decode_latency.py", description=__doc__.split("\n\n")[0])
    src = ap.add_argument_group("model")
    one = src.add_mutually_exclusive_group()   # --preset with --weights was ignored: a run of the checkpoint
    one.add_argument("--preset", help="random weights of this shape (default qwen2.5-3b)")
    one.add_argument("--weights", help="a real checkpoint instead (file or folder; ahn_rt.load)")
    src.add_argument("--ahn", help="a separate AHN checkpoint for --weights")
    src.add_argument("--ahn-impl", choices=("gdn", "dn", "mamba2"),
                     help="the memory variant of the random --preset weights (default gdn)")
    src.add_argument("--window", type=positive_int,
                     help="the AHN window W (default: the --weights config's, else 32640)")
    src.add_argument("--sinks", type=nonneg_int, help="the attention sinks S (default: the --weights config's, "
                                                      "else 128)")
    src.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or float32")
    src.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke path: no graphs, no peaks)")
    src.add_argument("--seed", type=seed_arg, default=0, help="seed of the random weights and of torch (default 0)")
    rows = ap.add_argument_group("rows")
    rows.add_argument("--contexts", help="decode depths, e.g. 1k,8k,32k (default 1k,8k,32k,64k,128k "
                                         "+256k when the card has >= 40 GiB)")
    rows.add_argument("--max-context", type=tokens_arg,
                      help="also the deepest context doubled, again and again, up to this depth (e.g. 256k)")
    rows.add_argument("--batch-sizes", default="8,16", help="sessions per step for the b{B} rows (default 8,16)")
    rows.add_argument("--batch-contexts", default="1k,32k", help="depths for the b{B} rows (default 1k,32k)")
    rows.add_argument("--steps", type=positive_int, default=64, help="timed decode steps per row (default 64)")
    rows.add_argument("--warmup", type=positive_int, default=8,
                      help="untimed steps first; the first captures the graph (default 8)")
    rows.add_argument("--prefill", default="2k,32k", help="prompt lengths for pp rows (default 2k,32k)")
    rows.add_argument("--prefill-long", action="store_true", help="also pp131072")
    rows.add_argument("--ref-contexts", default="1k,32k", help="depths for the reference-ops row (default 1k,32k)")
    rows.add_argument("--ref-steps", type=positive_int, default=4,
                      help="timed steps of the reference-ops row (default 4)")
    rows.add_argument("--hf-contexts", default="1k,32k,128k", help="depths for HF eager (default 1k,32k,128k)")
    rows.add_argument("--hf-steps", type=positive_int, default=16, help="timed steps of the HF eager rows (default 16)")
    rows.add_argument("--hf-compile", action=argparse.BooleanOptionalAction, default=None,
                      help="HF StaticCache + torch.compile rows (default on, off with --quick)")
    rows.add_argument("--hf-compile-contexts", default="4k,32k",
                      help="depths for the HF compile rows (default 4k,32k)")
    rows.add_argument("--compile-need-s", type=nonneg_float, default=60,
                      help="skip a compile row when less than this much budget is left (default 60)")
    rows.add_argument("--gdn-iters", type=positive_int, default=200,
                      help="replays for the GDN-only row (default 200)")
    rows.add_argument("--skip", default="", help="comma list of: full,ref,hf,hf-compile,fla,gdn,prefill,batch")
    ap.add_argument("--budget-s", type=positive_float, default=420,
                    help="after this many seconds the remaining optional rows are skipped (default 420)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1k and 32k, few steps, no compile")
    ap.add_argument("--json", type=output_arg, help="also write the results here")
    ap.add_argument("--commit", help="the commit to print when the run has no git checkout (a copied tree)")
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    bad = a.skip - {"full", "ref", "hf", "hf-compile", "fla", "gdn", "prefill", "batch"}
    if bad:
        ap.error(f"--skip: unknown {', '.join(sorted(bad))}")
    if a.quick:
        a.contexts = "1k,32k" if a.contexts is None else a.contexts
        a.steps, a.warmup = min(a.steps, 16), min(a.warmup, 3)
        a.prefill = "2k" if a.prefill == "2k,32k" else a.prefill
        a.ref_contexts = "1k" if a.ref_contexts == "1k,32k" else a.ref_contexts
        a.ref_steps, a.hf_steps, a.gdn_iters = min(a.ref_steps, 2), min(a.hf_steps, 4), min(a.gdn_iters, 50)
        a.hf_contexts = "1k" if a.hf_contexts == "1k,32k,128k" else a.hf_contexts
        a.hf_compile = bool(a.hf_compile)
    elif a.hf_compile is None:
        a.hf_compile = True
    try:   # depths and prompt lengths: 1k = 1024, each >= 1 (a depth < 1 crashed natively in fill_random)
        a.ctx = token_list(a.contexts, "--contexts") if a.contexts is not None else None
        a.prefill = token_list(a.prefill, "--prefill")
        if a.prefill_long and 131072 not in a.prefill:   # --prefill 128k --prefill-long: one pp131072 row
            a.prefill.append(131072)
        a.ref_ctx, a.hf_ctx = token_list(a.ref_contexts, "--ref-contexts"), token_list(a.hf_contexts, "--hf-contexts")
        a.hf_compile_ctx = token_list(a.hf_compile_contexts, "--hf-compile-contexts")
        a.batch_ctx = token_list(a.batch_contexts, "--batch-contexts")
        a.batch_sizes = int_list(a.batch_sizes, "--batch-sizes")
    except ValueError as e:
        ap.error(str(e))
    a.preset = "qwen2.5-3b" if a.preset is None else a.preset
    check_model_args(ap, a)
    return a


def check_model_args(ap, a):
    """What the model build would reject after the header's measurements: the preset, the dtype, the paths."""
    from ahn_rt.config import parse_dtype
    from ahn_rt.init_weights import PRESETS
    try:
        parse_dtype(a.dtype)
    except AhnError as e:
        ap.error(f"--dtype: {e}")
    if a.weights is not None and a.ahn_impl is not None:   # it was ignored: the checkpoint has its memory
        ap.error("--ahn-impl picks the memory of the random --preset weights; a --weights checkpoint has its own "
                 "(drop --ahn-impl)")
    if a.weights is None:
        if a.ahn is not None:
            ap.error("--ahn is the AHN checkpoint of --weights; give --weights too (or leave --ahn out)")
        if a.preset not in PRESETS:
            ap.error(f"--preset {a.preset!r} is not a preset; choose from {', '.join(PRESETS)}")
    check_exists(a.weights, "--weights")
    check_exists(a.ahn, "--ahn")


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = check_device(args.device, cpu_hint=". For the CPU smoke path: --device cpu --preset tiny "
                                             "--contexts 64,128 --steps 3")
    if args.json:   # before the run, so that its results are never lost at the end
        check_output(args.json)
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if args.ctx is None:
        args.ctx = token_list("1k,8k,32k,64k,128k", "--contexts")
        if dev.type == "cuda" and torch.cuda.get_device_properties(dev).total_memory >= 40 * GiB:
            args.ctx.append(262144)
    if dev.type == "cpu":   # the smoke path: peers at the given depths, short prompts, unless asked
        given = {a.split("=", 1)[0] for a in args.argv}
        small = sorted({min(args.ctx), max(args.ctx)})
        if "--ref-contexts" not in given:
            args.ref_ctx = small
        if "--batch-contexts" not in given:
            args.batch_ctx = small
        if "--hf-contexts" not in given:
            args.hf_ctx = small
        if "--prefill" not in given:
            args.prefill = [256] + ([131072] if args.prefill_long else [])
    if args.max_context:
        nxt = max(args.ctx) * 2
        while nxt <= args.max_context:
            args.ctx.append(nxt)
            nxt *= 2
    res = run(args, dev)
    print(markdown(res), flush=True)   # the table first: a failed write below loses nothing
    if args.json:
        if not write_json(res, args.json):
            return 1
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
