"""Prefill (time to first token) of ahn_rt next to its peers, one run on one card: the rows the CUDA prefill
work is judged by.

    python bench/prefill_bench.py --json pp.json          # about 3 minutes on an H200
    python bench/prefill_bench.py --quick                 # 2k and 32k only, no peers
    python bench/prefill_bench.py --quick --prefill 32k,128k --chunk-sizes 4k,8k,16k   # the chunk size's curve

Rows (all at the --preset shape, bf16, W=32640 S=128 unless changed; random weights and tokens):
* ``ahn_rt ppN``: one ``Session.forward(ids, last_only=True)`` of N tokens from an empty session; the first
  prompt after ``load`` (``cold``) and the same prompt again (``warm``); peak memory above the weights. With
  ``--chunk-sizes``, these rows for each chunk size, each on a model built (and warmed up) with it.
* ``attention``: ahn_rt's prefill attention alone for one steady chunk (T tokens at depth 64k, the ring
  wrapped), FlashAttention-2 blocks and with AHN_RT_PREFILL_CUDNN=1; TFLOP/s over the (query, key) pairs
  that the sinks + window rule lets through.
* ``flex``: torch's FlexAttention with the same sinks + window block mask over a whole N-token sequence
  (its compile time, then warm), same pair count.
* ``gdn``: ahn_rt's chunked GatedDeltaNet (``ops.gdn_chunk``) for one layer over N evicted tokens, next to
  fla's ``chunk_gated_delta_rule`` (its first call, autotune included, then warm) when fla imports.
* ``hf``: Hugging Face transformers full-attention prefill (sdpa, logits of the last token only).
Each row also gives TFLOP/s against the run's own measured matmul rate.
"""
from __future__ import annotations

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_args import (AhnError, ArgParser, check_output, fail, nonneg_int, output_arg,  # noqa: E402
                        positive_int, script_start, token_list, write_json)

if __name__ == "__main__":
    script_start()   # Ctrl-C handler; the switches ahn_rt reads at import: one line here, not a traceback there

import torch  # noqa: E402

import ahn_rt  # noqa: E402,F401
from ahn_rt import ops  # noqa: E402
from ahn_rt.init_weights import PRESETS, preset_config, random_state_dict  # noqa: E402
from ahn_rt.runtime import from_state_dict  # noqa: E402
from ahn_rt.settings import kernel_flag  # noqa: E402
from floor import prefill_flops  # noqa: E402
from machine import matmul_flops  # noqa: E402
from peers import fla_importable, hf_model  # noqa: E402
from timing import back_to_back_ms, free_memory, sync  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def allowed_pairs(n: int, S: int, W: int) -> int:
    """(query, key) pairs the sinks + window rule lets through over a whole n-token sequence."""
    total = 0
    for t in range(n):
        lo = max(0, t - W + 1)
        total += (t + 1 - lo) + min(S, lo)
    return total


def chunk_pairs(p0: int, T: int, S: int, W: int) -> int:
    return allowed_pairs(p0 + T, S, W) - allowed_pairs(p0, S, W)


def attn_tflops(pairs: int, c, s: float) -> float:
    return 4 * pairs * c.head_dim * c.num_heads / s / 1e12


def pp_rows(model, lengths, dev, wbytes):
    c = model.config
    ids = torch.randint(0, c.vocab_size, (max(lengths),), device=dev)
    rows = []
    for i, n in enumerate(lengths):
        for label in (("cold", "warm") if i == 0 else ("warm",)):
            s = model.new_session()
            free_memory(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            sync(dev)
            t = time.perf_counter()
            s.forward(ids[:n], last_only=True)
            sync(dev)
            el = time.perf_counter() - t
            peak = (torch.cuda.max_memory_allocated(dev) - wbytes) / 2 ** 30
            flops = prefill_flops(c, n, c.mode)
            rows.append(dict(kind="pp", impl=f"ahn_rt ({label})", n=n, s=el, tok_s=n / el, TFLOPs=flops / el / 1e12,
                             peak_above_weights_gib=peak, chunk=s.chunk_size))
            log(f"ahn_rt pp{n} {label}: {el:.3f} s, peak +{peak:.2f} GiB")
            del s
    return rows


def attention_rows(c, dev, S, W, T, depth):
    H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *shape: torch.randn(*shape, device=dev, dtype=c.dtype, generator=g)
    kc, vc = r(Hkv, S + W, D), r(Hkv, S + W, D)
    q, k, v = r(T, H, D), r(T, Hkv, D), r(T, Hkv, D)
    pairs = chunk_pairs(depth, T, S, W)
    rows, first = [], None
    names = ("AHN_RT_PREFILL_CUDNN", "AHN_RT_PREFILL_BAND")
    before = {n: os.environ.get(n) for n in names}
    arms = [("0", "0", "FlashAttention-2"), ("1", "0", "cuDNN full blocks")]
    if ops._band_first(depth, T, S, W) is not None:   # the band takes this chunk (where built and warmed)
        arms.append(("1", "1", "cuDNN band"))
    try:
        for cudnn, band, label in arms:
            os.environ.update(zip(names, (cudnn, band)))
            if cudnn == "1" and not ops.warm_prefill_attention(H, Hkv, D, c.dtype, dev, T, S, W):
                log("cuDNN attention refused: its row runs FlashAttention-2")
            if band == "1" and ops._band_key(q, k, W) not in getattr(ops._cudnn_warm, "band", ()):
                log("no band attention in this build (or cuDNN refused it): no band rows")
                break
            fn = lambda: ops.prefill_attention(q, k, v, kc, vc, depth, S, W, c.head_dim ** -0.5)
            out = fn()
            diff = 0.0 if first is None else (out.float() - first).abs().max().item()
            first = out.float() if first is None else first
            ms = back_to_back_ms(fn, 10, dev)
            impl = f"ahn_rt prefill_attention ({label})"
            rows.append(dict(kind="attention", impl=impl, T=T, depth=depth, ms=ms,
                             TFLOPs=attn_tflops(pairs, c, ms / 1e3), max_abs_diff_vs_first=diff))
            log(f"{impl}: {ms:.2f} ms, {rows[-1]['TFLOPs']:.0f} TFLOP/s, max |diff| vs the first row {diff:.2e}")
            if band == "1":   # the band call alone, on its W - 1 + T keys already laid out (the copy, the
                # sinks' call and the merge are the rest)
                kb = r(Hkv, W - 1 + T, D).transpose(0, 1)
                call = lambda: ops.band_attention(q, kb, kb, W, c.head_dim ** -0.5)
                call()
                ms = back_to_back_ms(call, 10, dev)
                rows.append(dict(kind="attention", impl="ahn_rt band_attention call alone (cuDNN)", T=T,
                                 depth=depth, ms=ms, TFLOPs=attn_tflops(chunk_pairs(depth, T, 0, W), c, ms / 1e3)))
                log(f"{rows[-1]['impl']}: {ms:.2f} ms, {rows[-1]['TFLOPs']:.0f} TFLOP/s")
                del kb
    finally:   # the switches as they were, also when a row failed
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return rows


def flex_rows(c, dev, S, W, lengths):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim

    def rule(b, h, qi, ki):
        return (ki <= qi) & ((qi - ki < W) | (ki < S))

    compiled = torch.compile(flex_attention)
    rows = []
    for i, n in enumerate(lengths):
        q = torch.randn(1, H, n, D, device=dev, dtype=c.dtype)
        k = torch.randn(1, Hkv, n, D, device=dev, dtype=c.dtype)
        v = torch.randn_like(k)
        t = time.perf_counter()
        mask = create_block_mask(rule, 1, 1, n, n, device=dev, _compile=True)
        fn = lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True)
        fn()
        sync(dev)
        first = time.perf_counter() - t
        ms = back_to_back_ms(fn, 3, dev)
        rows.append(dict(kind="flex", impl="torch FlexAttention (sinks + window block mask)", n=n, ms=ms,
                         first_call_s=first, TFLOPs=attn_tflops(allowed_pairs(n, S, W), c, ms / 1e3)))
        log(f"flex n={n}: first call {first:.1f} s (mask + compile), warm {ms:.1f} ms per layer")
        del q, k, v, mask
    torch.compiler.reset()
    return rows


