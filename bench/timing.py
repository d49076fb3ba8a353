"""Every timing helper of the benchmarks, one copy each (method: bench/README.md, "What is measured").

On a CUDA device a call is timed with CUDA events recorded around it on the current stream (device time,
launch included); elsewhere with ``time.perf_counter``. Compare numbers only within one run on one card.

- ``per_call_ms``: n calls timed one by one (a list, for ``summary``); what the decode rows report.
- ``back_to_back_ms``: n calls issued with no host sync between them (the mean); pure issue/replay rate.
- ``events_us``: warm-up, then one call at a time with a sync after each; (median, max - min) in µs.
- ``capture_graph`` / ``graph_us``: capture a call once in a CUDA graph and time its replays.
- ``summary``: median and spread of a list of times.
- ``sync``, ``free_memory``, ``peak_gib``: the device hygiene between rows.
"""
from __future__ import annotations

import gc
import statistics
import time

import torch

GiB = 1 << 30


def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def per_call_ms(fn, n: int, dev: torch.device) -> list[float]:
    """Time n calls of fn one by one: CUDA events around each call on the GPU (fn may sync inside,
    e.g. to read a token), perf_counter elsewhere. Returns milliseconds per call."""
    if dev.type == "cuda":
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in evs:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(dev)
        return [a.elapsed_time(b) for a, b in evs]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def back_to_back_ms(fn, n: int, dev: torch.device) -> float:
    """Mean milliseconds per call of n calls issued with no host sync between them."""
    sync(dev)
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        torch.cuda.synchronize(dev)
        return a.elapsed_time(b) / n
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) * 1e3 / n


def summary(ms: list[float]) -> dict:
    """Median and spread (half the interquartile range, robust to the odd slow step)."""
    ms = sorted(ms)
    med = statistics.median(ms)
    if len(ms) >= 4:
        q = statistics.quantiles(ms, n=4)
        spread = (q[2] - q[0]) / 2
    else:
        spread = (ms[-1] - ms[0]) / 2
    return dict(ms=med, spread_ms=spread, min_ms=ms[0], max_ms=ms[-1],
                std_ms=statistics.pstdev(ms), n=len(ms))


def events_us(fn, reps=20, warm=3):
    """(median, max - min) in microseconds of fn() on the current CUDA device: `warm` untimed calls,
    then `reps` calls timed with CUDA events, each waited for before the next is issued."""
    dev = torch.device("cuda", torch.cuda.current_device())
    for _ in range(warm):
        fn()
    times = [per_call_ms(fn, 1, dev)[0] * 1e3 for _ in range(reps)]
    return statistics.median(times), (max(times) - min(times))


def capture_graph(fn, warm: int = 1) -> torch.cuda.CUDAGraph:
    """fn() captured once in a CUDA graph, after `warm` untimed calls on a side stream (which set up the
    allocator and the library handles outside the capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    return g


def graph_us(fn, calls=1, reps=20):
    """fn() issues `calls` kernels' worth of work; capture it once (``capture_graph``) and return
    (median, spread) in microseconds per call of the graph's replays (``events_us``)."""
    g = capture_graph(fn)
    med, spread = events_us(g.replay, reps=reps)
    return med / calls, spread / calls


def free_memory(dev: torch.device):
    """Drop what the last row left behind and restart the peak-memory count."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float | None:
    """Peak allocated device memory since the last ``free_memory`` (None off CUDA)."""
    return torch.cuda.max_memory_allocated(dev) / GiB if dev.type == "cuda" else None
