"""The benchmark's CPU smoke path (bench/decode_latency.py --device cpu) runs for every memory variant and
labels its rows by variant; bench/prefill_bench.py says in one line that it needs a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("impl,tag", [("gdn", "ahn"), ("dn", "ahn-dn"), ("mamba2", "ahn-mamba2")])
def test_decode_latency_cpu_smoke_per_variant(tmp_path, impl, tag):
    out = tmp_path / "tg.json"
    r = _run("bench/decode_latency.py", "--device", "cpu", "--preset", "tiny", "--contexts", "64", "--steps", "2",
             "--warmup", "1", "--prefill", "96", "--ref-contexts", "64", "--ref-steps", "1",
             "--skip", "full,hf,hf-compile", "--ahn-impl", impl, "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    impls = {row["impl"] for row in data["rows"]}
    assert f"ahn_rt {tag} (eager)" in impls and f"ahn_rt {tag}" in impls, impls
    assert data["header"]["model"]["memory"] == {"gdn": "GatedDeltaNet", "dn": "DeltaNet", "mamba2": "Mamba2"}[impl]
    # the batch rows: B sessions of one pool per model.step, every position checked, aggregate tokens/s
    batch = {row["batch"]: row for row in data["rows"] if row.get("batch")}
    assert sorted(batch) == [8, 16], batch
    for B, row in batch.items():
        assert row["position_ok"] and "CHECK FAILED" not in row["note"]
        assert row["tok_s"] == pytest.approx(B * 1e3 / row["ms"])
    assert f"| tg @ d64 b16 | ahn_rt {tag} model.step (eager)" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU path is the device's to run")
def test_prefill_bench_needs_a_gpu():
    r = _run("bench/prefill_bench.py", "--quick")
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr
