"""ahn_rt logits == Hugging Face transformers Qwen2/Qwen3 (float32): mode "full" at any length, and modes
"ahn"/"swa" while the sequence fits in sinks + window (docs/semantics.md §2, §3: no AHN term before S+W)."""
import pytest
import torch

import ahn_rt
from checkpoints import Spec, ahn_only, base, hf_model, merged, random_ids, run_feeds
from oracle import rel_err

# tolerance table (relative error ||a-b||/||b|| over all logits)
# float32 both sides, different kernels and op orders (HF eager attention, torch matmuls vs ahn_rt's ops);
# measured 2.2e-7 .. 6.0e-7 over every case here; the bound leaves headroom for other transformers / BLAS
# builds.
RTOL_HF = 1e-4

SPECS = [Spec("qwen2", tied=True), Spec("qwen2", tied=False), Spec("qwen3", tied=False),
         Spec("qwen3", tied=False, attention_bias=True), Spec("qwen3", tied=True)]


def hf_logits(folder, ids):
    with torch.no_grad():
        return hf_model(folder)(ids[None]).logits[0].float()


def check(got, ref, what):
    assert got.dtype == torch.float32, f"{what}: logits dtype {got.dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    err = rel_err(got, ref)
    print(f"{what}: rel err {err:.2e}, max abs {float((got - ref).abs().max()):.2e}")
    assert err <= RTOL_HF, f"{what}: rel err {err:.3e} > {RTOL_HF}"


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_full_mode_matches_hf(spec, shard):
    folder = base(spec, shard)
    ids = random_ids(70, spec.vocab, seed=1)
    ref = hf_logits(folder, ids)
    # full mode must ignore window/sinks: pass a tiny window that would change the result if used
    model = ahn_rt.load(folder, window=5, sinks=1, dtype=torch.float32, mode="full")
    assert model.config.mode == "full"
    check(run_feeds(model, ids), ref, f"{spec.id} {'sharded' if shard else 'single'} one-shot")


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[2]], ids=lambda s: s.id)
def test_full_mode_chunked_matches_hf(spec, chunk):
    folder = base(spec)
    ids = random_ids(45, spec.vocab, seed=2)
    ref = hf_logits(folder, ids)
    model = ahn_rt.load(folder, dtype=torch.float32, mode="full", chunk_size=chunk)
    check(run_feeds(model, ids), ref, f"{spec.id} chunk_size={chunk}")
    check(run_feeds(model, ids, [3, 17, 1, 24]), ref, f"{spec.id} chunk_size={chunk} feeds 3+17+1+24")


W, S = 16, 4


@pytest.mark.parametrize("length", [1, W - 1, W + S])
@pytest.mark.parametrize("layout", ["ahn-separate", "merged"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_ahn_mode_before_fill_matches_hf(spec, layout, length):
    ids = random_ids(length, spec.vocab, seed=3)
    ref = hf_logits(base(spec), ids)
    if layout == "merged":
        model = ahn_rt.load(merged(spec, W, S), window=W, sinks=S, dtype=torch.float32, mode="ahn")
    else:
        model = ahn_rt.load(base(spec), ahn=ahn_only(spec, W, S), window=W, sinks=S, dtype=torch.float32,
                            mode="ahn")
    assert (model.config.window, model.config.sinks, model.config.mode) == (W, S, "ahn")
    check(run_feeds(model, ids), ref, f"{spec.id} {layout} ahn T={length}")
    check(run_feeds(model, ids, [1] * length), ref, f"{spec.id} {layout} ahn T={length} token-by-token")


@pytest.mark.parametrize("length", [1, W + S])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_swa_mode_before_fill_matches_hf(spec, length):
    ids = random_ids(length, spec.vocab, seed=4)
    ref = hf_logits(base(spec), ids)
    model = ahn_rt.load(base(spec), window=W, sinks=S, dtype=torch.float32, mode="swa")
    assert model.config.mode == "swa"
    check(run_feeds(model, ids), ref, f"{spec.id} swa T={length}")