def gdn_rows(c, dev, n):
    H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
    q = torch.randn(n, H, D, device=dev, dtype=c.dtype)
    k = torch.randn(n, Hkv, D, device=dev, dtype=c.dtype)
    v = torch.randn(n, Hkv, D, device=dev, dtype=c.dtype)
    beta = torch.rand(n, H, device=dev, dtype=c.dtype)
    alpha = -torch.rand(n, H, device=dev) * 0.1
    state = torch.zeros(H, D, D, device=dev)
    fn = lambda: ops.gdn_chunk(q, k, v, beta, alpha, state.zero_())
    t = time.perf_counter()
    fn()
    sync(dev)
    first = time.perf_counter() - t
    ms = back_to_back_ms(fn, 5, dev)
    impl = "ahn_rt gdn_chunk" + (" (CUDA-core scan)" if kernel_flag("AHN_RT_GDN_SCAN_SIMT") else "")
    rows = [dict(kind="gdn", impl=impl, n=n, ms=ms, first_call_s=first)]
    log(f"{impl} n={n}: {ms:.2f} ms per layer (first call {first:.2f} s)")
    why = fla_importable()
    if why:
        rows.append(dict(kind="gdn", impl="fla chunk_gated_delta_rule", n=n, skipped=why))
        log(why)
        return rows
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    G = H // Hkv
    qf, kf, vf = q[None], k.repeat_interleave(G, 1)[None], v.repeat_interleave(G, 1)[None]
    init = torch.zeros(1, H, D, D, device=dev)
    ffn = lambda: chunk_gated_delta_rule(qf, kf, vf, g=alpha[None], beta=beta[None], initial_state=init,
                                         output_final_state=True, use_qk_l2norm_in_kernel=True)
    t = time.perf_counter()
    ffn()
    sync(dev)
    first = time.perf_counter() - t
    ms = back_to_back_ms(ffn, 5, dev)
    rows.append(dict(kind="gdn", impl="fla chunk_gated_delta_rule", n=n, ms=ms, first_call_s=first))
    log(f"fla chunk_gated_delta_rule n={n}: {ms:.2f} ms per layer (first call, autotune included, {first:.1f} s)")
    return rows


