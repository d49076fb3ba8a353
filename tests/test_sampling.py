"""Sampling: each filter against Hugging Face's logits processors (test-only dependency), greedy,
seeding, and the one-line errors for bad parameters."""
import pytest
import torch

from ahn_rt import AhnError
from ahn_rt.sampling import Sampler, SamplingParams

hf = pytest.importorskip("transformers.generation.logits_process")

V = 500


def _sampler(**kw):
    return Sampler(SamplingParams(**kw), V, "cpu")


def _hf(logits, seen_ids, *, temperature, top_k, top_p, min_p, rep):
    ids = torch.tensor([seen_ids])
    x = logits[None].clone()
    if rep != 1.0:
        x = hf.RepetitionPenaltyLogitsProcessor(rep)(ids, x)
    x = hf.TemperatureLogitsWarper(temperature)(ids, x)
    if top_k:
        x = hf.TopKLogitsWarper(top_k)(ids, x)
    if top_p < 1.0:
        x = hf.TopPLogitsWarper(top_p)(ids, x)
    if min_p > 0:
        x = hf.MinPLogitsWarper(min_p)(ids, x)
    return x[0]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,rep", [
    (1.0, 0, 1.0, 0.0, 1.0), (0.7, 0, 1.0, 0.0, 1.0), (0.7, 40, 1.0, 0.0, 1.0), (1.0, 0, 0.9, 0.0, 1.0),
    (0.8, 0, 1.0, 0.05, 1.0), (0.6, 20, 0.8, 0.02, 1.3), (1.2, 0, 0.5, 0.0, 0.8),
], ids=lambda v: str(v))
def test_filters_match_hf(temperature, top_k, top_p, min_p, rep):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(V, generator=g) * 3
    seen = torch.randint(0, V, (30,), generator=g).tolist()
    s = _sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep)
    s.observe(torch.tensor(seen))
    ours = s.process(logits)
    ref = _hf(logits, seen, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, rep=rep)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    keep = ~torch.isinf(ref)
    torch.testing.assert_close(ours[keep], ref[keep], rtol=1e-5, atol=1e-5)


def test_greedy_is_argmax_after_penalty():
    logits = torch.randn(V)
    top = int(logits.argmax())
    s = _sampler(temperature=0, repetition_penalty=1e6)
    s.observe(torch.tensor([top]))
    tok = int(s.sample(logits))
    assert tok != top and tok == int(torch.where(torch.arange(V) == top, -1e9, logits).argmax())


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.randn(V)
    a = [int(_sampler(temperature=1.0, seed=7).sample(logits)) for _ in range(3)]
    b = [int(_sampler(temperature=1.0, seed=7).sample(logits)) for _ in range(3)]
    assert a == b
    s = _sampler(temperature=1.0, seed=3)
    draws = torch.tensor([int(s.sample(logits)) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=V).float() / draws.numel()
    p = torch.softmax(logits, -1)
    top = p.argsort(descending=True)[:5]
    assert torch.allclose(freq[top], p[top], atol=0.03), (freq[top], p[top])


def test_top_k_1_and_min_p_1_are_greedy():
    logits = torch.randn(V)
    assert int(_sampler(temperature=1.0, top_k=1, seed=0).sample(logits)) == int(logits.argmax())
    assert int(_sampler(temperature=1.0, min_p=1.0, seed=0).sample(logits)) == int(logits.argmax())


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5),
                                dict(min_p=2), dict(repetition_penalty=0)], ids=lambda k: str(k))
def test_bad_parameters(kw):
    with pytest.raises(AhnError) as e:
        SamplingParams(**kw)
    assert "\n" not in str(e.value)
