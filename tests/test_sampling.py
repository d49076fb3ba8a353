"""Sampling: each filter against Hugging Face's logits processors (test-only dependency), greedy,
seeding, the distribution of the draws (a chi-square goodness-of-fit test that wrong samplers fail), and
the one-line errors for bad parameters."""
import math

import pytest
import torch

from ahn_rt import AhnError
from ahn_rt.sampling import Sampler, SamplingParams
from capture_spy import HostSpy

hf = pytest.importorskip("transformers.generation.logits_process")

# ---- tolerance table ------------------------------------------------------------------------------
# process() vs Hugging Face's processors: the same float32 ops (divide, compare, softmax, cumsum) in a
# different order; processed logits are O(10), where a float32 ulp is ~1e-6.
HF_RTOL = HF_ATOL = 1e-5
# Chi-square goodness of fit of the draws: a correct sampler exceeds the critical value with probability
# CHI2_P (once in a million runs; the seeds are fixed, so the test is deterministic anyway).
CHI2_P = 1e-6
E_MIN = 5.0            # fewest expected draws per bin (Cochran's rule); rarer tokens share one pooled bin
N_DRAWS = 10_000       # per distribution: ~0.15 s of Exponential noise over the vocabulary
# Wrong samplers must fail by far: their expected statistic minus WRONG_SD standard deviations (noncentral
# chi-square) must still exceed the critical value, and their seeded statistic must be WRONG_FACTOR x it.
WRONG_SD = 10.0
WRONG_FACTOR = 10.0
# Checks of the critical value: the closed form vs torch.special.gammaincc (float64: ~1e-12 apart) and
# vs the df = 1 / df = 2 closed forms (bisection to 1e-12); Wilson-Hilferty is an approximation: measured
# 2.3% high at df = 10, 0.2% at df = 100, 0.02% at df = 400.
CRIT_RTOL = 1e-8
WH_RTOL = 0.03
TABLE_RTOL = 1e-5      # printed chi-square tables give 5 significant digits (df = 1: 23.928)

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
    torch.testing.assert_close(ours[keep], ref[keep], rtol=HF_RTOL, atol=HF_ATOL)


def test_greedy_is_argmax_after_penalty():
    logits = torch.randn(V)
    top = int(logits.argmax())
    s = _sampler(temperature=0, repetition_penalty=1e6)
    s.observe(torch.tensor([top]))
    tok = int(s.sample(logits))
    assert tok != top and tok == int(torch.where(torch.arange(V) == top, -1e9, logits).argmax())


