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