def hf_rows(c, dev, lengths):
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        log(f"skipped HF rows: transformers not installed ({e})")
        return [dict(kind="pp", impl="HF transformers full attention (sdpa)",
                     skipped=f"transformers not installed ({e})")]
    m, _ = hf_model(c, dev)
    rows = []
    ids = torch.randint(0, c.vocab_size, (1, max(lengths)), device=dev)
    with torch.inference_mode():
        m(ids[:, :512], logits_to_keep=1)
        for n in lengths:
            free_memory(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            sync(dev)
            t = time.perf_counter()
            m(ids[:, :n], logits_to_keep=1)
            sync(dev)
            el = time.perf_counter() - t
            flops = prefill_flops(c, n, "full")
            rows.append(dict(kind="pp", impl="HF transformers full attention (sdpa)", n=n, s=el, tok_s=n / el,
                             TFLOPs=flops / el / 1e12, peak_gib=torch.cuda.max_memory_allocated(dev) / 2 ** 30))
            log(f"HF pp{n}: {el:.3f} s")
    del m
    free_memory(dev)
    return rows


SECTIONS = ("attention", "flex", "gdn", "hf")


def parse_args(argv=None):
    ap = ArgParser(prog="python bench/prefill_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen2.5-3b", help="random weights of this shape (default qwen2.5-3b)")
    ap.add_argument("--ahn-impl", default="gdn", choices=("gdn", "dn", "mamba2"), help="the memory variant")
    ap.add_argument("--window", type=positive_int, default=32640)
    ap.add_argument("--sinks", type=nonneg_int, default=128)
    ap.add_argument("--prefill", help="ahn_rt pp lengths, e.g. 2k,32k or 2048,32768 (1k = 1024; default "
                                      "2k,32k,128k, with --quick 2k,32k)")
    ap.add_argument("--chunk-sizes", help="prefill chunk sizes for the pp rows, e.g. 4k,8k,16k (default: the "
                                          "runtime's, 4096 on CUDA); a model is built and warmed up for each")
    ap.add_argument("--quick", action="store_true", help="2k and 32k, ahn_rt rows only")
    ap.add_argument("--skip", default="", help=f"comma list of: {','.join(SECTIONS)}")
    ap.add_argument("--json", type=output_arg, help="write the rows here")
    args = ap.parse_args(argv)
    if args.preset not in PRESETS:
        ap.error(f"--preset {args.preset!r} is not a preset; choose from {', '.join(PRESETS)}")
    try:
        default = "2k,32k" if args.quick else "2k,32k,128k"   # (an empty --prefill is an error, not this)
        args.lengths = token_list(default if args.prefill is None else args.prefill, "--prefill")
        args.chunks = token_list(args.chunk_sizes, "--chunk-sizes") if args.chunk_sizes is not None else [None]
    except ValueError as e:
        ap.error(str(e))
    args.skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    bad = args.skip - set(SECTIONS)
    if bad:
        ap.error(f"--skip: unknown {', '.join(sorted(bad))}; choose from {', '.join(SECTIONS)}")
    if args.quick:
        args.skip |= set(SECTIONS)
    return args


def section(out, dev, name, fn):
    """One optional section of rows; an exception there is recorded (and logged) as a failed row, so the
    rows measured so far still reach the table and --json."""
    try:
        out["rows"] += fn()
    except Exception as e:  # noqa: BLE001 - a peer's failure must not lose the run
        msg = str(e).strip()
        err = f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"[:300]
        out["rows"].append(dict(kind=name, impl=name, failed=err))
        log(f"FAILED {name}: {err}")
        free_memory(dev)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        fail(f"prefill_bench.py needs a CUDA GPU (torch {torch.__version__} sees none); on the CPU, "
             "bench/decode_latency.py --device cpu --preset tiny has pp rows")
    if args.json:   # before the run, so that its results are never lost at the end
        check_output(args.json)
    dev = torch.device("cuda", torch.cuda.current_device())
    skip, lengths = args.skip, args.lengths
    dtype = torch.bfloat16
    S, W = args.sinks, args.window

    def oom(e):
        fail(f"out of memory building the {args.preset} model ({str(e).strip().splitlines()[0][:200]}); "
             "use a smaller --preset or free the GPU")

    out = dict(gpu=torch.cuda.get_device_name(dev), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
               command=" ".join(sys.argv), rows=[])
    out["matmul_TFLOPs"] = matmul_flops(dev, 8192, dtype, 10) / 1e12
    log(f"{out['gpu']}: matmul {out['matmul_TFLOPs']:.0f} TFLOP/s")
    try:
        cfg = preset_config(args.preset, ahn=args.ahn_impl, dtype=dtype)
        out["memory"] = cfg["_ahn_implementation"]
        sd = random_state_dict(cfg, seed=0, dtype=dtype, device=dev)
    except AhnError as e:
        fail(str(e))
    except torch.OutOfMemoryError as e:
        oom(e)
    for i, chunk in enumerate(args.chunks):   # a model per chunk size: its load warms up that chunk's kernels
        try:
            t = time.perf_counter()
            model = from_state_dict(cfg, sd, window=W, sinks=S, mode="ahn", dtype=dtype, device=dev,
                                    chunk_size=chunk)
        except AhnError as e:
            fail(str(e))
        except torch.OutOfMemoryError as e:
            oom(e)
        sync(dev)
        out.setdefault("load_s", time.perf_counter() - t)
        if i == len(args.chunks) - 1:
            sd = None   # the last model built: the random weights are not needed again
        free_memory(dev)
        c = model.config
        wbytes = torch.cuda.memory_allocated(dev)
        out["rows"] += pp_rows(model, lengths, dev, wbytes)
        del model
        free_memory(dev)
    if "attention" not in skip:
        for depth in (65536, 8192):   # a steady chunk (the ring wrapped), one still filling the window
            section(out, dev, "attention", functools.partial(attention_rows, c, dev, S, W, 8192, depth))
    if "gdn" not in skip:
        section(out, dev, "gdn", lambda: gdn_rows(c, dev, 8192))
    if "flex" not in skip:
        section(out, dev, "flex", lambda: flex_rows(c, dev, S, W, [32768, 131072]))
    if "hf" not in skip:
        section(out, dev, "hf", lambda: hf_rows(c, dev, [32768, 131072]))
    for r in out["rows"]:
        if "TFLOPs" in r:
            r["pct_matmul"] = 100 * r["TFLOPs"] / out["matmul_TFLOPs"]
    print(f"| row | n | time | TFLOP/s | % matmul | notes |\n|---|---|---|---|---|---|")
    for r in out["rows"]:
        n = r.get("n", r.get("T", "-"))
        tm = f"{r['s']:.3f} s" if "s" in r else (f"{r['ms']:.2f} ms" if "ms" in r else "-")
        note = ", ".join(f"{k} {v:.1e}" if k == "max_abs_diff_vs_first" else f"{k} {v:.2f}" if isinstance(v, float)
                         else f"{k} {v}" for k, v in r.items()
                         if k in ("peak_above_weights_gib", "peak_gib", "first_call_s", "depth", "chunk", "skipped",
                                  "max_abs_diff_vs_first", "failed"))
        tf = f"{r['TFLOPs']:.0f}" if "TFLOPs" in r else "-"
        pct = f"{r['pct_matmul']:.0f}%" if "pct_matmul" in r else "-"
        print(f"| {r['kind']} {r['impl']} | {n} | {tm} | {tf} | {pct} | {note} |", flush=True)
    if args.json and not write_json(out, args.json):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