# ---- chi-square goodness of fit ---------------------------------------------------------------------
def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square(df), integer df, in closed form: Q(df/2, x/2) with
    Q(k, y) = e^-y sum_{i<k} y^i / i! (even df) and Q(k + 1/2, y) = erfc(sqrt y) + e^-y sum_{i<k}
    y^(i+1/2) / Gamma(i + 3/2) (odd df); terms in log space so that large df do not overflow."""
    y = x / 2.0
    if y <= 0:
        return 1.0
    if df % 2 == 0:
        return sum(math.exp(i * math.log(y) - y - math.lgamma(i + 1)) for i in range(df // 2))
    return math.erfc(math.sqrt(y)) + sum(math.exp((i + 0.5) * math.log(y) - y - math.lgamma(i + 1.5))
                                         for i in range(df // 2))


def chi2_isf(p: float, df: int) -> float:
    """The critical value x with P(X > x) = p, by bisection on the closed form above."""
    lo, hi = 0.0, float(df) + 10.0
    while chi2_sf(hi, df) > p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, df) > p else (lo, mid)
    return (lo + hi) / 2


def _normal_isf(p: float) -> float:
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * math.erfc(mid / math.sqrt(2)) > p else (lo, mid)
    return (lo + hi) / 2


def wilson_hilferty(p: float, df: int) -> float:
    c = 2.0 / (9 * df)
    return df * (1 - c + _normal_isf(p) * math.sqrt(c)) ** 3


def test_chi2_critical_value():
    """The critical value is right: exact closed forms at df = 1 (z^2 at p/2) and df = 2 (2 ln 1/p), the
    regularized gamma of torch.special at every df used here, and Wilson-Hilferty at large df."""
    assert math.isclose(chi2_isf(CHI2_P, 1), _normal_isf(CHI2_P / 2) ** 2, rel_tol=CRIT_RTOL)
    assert math.isclose(chi2_isf(CHI2_P, 2), 2 * math.log(1 / CHI2_P), rel_tol=CRIT_RTOL)
    assert math.isclose(chi2_isf(CHI2_P, 1), 23.928, rel_tol=TABLE_RTOL)
    for df in (1, 2, 3, 9, 10, 19, 44, 100, 165, 400):
        x = chi2_isf(CHI2_P, df)
        q = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                          torch.tensor(x / 2, dtype=torch.float64)))
        assert math.isclose(q, CHI2_P, rel_tol=CRIT_RTOL), (df, x, q)
        if df >= 10:
            assert math.isclose(x, wilson_hilferty(CHI2_P, df), rel_tol=WH_RTOL), (df, x)


def chi2_bins(p: torch.Tensor, n: int) -> torch.Tensor:
    """Token ids that get a bin of their own: expected count >= E_MIN, while the pooled rest (every other
    token, zero-probability ones included) also keeps >= E_MIN expected draws."""
    order = torch.argsort(p, descending=True)
    expected = p[order].double() * n
    own = int((expected >= E_MIN).sum())
    while own > 1 and float(expected[own:].sum()) < E_MIN:
        own -= 1
    return order[:own]


def binned(p: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Probabilities of the bins: one per token in ``own``, then the pool."""
    p = p.double()
    return torch.cat([p[own], (p.sum() - p[own].sum()).clamp_min(0).view(1)])


