"""Timing helpers shared by the op benchmarks: CUDA events around a call (median and spread, after a
warm-up) and the same call captured once in a CUDA graph and replayed (device time without Python or
launch gaps). Method: shared/PERF.md."""
import statistics

import torch


def events_us(fn, reps=20, warm=3):
    """(median, max - min) in microseconds of fn() timed with CUDA events."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times), (max(times) - min(times))


def graph_us(fn, calls=1, reps=20):
    """fn() issues `calls` kernels' worth of work; capture it once (after a warm-up on a side stream) and
    return (median, spread) in microseconds per call of the graph's replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    med, spread = events_us(g.replay, reps=reps)
    return med / calls, spread / calls
