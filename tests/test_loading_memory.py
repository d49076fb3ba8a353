"""Loading reads tensor by tensor from memory-mapped files: peak host memory stays near one copy."""
import subprocess
import sys

import torch

from ahn_rt.init_weights import preset_config, random_state_dict, write_checkpoint

# tolerance table: bounds on the peak host memory growth while loading, as a fraction of the file size
# (a float32 checkpoint loaded as float32, so the weights themselves are one file's worth).
RSS_MIN_FRACTION = 0.2   # the probe must see the weights being read at all (a probe measuring nothing fails)
RSS_MAX_FRACTION = 1.5   # about one copy: a loader holding two copies at once (2.0) fails

# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's high-water mark at fork.
PROBE = r"""
import sys, ahn_rt
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
before = hwm()
ahn_rt.load(sys.argv[1], mode="full", dtype="float32")
print((hwm() - before) * 1024)
"""


def test_peak_rss_while_loading_is_about_one_copy(tmp_path):
    cfg = preset_config("tiny", False, torch.float32)
    cfg.update(hidden_size=512, intermediate_size=2048, num_hidden_layers=8)
    path = tmp_path / "model.safetensors"
    write_checkpoint(path, random_state_dict(cfg, ahn=False, dtype=torch.float32), cfg)
    size = path.stat().st_size                     # ~450 MB, more than importing torch takes
    out = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True)
    grew = int(out.stdout.strip().splitlines()[-1])
    print(f"file {size / 2**20:.0f} MiB, peak RSS grew {grew / 2**20:.0f} MiB")
    assert RSS_MIN_FRACTION * size < grew < RSS_MAX_FRACTION * size
