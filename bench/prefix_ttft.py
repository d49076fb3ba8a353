"""Time to first token with the prefix cache: a long shared prefix + a short question, cold vs cached.

    python bench/prefix_ttft.py --preset qwen2.5-3b --prefix-tokens 32768        # on the GPU (the target)
    python bench/prefix_ttft.py --preset tiny --prefix-tokens 4096 --device cpu   # CPU smoke run

What one measurement is: a fresh request ``prefix + question_i`` (token ids) on a reused session, from
``Session.reset`` to the first sampled token id on the host, i.e. exactly what ``generate`` runs before
its first token: the prefix-cache lookup, the copy of the cached state, the prefill of the rest on the
cold run's chunk boundaries, one greedy sample and the host sync.

* cold (no cache): the cache is off; the whole prompt is prefilled.
* cold (miss):     the cache is on but empty; the same, plus storing the snapshots.
* cached (hit):    the cache holds the prefix (stored by an earlier request with another question); each
  timed request has a question not seen before, so it reuses the prefix and prefills only the question.

Every cached request's logits must equal (torch.equal) the cold logits of the same prompt; the target is
cached TTFT <= 5% of cold. Weights are random at the preset's shape (cost does not depend on the values)
unless --weights names a checkpoint. --mode is python -m ahn_rt.generate's: a checkpoint without AHN weights
runs full attention, so --window / --sinks with it need --mode swa (refused otherwise, as generate refuses
them). --json writes the numbers.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # ahn_rt from this checkout
from bench_args import (ArgParser, add_mode_argument, check_device, check_exists, check_fits,  # noqa: E402
                        check_model_args, check_output, fail, nonneg_int, out_of_memory, output_arg,
                        positive_int, script_start, seed_arg, tokens_arg, write_json)

if __name__ == "__main__":
    script_start()   # Ctrl-C handler; the switches ahn_rt reads at import: one line here, not a traceback there

import torch  # noqa: E402

import ahn_rt  # noqa: E402
from ahn_rt.config import param_count, parse_config, parse_dtype  # noqa: E402
from ahn_rt.init_weights import preset_config, random_state_dict  # noqa: E402
from ahn_rt.runtime import DEFAULT_CHUNK, from_state_dict  # noqa: E402
from ahn_rt.serve.prompt import Prompt  # noqa: E402


def build_model(args, dev):
    dtype = parse_dtype(args.dtype)
    if args.weights:
        return ahn_rt.load(args.weights, ahn=args.ahn, window=args.window, sinks=args.sinks, dtype=dtype,
                           device=dev, mode=args.mode, chunk_size=args.chunk_size)
    cfg = preset_config(args.preset, ahn=True, dtype=dtype)
    sd = random_state_dict(cfg, seed=args.seed, dtype=dtype, device=dev)
    model = from_state_dict(cfg, sd, window=args.window, sinks=args.sinks, dtype=dtype, device=dev,
                            mode=args.mode, chunk_size=args.chunk_size)
    del sd
    return model


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def ttft(model, sess, ids) -> tuple[float, torch.Tensor, int]:
    """(seconds to the first token id on the host, last-position logits, prompt tokens taken from the cache)."""
    cache = model.prefix_cache
    hit0 = cache.hit_tokens if cache is not None else 0
    sync(model.device)
    t0 = time.perf_counter()
    sess.reset()
    _, logits = model.prefill(Prompt(ids), session=sess)
    int(logits.argmax())               # the first token, on the host
    dt = time.perf_counter() - t0
    return dt, logits, (cache.hit_tokens - hit0) if cache is not None else 0


def main(argv=None) -> int:
    ap = ArgParser(prog="python bench/prefix_ttft.py", description=__doc__.split("\n\n")[0])
    one = ap.add_mutually_exclusive_group()   # --preset with --weights was ignored: a run of the checkpoint
    one.add_argument("--preset", help="random weights of this shape (default tiny; the GPU run: qwen2.5-3b)")
    one.add_argument("--weights", help="a real checkpoint instead (ahn_rt.load)")
    ap.add_argument("--ahn", help="a separate AHN checkpoint for --weights")
    ap.add_argument("--window", type=positive_int, help="default: the config's (32640)")
    ap.add_argument("--sinks", type=nonneg_int, help="default: the config's (128)")
    add_mode_argument(ap)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", help="cuda (default) or cpu (the smoke run)")
    ap.add_argument("--chunk-size", type=tokens_arg, default=None,
                    help="prefill chunk (default: the runtime's, 4096 on CUDA)")
    ap.add_argument("--prefix-tokens", type=tokens_arg, default=32768, help="shared prefix (e.g. 32k or 32768)")
    ap.add_argument("--question-tokens", type=tokens_arg, default=100, help="the new tokens of each request")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed requests per case (default 3)")
    ap.add_argument("--cache-bytes", default="16GiB", help="prefix cache size (default 16GiB)")
    ap.add_argument("--seed", type=seed_arg, default=0)
    ap.add_argument("--json", type=output_arg, help="also write the results here")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed runs, profile one more cached request (torch.profiler tables on stderr)")
    args = ap.parse_args(argv)
    args.preset = "tiny" if args.preset is None else args.preset
    if args.ahn is not None and args.weights is None:
        ap.error("--ahn is the AHN checkpoint of --weights; give --weights too (or leave --ahn out)")
    check_exists(args.weights, "--weights")
    check_exists(args.ahn, "--ahn")
    check_model_args(args)   # as python -m ahn_rt.generate: a --window for a checkpoint without AHN weights
    from ahn_rt.serve.__main__ import parse_size
    try:
        cache_bytes = parse_size(args.cache_bytes, "--cache-bytes")
    except ahn_rt.AhnError as e:
        ap.error(str(e))
    if cache_bytes < 1:
        ap.error(f"--cache-bytes must be > 0 (the cached case needs a cache), got {args.cache_bytes!r}")
    dev = check_device("cuda" if args.device is None else args.device,
                       cpu_hint="; for the CPU smoke run: --device cpu --preset tiny --prefix-tokens 4096")
    try:
        need = least_bytes(args)
    except ahn_rt.AhnError as e:   # a bad --preset or --dtype
        fail(str(e))
    check_fits(need, dev, f"--prefix-tokens {args.prefix_tokens} --question-tokens {args.question_tokens} --repeats "
               f"{args.repeats}" + ("" if args.weights else f" --preset {args.preset}"),
               "use fewer --prefix-tokens, --question-tokens or --repeats" + ("" if args.weights else
                                                                               ", or a smaller --preset"))
    chunk = args.chunk_size or DEFAULT_CHUNK[dev.type]
    if args.prefix_tokens < chunk:   # the run measured nothing cached: "prefix reused: [0] tokens", exit 0
        ap.error(f"--prefix-tokens {args.prefix_tokens} is shorter than the prefill chunk ({chunk} tokens): the "
                 "prefix cache keeps states at chunk boundaries, so none of it can be reused; give more "
                 "--prefix-tokens or a smaller --chunk-size")
    if args.json:   # before the run, so that its results are never lost at the end
        check_output(args.json)
    try:
        return measure(args, dev, cache_bytes)
    except ahn_rt.AhnError as e:   # bad --weights, --preset, --dtype, --window, ...
        fail(str(e))
    except (RuntimeError, MemoryError) as e:   # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):   # the CPU allocator's failure is a plain RuntimeError
            raise
        fail(f"out of memory on {dev} ({str(e).strip().splitlines()[0][:200]}); use a smaller --preset or "
             "--prefix-tokens, or free the device")


def least_bytes(args) -> int:
    """A lower bound of the bytes the run holds: the prompts as lists of token ids (``measure`` keeps one per
    request, 2 x --repeats + 3 of them, 8 bytes a token each) and the prefix's int64 tensor; the weights of
    --preset (those of --weights are not known before they load)."""
    prompts = (args.prefix_tokens + args.question_tokens) * 8 * (2 * args.repeats + 3) + 8 * args.prefix_tokens
    if args.weights:
        return prompts
    dtype = parse_dtype(args.dtype)
    return prompts + param_count(parse_config(preset_config(args.preset, ahn=True, dtype=dtype), args.preset)) * dtype.itemsize


def measure(args, dev, cache_bytes) -> int:
    """The warm-up, the cold / miss / hit requests, the table (stdout), --json; 0 when every cached
    request's logits equal the cold ones."""
    model = build_model(args, dev)
    c = model.config
    g = torch.Generator().manual_seed(args.seed)
    prefix = torch.randint(0, c.vocab_size, (args.prefix_tokens,), generator=g).tolist()
    questions = [torch.randint(0, c.vocab_size, (args.question_tokens,), generator=g).tolist()
                 for _ in range(2 * args.repeats + 3)]
    prompts = [prefix + q for q in questions]
    sess = model.new_session()
    kept = "every token" if c.mode == "full" else f"window {c.window}, sinks {c.sinks}"   # full ignores W and S
    print(f"[prefix_ttft] {args.weights or args.preset} {c.dtype} on {dev}, mode {c.mode} ({kept}), "
          f"chunk {model.chunk_size}; prompt = {args.prefix_tokens} shared + {args.question_tokens} tokens",
          file=sys.stderr)

    # warm-up: kernels and the allocator at the full prompt length (on an H200 the first 32k prefill took
    # 2.9 s against 1.35 s for the next ones, when the warm-up was a short prompt)
    model.enable_prefix_cache(0)
    ttft(model, sess, prompts[0])

    rows = {}
    model.enable_prefix_cache(0)
    cold_logits = {}
    times = []
    for i in range(args.repeats):
        dt, logits, _ = ttft(model, sess, prompts[1 + i])
        times.append(dt)
        cold_logits[1 + i] = logits.clone()
        print(f"  cold (no cache) #{i}: {dt * 1e3:.1f} ms", file=sys.stderr)
    rows["cold"] = times

    cache = model.enable_prefix_cache(cache_bytes)
    times = []
    for i in range(args.repeats):
        cache.clear()
        dt, logits, hit = ttft(model, sess, prompts[1 + i])
        assert hit == 0
        times.append(dt)
        print(f"  cold (miss, stores snapshots) #{i}: {dt * 1e3:.1f} ms", file=sys.stderr)
    rows["miss"] = times

    # the cache now holds the prefix (from the last miss); each timed request asks a new question
    times, hits, identical = [], [], True
    for i in range(args.repeats):
        k = 1 + args.repeats + i
        dt, logits, hit = ttft(model, sess, prompts[k])
        times.append(dt)
        hits.append(hit)
        model.prefix_cache, saved = None, model.prefix_cache      # the same prompt cold, for the logits
        _, want, _ = ttft(model, sess, prompts[k])
        model.prefix_cache = saved
        same = torch.equal(logits, want)
        identical &= same
        print(f"  cached (hit {hit} tokens) #{i}: {dt * 1e3:.1f} ms, logits identical to cold: {same}",
              file=sys.stderr)
    rows["hit"] = times
    # and the cached run of a prompt already timed cold, against those logits
    _, logits, _ = ttft(model, sess, prompts[1])
    identical &= torch.equal(logits, cold_logits[1])

    if args.profile:   # where a cached request's time goes: one more request with a new question
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            ttft(model, sess, prompts[-2])
        for key in ("cpu_time_total", "self_cpu_time_total") + (("cuda_time_total",) if dev.type == "cuda" else ()):
            print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=55), file=sys.stderr)
        # and the host's Python functions of one more request (cProfile: which step the host time goes to)
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        ttft(model, sess, prompts[-1])
        pr.disable()
        pstats.Stats(pr, stream=sys.stderr).sort_stats("cumulative").print_stats(30)

    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["hit"] / med["cold"]
    st = cache.stats()
    result = dict(model=args.weights or args.preset, device=str(dev), dtype=str(c.dtype), mode=c.mode, window=c.window,
                  sinks=c.sinks, chunk_size=model.chunk_size, prefix_tokens=args.prefix_tokens,
                  question_tokens=args.question_tokens, repeats=args.repeats,
                  cold_ms=[t * 1e3 for t in rows["cold"]], miss_ms=[t * 1e3 for t in rows["miss"]],
                  hit_ms=[t * 1e3 for t in rows["hit"]], hit_tokens=hits, cold_median_ms=med["cold"] * 1e3,
                  miss_median_ms=med["miss"] * 1e3, hit_median_ms=med["hit"] * 1e3, hit_over_cold=ratio,
                  logits_identical=identical, target_met=ratio <= 0.05 and identical,
                  cache_entries=st["entries"], cache_bytes=st["bytes"], state_bytes=sess.state_nbytes)
    print("\n| case | TTFT median (ms) | runs (ms) |\n|---|---|---|")
    for name, key in (("cold, no cache", "cold"), ("cold, cache miss", "miss"), ("cached prefix", "hit")):
        print(f"| {name} | {med[key] * 1e3:.1f} | {', '.join(f'{t * 1e3:.1f}' for t in rows[key])} |")
    print(f"\ncached / cold = {ratio * 100:.2f}% (target <= 5%); logits identical: {identical}; "
          f"prefix reused: {hits} tokens; cache {st['entries']} entries, {st['bytes'] / 2**20:.1f} MiB")
    sys.stdout.flush()
    if args.json and not write_json(result, args.json, indent=2):
        return 1
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
