"""The training path on a GPU (``pytest -m cuda``): the student's window attention through compiled
FlexAttention (the CUDA default) against the SDPA backend and a float64 dense softmax, values and
gradients, and one student forward + backward of TrainModel through each backend.

Tolerances: float32 FLEX32 = 1e-4 relative (both sides float32, different tilings of the softmax sums;
TF32 is off). bf16: each backend's error against the float64 dense softmax, computed from the same bf16
inputs; flex may be at most 2x the SDPA backend's error + 2e-3 (bf16 epsilon 7.8e-3 over sums of ~200
keys; a wrong mask costs O(1)).
"""
from __future__ import annotations

import pytest
import torch

from ahn_rt import init_weights
from ahn_rt.config import parse_config
from ahn_rt.train.attention import window_attention, window_plan
from ahn_rt.train.model import TrainModel
from ahn_rt.weights import is_ahn_key
from oracle import rel_max, window_attention_dense

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
FLEX32, BF16_FACTOR, BF16_SLACK = 1e-4, 2.0, 2e-3


rel = rel_max


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_window_attention_matches_sdpa(dtype):
    B, L, H, Hkv, D = 3, 1000, 8, 2, 64
    WS = [(200, 64), (129, 0), (513, 128)]
    W = torch.tensor([w for w, _ in WS])
    S = torch.tensor([s for _, s in WS])
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, L, h, D, device="cuda", generator=g).to(dtype).requires_grad_() for h in (H, Hkv, Hkv))
    cot = torch.randn(B, L, H, D, device="cuda", generator=g).to(dtype)
    res = {}
    for backend in ("flex", "sdpa"):
        out = window_attention(q, k, v, None, None, plan=window_plan(W, S, L, "cuda", backend=backend))
        res[backend] = (out.detach(), *torch.autograd.grad((out * cot).sum(), (q, k, v)))
    if dtype == torch.float32:
        for a, b in zip(res["flex"], res["sdpa"]):
            assert rel(a, b) < FLEX32
    else:
        ref = window_attention_dense(q.detach(), k.detach(), v.detach(), W.tolist(), S.tolist())
        e_flex, e_sdpa = rel(res["flex"][0], ref), rel(res["sdpa"][0], ref)
        assert e_flex < BF16_FACTOR * e_sdpa + BF16_SLACK, (e_flex, e_sdpa)
        for a, b in zip(res["flex"][1:], res["sdpa"][1:]):   # gradients: flex vs sdpa, both bf16
            assert rel(a, b) < 2e-2


def test_student_backward_flex_equals_sdpa(monkeypatch):
    """One checkpointed student forward + distillation-style backward at float32 through both backends:
    the same loss and the same AHN gradients."""
    cfg = init_weights.preset_config("tiny", ahn=True, dtype=torch.float32)
    sd = init_weights.random_state_dict(cfg, seed=0, dtype=torch.float32, ahn=True, std=0.05)
    base = {k: v.cuda() for k, v in sd.items() if not is_ahn_key(k)}
    ahn = {k: v.cuda() for k, v in sd.items() if is_ahn_key(k)}
    ids = torch.randint(0, cfg["vocab_size"], (2, 600), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    W, S = torch.tensor([150, 300]), torch.tensor([32, 0])
    out = {}
    for backend in ("flex", "sdpa"):
        monkeypatch.setenv("AHN_RT_TRAIN_ATTENTION", backend)
        tm = TrainModel(parse_config(cfg, "tiny"), base, ahn, base_dtype=torch.float32)
        h = tm.forward_student(ids, W, S, checkpoint=True)
        loss = tm.lm_logits(h).float().logsumexp(-1).mean()
        params = [p for p in tm.parameters() if p.requires_grad]
        out[backend] = (loss.detach(), torch.autograd.grad(loss, params, allow_unused=True))
    assert rel(out["flex"][0], out["sdpa"][0]) < FLEX32
    grads = [(a, b) for a, b in zip(out["flex"][1], out["sdpa"][1])]
    assert [a is None for a, _ in grads] == [b is None for _, b in grads]
    assert sum(a is not None for a, _ in grads) >= 6
    for a, b in grads:
        if a is not None:
            assert rel(a, b) < 1e-3


def test_flex_lengths_do_not_recompile_each_step(monkeypatch):
    """Training pads a batch to its longest sequence, so L changes from step to step. Ten new lengths
    through the real training setting (bf16 autocast, per-layer checkpointing, backward) must add only
    the one dynamic recompile, not a graph per length (which past Dynamo's recompile limit would run flex
    eagerly over the full [B, H, L, L] scores). Each length's loss still matches the SDPA backend."""
    import torch._dynamo.utils as dynamo_utils
    cfg = init_weights.preset_config("tiny", ahn=True, dtype=torch.float32)
    sd = init_weights.random_state_dict(cfg, seed=0, dtype=torch.float32, ahn=True, std=0.05)
    base = {k: v.cuda() for k, v in sd.items() if not is_ahn_key(k)}
    ahn = {k: v.cuda() for k, v in sd.items() if is_ahn_key(k)}
    W, S = torch.tensor([96]), torch.tensor([16])

    def step(backend, L, seed):
        monkeypatch.setenv("AHN_RT_TRAIN_ATTENTION", backend)
        tm = TrainModel(parse_config(cfg, "tiny"), base, ahn, base_dtype=torch.bfloat16)
        ids = torch.randint(0, cfg["vocab_size"], (1, L), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(seed))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = tm.lm_logits(tm.forward_student(ids, W, S, checkpoint=True)).float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach()

    step("flex", 250, 0)
    step("flex", 260, 0)   # the first new length: the one recompile with L symbolic
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    for i, L in enumerate((300, 333, 384, 401, 512, 555, 640, 700, 777, 850)):
        got, ref = step("flex", L, i), step("sdpa", L, i)
        assert rel(got, ref) < 2e-2, (L, got, ref)
    assert dynamo_utils.counters["stats"]["unique_graphs"] - graphs <= 4