def chi2_stat(draws: torch.Tensor, p: torch.Tensor, own: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of the draws against p over the bins of chi2_bins, and its degrees of freedom."""
    n = draws.numel()
    counts = torch.bincount(draws, minlength=V).double()
    observed = torch.cat([counts[own], (n - counts[own].sum()).view(1)])
    expected = binned(p, own) * n
    return float(((observed - expected) ** 2 / expected).sum()), observed.numel() - 1


def sampler_draws(params: SamplingParams, logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n draws from the sampler, vectorised the way Sampler.sample draws one: argmax(probs / E) with
    Exponential(1) noise from the sampler's own generator. Returns (draws, probs)."""
    s = Sampler(params, V, "cpu")
    probs = torch.softmax(s.process(logits), -1)
    noise = s.noise(torch.empty(n, V))
    return (probs / noise).argmax(-1), probs


CASES = {   # name -> sampling parameters; each filter restricts the distribution to a few tokens
    "T1": dict(temperature=1.0),
    "T0.7": dict(temperature=0.7),
    "top_k20": dict(temperature=1.0, top_k=20),
    "top_p0.9": dict(temperature=1.0, top_p=0.9),
    "min_p0.02": dict(temperature=1.2, min_p=0.02),
}


@pytest.mark.parametrize("case", list(CASES))
def test_seeded_sampling_is_reproducible_and_follows_the_distribution(case):
    kw = CASES[case]
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 2

    def five_tokens():
        s = _sampler(seed=7, **kw)
        return [int(s.sample(logits)) for _ in range(5)]

    a = five_tokens()
    assert five_tokens() == a                  # the same seed gives the same tokens through Sampler.sample
    # the vectorised draws below are exactly Sampler.sample's draws (the generator fills in order)
    draws, p = sampler_draws(SamplingParams(seed=7, **kw), logits, N_DRAWS)
    assert draws[:5].tolist() == a
    support = int((p > 0).sum())
    if "top_k" in kw:
        assert support == kw["top_k"]          # the top-k case restricts the distribution to k tokens
    assert bool((p[draws] > 0).all()), "a token outside the filtered distribution was drawn"
    own = chi2_bins(p, N_DRAWS)
    stat, df = chi2_stat(draws, p, own)
    crit = chi2_isf(CHI2_P, df)
    print(f"{case}: support {support}, {df + 1} bins, chi2 {stat:.1f}, critical value {crit:.1f} (p={CHI2_P})")
    assert stat < crit, f"{case}: chi2 {stat:.1f} >= {crit:.1f}: draws do not follow the distribution"

    # Wrong samplers, judged by the same function against the same bins, must fail by a wide margin.
    T = kw["temperature"]
    g = torch.Generator().manual_seed(11)
    wrong = {"uniform over the vocabulary": torch.full((V,), 1.0 / V),
             "temperature x2": sampler_draws(SamplingParams(**{**kw, "temperature": 2 * T}), logits, 1)[1],
             "temperature /2": sampler_draws(SamplingParams(**{**kw, "temperature": T / 2}), logits, 1)[1]}
    if set(kw) != {"temperature"}:
        name = "filter ignored (" + ", ".join(k for k in kw if k != "temperature") + ")"
        wrong[name] = sampler_draws(SamplingParams(temperature=T), logits, 1)[1]
    pb = binned(p, own)
    for name, q in wrong.items():
        # noncentral chi-square: mean df + lam, variance 2 (df + 2 lam)
        lam = N_DRAWS * float(((binned(q, own) - pb) ** 2 / pb).sum())
        worst = df + lam - WRONG_SD * math.sqrt(2 * (df + 2 * lam))
        wrong_stat, _ = chi2_stat(torch.multinomial(q, N_DRAWS, replacement=True, generator=g), p, own)
        print(f"  {name}: chi2 {wrong_stat:.0f} (expected {df + lam:.0f}, -{WRONG_SD:g} sd: {worst:.0f})")
        assert worst > crit, f"{case}: {name} is not always caught (mean - {WRONG_SD} sd = {worst:.1f})"
        assert wrong_stat > WRONG_FACTOR * crit, f"{case}: {name} chi2 {wrong_stat:.1f} is not far above {crit:.1f}"



@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, top_k=1, seed=0)], ids=["greedy", "top_k1"])
def test_sampled_tokens_count_as_seen(kw):
    """The repetition penalty covers the tokens generated so far, not only the observed prompt (HF's
    RepetitionPenaltyLogitsProcessor sees every id before the step): with a penalty of 1e6 on the same
    logits, each draw is the next-best token, the three draws are the three largest logits in order. A
    sampler that forgot to mark its own draws would repeat the argmax."""
    logits = torch.randn(V, generator=torch.Generator().manual_seed(2))
    top = torch.topk(logits, 4).indices.tolist()
    assert logits[top[3]] > 0                  # so each penalized top token drops below the next one
    s = _sampler(repetition_penalty=1e6, **kw)
    assert [int(s.sample(logits)) for _ in range(3)] == top[:3]
    assert s.seen.nonzero().view(-1).tolist() == sorted(top[:3])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.3),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, seed=1),
], ids=["greedy", "greedy-penalty", "sampled"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_give_the_non_finite_mark(params, bad):
    """A logits row holding NaN or inf was "sampled": greedy took the NaN's (or inf's) argmax, sampling the
    argmax of an all-NaN softmax, token 0 (often the end of sequence: an empty reply, no error). Now the id is
    NON_FINITE (-1), read with the id the host reads anyway: no host read of its own (HostSpy sees none, so the
    CUDA decode graph can capture it); a finite row samples as before."""
    from ahn_rt.sampling import NON_FINITE
    logits = torch.randn(V, generator=torch.Generator().manual_seed(4))
    s = Sampler(params, V, "cpu")
    assert 0 <= int(s.sample(logits)) < V
    logits[7] = bad
    s = Sampler(params, V, "cpu")
    noise = s.noise(logits)
    with HostSpy() as spy:
        tok = s.sample(logits, noise=noise)
    assert spy.found == [] and tok.shape == (1,) and int(tok) == NON_FINITE


def test_top_k_1_and_min_p_1_are_greedy():
    logits = torch.randn(V)
    assert int(_sampler(temperature=1.0, top_k=1, seed=0).sample(logits)) == int(logits.argmax())
    assert int(_sampler(temperature=1.0, min_p=1.0, seed=0).sample(logits)) == int(logits.argmax())


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5),
                                dict(min_p=2), dict(repetition_penalty=0),
                                dict(temperature=float("inf")), dict(temperature=float("nan")),
                                dict(repetition_penalty=float("inf")), dict(seed=2 ** 64), dict(seed=-(2 ** 63) - 1),
                                dict(seed=99999999999999999999999), dict(seed=1.5), dict(seed=True)],
                         ids=lambda k: str(k))
