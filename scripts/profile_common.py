"""What the profile scripts share: the device kernels of a torch.profiler run, grouped by a short name."""
import torch


def kernel_rows(prof, cut=("(",), width=80) -> dict:
    """{short kernel name: (device time in us, calls)} over the CUDA events of ``prof``. The name drops
    namespaces and "void ", and ends at the first of ``cut`` (the argument list; add "<" to merge template
    instantiations)."""
    rows = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.replace("(anonymous namespace)::", "").replace("void ", "").replace("ahn_rt::", "")
        for c in cut:
            name = name.split(c)[0]
        t, n = rows.get(name[:width], (0.0, 0))
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        rows[name[:width]] = (t + us, n + 1)
    return rows


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def timeline_gaps(trace_path: str, step_name: str = "decode_step") -> dict:
    """Where a decode loop's wall time goes between the GPU's work, from a chrome trace of torch.profiler
    (CPU + CUDA activities) whose steps are ``record_function(step_name)`` blocks. Returns per-step means
    in us: ``wall`` (one step's first GPU start to the next's), ``busy`` (the union of GPU activity),
    ``idle_between`` (the gap before each step's first GPU activity: the host's turn-around), ``idle_inside``
    (the other gaps: kernel boundaries that nothing overlaps), ``gaps_inside`` (how many of those exceed
    1 us), and the host calls' mean durations (``host_<name>``) with ``host_to_launch`` (a step's start to
    its graph launch call) and ``host_step``."""
    import json
    with open(trace_path) as f:
        ev = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in ev
                 if e.get("cat") in GPU_CATS)
    steps = sorted(float(e["ts"]) for e in ev if e.get("name") == step_name and e.get("cat") == "user_annotation")
    if len(steps) < 3 or not gpu:
        raise SystemExit("error: the trace holds too few steps or no GPU activity (was CUDA traced?)")
    # The GPU activity of step i: what starts after step i's host annotation and before step i + 1's work.
    firsts = []
    for s in steps:
        first = next((a for a, _ in gpu if a >= s), None)
        if first is None:
            break
        firsts.append(first)
    n = len(firsts) - 1
    out = {"steps": n, "wall": 0.0, "busy": 0.0, "idle_between": 0.0, "idle_inside": 0.0, "gaps_inside": 0}
    for i in range(n):
        lo, hi = firsts[i], firsts[i + 1]
        seg = [(a, b) for a, b in gpu if lo <= a < hi]
        busy, end, inside, count = 0.0, lo, 0.0, 0
        for a, b in seg:
            if a > end:
                inside += a - end
                count += a - end > 1.0
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        out["wall"] += hi - lo
        out["busy"] += busy
        out["idle_between"] += hi - end
        out["idle_inside"] += inside
        out["gaps_inside"] += count
    for k in ("wall", "busy", "idle_between", "idle_inside", "gaps_inside"):
        out[k] /= n
    host = {}
    for e in ev:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            t, c = host.get(e["name"], (0.0, 0))
            host[e["name"]] = (t + float(e.get("dur", 0)), c + 1)
    for name, (t, c) in sorted(host.items(), key=lambda kv: -kv[1][0])[:8]:
        out[f"host_{name}"] = (t / c, c / len(steps))
    launches = sorted(float(e["ts"]) for e in ev if e.get("name") == "cudaGraphLaunch")
    starts = [e for e in ev if e.get("name") == step_name and e.get("cat") == "user_annotation"]
    out["host_step"] = sum(float(e["dur"]) for e in starts) / len(starts)
    lead = [next((t - s for t in launches if t >= s), None) for s in steps]
    lead = [x for x in lead if x is not None]
    if lead:
        out["host_to_launch"] = sum(lead) / len(lead)
    return out