def test_bad_parameters(kw):
    with pytest.raises(AhnError) as e:
        SamplingParams(**kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw", [dict(temperature=10 ** 400), dict(top_p=10 ** 400), dict(min_p=-10 ** 400),
                                dict(repetition_penalty=10 ** 400)], ids=lambda k: next(iter(k)))
def test_ints_past_every_float_are_one_line(kw):
    """An int is a number, but 10**400 overflowed in the checks: a raw OverflowError."""
    with pytest.raises(AhnError, match=f"{next(iter(kw))} must be"):
        SamplingParams(**kw)


def test_any_real_number_samples_as_its_float():
    """Fractions are numbers.Real, so the checks took them, and sampling failed inside torch (Tensor / Fraction:
    TypeError) once the generation had started; numpy's scalars too: each samples as its float."""
    from fractions import Fraction
    np = pytest.importorskip("numpy")
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1))
    for kw in (dict(temperature=Fraction(1, 2), top_p=Fraction(3, 4), min_p=Fraction(1, 8),
                    repetition_penalty=Fraction(5, 4)),
               dict(temperature=np.float64(0.5), top_k=np.int32(40), top_p=np.float32(0.75), min_p=np.float16(0.125),
                    repetition_penalty=np.float64(1.25))):
        got = _sampler(**{**dict(top_k=40, seed=3), **kw})
        want = _sampler(temperature=0.5, top_k=40, top_p=0.75, min_p=0.125, repetition_penalty=1.25, seed=3)
        assert all(type(getattr(got.p, k)) is float for k in ("temperature", "top_p", "min_p", "repetition_penalty"))
        assert type(got.p.top_k) is int and got.p == want.p
        for _ in range(3):
            assert torch.equal(got.process(logits), want.process(logits))
            assert torch.equal(got.sample(logits), want.sample(logits))


@pytest.mark.parametrize("rp", [1e-40, 1e-300])
def test_a_tiny_repetition_penalty_favours_the_seen_tokens(rp):
    """A penalty below 1 divides the seen tokens' positive logits by it: 1e-40 overflowed them to inf, the
    softmax was NaN everywhere, and every sample was token 0 (an end of sequence: an empty reply)."""
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0))
    seen = [i for i in range(1, V) if logits[i] > 0][:3]
    s = _sampler(temperature=0.7, repetition_penalty=rp, seed=1)
    s.observe(torch.tensor(seen))
    assert not s.process(logits).isnan().any()
    assert {int(s.sample(logits)) for _ in range(20)} <= set(seen)


def test_every_seed_in_range_seeds_the_generator():
    from ahn_rt.sampling import SEED_MAX, SEED_MIN
    for seed in (SEED_MIN, -1, 0, SEED_MAX):
        _sampler(temperature=1.0, seed=seed).sample(torch.randn(V))     # torch takes it (no overflow)


# ---- the graph path ---------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.3),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1, seed=1),
    SamplingParams(temperature=1.0, top_p=1e-300, seed=2),
], ids=["greedy", "greedy-penalty", "all-filters", "tiny-top-p"])
def test_sampling_as_captured_makes_no_host_tensor_and_reads_nothing_back(params):
    """The CUDA stepper captures ``sample(logits, noise=...)`` into its graph, where a tensor made from
    host data or a read back to the host fails (the top-p fix once assigned ``drop[0] = False``: every
    seeded top-p generation on the graph path raised). Checked on the CPU by op name; the spy flags that
    old form, so the check can fail."""
    s = Sampler(params, 64, "cpu")
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    noise = s.noise(logits)
    with HostSpy() as spy:
        s.sample(logits, noise=noise)
    assert spy.found == []
    drop = torch.zeros(4, dtype=torch.bool)
    with HostSpy() as spy:
        drop[0] = False          # the old form
        int(drop.sum())          # and a read back
    assert len(spy.found) == 2 and "host data" in spy.found[0] and "read back" in spy.found[1]
