"""Token sampling on the device, without a host sync: repetition penalty, temperature, top-k, top-p,
min-p, seeded. Written with plain tensor ops of fixed shapes so the CUDA decode graph can capture it.

Order (as Hugging Face's generate applies its processors): repetition penalty, temperature, top-k,
top-p, min-p; temperature 0 (any below GREEDY_BELOW) means greedy (argmax after the repetition penalty).
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .errors import AhnError, as_int

# The seeds torch.Generator.manual_seed takes (any other overflows inside torch): the one rule for every
# seed a user gives (SamplingParams, the server's "seed" field, init_weights --seed).
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1

# The id ``Sampler.sample`` returns for a logits row that holds NaN or inf: never a token, so the host, which reads
# the id anyway, tells the failure from a sample without a sync of its own (``_Run`` raises NonFiniteLogits).
NON_FINITE = -1

# Temperatures below this are greedy, as in vLLM: logits / 1e-40 overflow float32, and the softmax of an inf
# is NaN, whose "sample" was always token 0 (the demo model's end of sequence: an empty reply).
GREEDY_BELOW = 1e-5


def check_seed(seed, what: str = "seed"):
    """AhnError (one line, naming ``what``) unless ``seed`` is None or an integer in [SEED_MIN, SEED_MAX]."""
    if seed is None:
        return
    if as_int(seed) is None:
        raise AhnError(f"{what} must be an integer, got {seed!r}")
    if not SEED_MIN <= seed <= SEED_MAX:
        raise AhnError(f"{what} must be in [{SEED_MIN}, {SEED_MAX}], got {seed}")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        # Types first: a string, None or a float top_k would otherwise fail later, inside torch, with a
        # TypeError (top_k=1.5 only once the generation has started).
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise AhnError(f"{name} must be a number, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise AhnError(f"top_k must be an integer (0 = off), got {self.top_k!r}")
        # Python floats (and an int) from here on: a Fraction (a numbers.Real) failed inside torch once the
        # generation had started (Tensor / Fraction: TypeError), an int past every float (10**400) in the
        # checks below (OverflowError)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            try:
                value = float(value)
            except OverflowError:
                value = math.inf if value > 0 else -math.inf
            object.__setattr__(self, name, value)
        object.__setattr__(self, "top_k", as_int(self.top_k))
        checks = [
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise AhnError(msg)
        check_seed(self.seed)
        if self.seed is not None:      # numpy's integers too: a Python int from here on
            object.__setattr__(self, "seed", as_int(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Sampler:
    """Holds the device-side sampling state of one generation: the seen-token mask for the repetition
    penalty and the random generator."""

    def __init__(self, params: SamplingParams, vocab_size: int, device):
        self.p = params
        self.device = torch.device(device)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
        self.gen = torch.Generator(device=self.device)
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def observe(self, ids: torch.Tensor):
        """Mark tokens (prompt or generated) as seen for the repetition penalty."""
        self.seen[ids.reshape(-1)] = True

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """Exponential(1) noise: argmax(p / E) is a sample from p (no host sync, unlike multinomial)."""
        return torch.empty_like(like).exponential_(generator=self.gen)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after repetition penalty, temperature, top-k, top-p and min-p (removed tokens at
        -inf). With temperature 0 only the repetition penalty applies."""
        p = self.p
        x = logits.float()
        if p.repetition_penalty != 1.0:
            pen = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            x = torch.where(self.seen, pen, x)
        if p.greedy:
            return x
        x = x / p.temperature
        if p.repetition_penalty < 1.0:
            # a penalty below 1 divides the seen tokens' positive logits by it: a tiny one (1e-40) made them
            # inf, whose softmax is NaN everywhere, and the NaN "sample" was always token 0 (the demo
            # model's end of sequence: an empty reply). Clamped, they are the likeliest tokens, as meant.
            x = x.clamp(max=torch.finfo(x.dtype).max)
        if p.top_k and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, -1)
            # drop a token once the mass before it already reaches top_p (the first always stays)
            drop_sorted = (probs.cumsum(-1) - probs) >= p.top_p
            # a top_p under float32's range (1e-300) is 0 there: it dropped them all. fill_ takes a scalar
            # argument; `drop_sorted[0] = False` copies a CPU tensor, which a CUDA graph capture refuses
            drop_sorted[:1].fill_(False)
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            x = x.masked_fill(drop, float("-inf"))
        if p.min_p > 0:
            probs = torch.softmax(x, -1)
            x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        return x

    def sample(self, logits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """logits: float32 [vocab] -> int64 [1] on the device; marks the token as seen. A row holding NaN or inf
        gives ``NON_FINITE`` (-1) instead: the row's sum is finite exactly when every logit is (NaN and inf carry
        through a sum; finite logits would need a mean past 1e33 to overflow it), one reduction on the device and
        no host sync (the CUDA decode graph captures it; ``isfinite(logits).all()`` took 20x the time on the
        CPU). The caller reads the id anyway and must not feed -1 to the model."""
        finite = torch.isfinite(logits.sum(dtype=torch.float32))
        x = self.process(logits)
        if self.p.greedy:
            tok = x.argmax().view(1)
        else:
            probs = torch.softmax(x, -1)
            if noise is None:
                noise = self.noise(probs)
            tok = (probs / noise).argmax().view(1)
        self.seen.index_fill_(0, tok, True)   # no host scalar: safe inside a CUDA graph
        return tok.masked_fill(~finite, NON_FINITE)


# The most top_logprobs / logprobs=k one generation may ask for (OpenAI's chat limit, vLLM's default).
MAX_LOGPROBS = 20


@dataclasses.dataclass
class TokenLogprob:
    """The log-probability of one generated token: ``token_id``, its ``logprob`` and ``top``, the ``k`` most
    likely tokens of that step as (id, logprob) pairs, most likely first (the chosen token is among them only
    when it is one of the k). The values are the log-softmax of the model's float32 logits at that step,
    before the repetition penalty, temperature, top-k, top-p and min-p (vLLM's default "raw" logprobs).
    ``offset``: where the token's text starts in the generated text, in characters (tokens that together
    make one character share its offset)."""
    token_id: int
    logprob: float
    top: list
    offset: int = 0


class LogprobTaker:
    """The log-probabilities of a generation's sampled tokens, computed on the logits' device right after each
    step and copied into host buffers without a sync (pinned memory on CUDA): ``take(logits, tok)`` after the
    step, then ``read(tid)`` once the caller has read the sampled id (the one host sync per token; the copy
    was queued before it)."""

    def __init__(self, k: int, vocab_size: int, device):
        self.k = min(k, vocab_size)
        pin = torch.device(device).type == "cuda"
        self._vals = torch.empty(1 + self.k, dtype=torch.float32, pin_memory=pin)
        self._ids = torch.empty(self.k, dtype=torch.int64, pin_memory=pin)

    def take(self, logits: torch.Tensor, tok: torch.Tensor):
        """Queue the log-softmax of ``logits`` (float32 [vocab], on the device) at ``tok`` (int64 [1]) and its
        top k. Reads ``logits`` now (in stream order): a static buffer the next step overwrites is safe."""
        lp = torch.log_softmax(logits.float(), -1)
        chosen = lp.gather(0, tok.view(1).clamp(min=0))   # NON_FINITE (-1) indexes nothing: the run stops on it
        if self.k:
            top = torch.topk(lp, self.k)
            self._ids.copy_(top.indices, non_blocking=True)
            chosen = torch.cat([chosen, top.values])
        self._vals.copy_(chosen, non_blocking=True)

    def read(self, tid: int, offset: int) -> TokenLogprob:
        vals = self._vals.tolist()
        return TokenLogprob(tid, vals[0], list(zip(self._ids.tolist(), vals[1:])), offset)


# Logits rows per block of PromptScorer.take: [rows, vocab] float32 is 78 MB at the 3B shape (vocab 151936), and
# its log-softmax as much again, where a whole 4096-token chunk would be 2.5 GB each.
SCORE_ROWS = 128


class PromptScorer:
    """The log-probabilities of a prompt's own tokens, taken during its prefill (``Model.generate(...,
    prompt_logprobs=k)``, the server's ``echo``): the value at position t >= 1 is the log-softmax of the logits
    at position t - 1, at token t, with the k likeliest tokens there. Each prefill chunk hands over its final
    hidden states (``take``); their logits are made ``SCORE_ROWS`` rows at a time and only the chosen token's
    value and the top k of each row are kept, on the device: the full [chunk, vocab] logits never exist. The
    last prompt position has no prompt token to score (the first generated token's logits are the prefill's
    usual last row, untouched). ``read`` copies everything to the host once, after the prefill."""

    def __init__(self, ids: torch.Tensor, k: int, vocab_size: int):
        self.ids = ids                       # the prompt's ids (int64, on the device)
        self.k = min(k, vocab_size)
        self.at = 0                          # prompt positions fed so far
        self._vals: list[torch.Tensor] = []  # per block: float32 [rows, 1 + k] (chosen, then the top k)
        self._top: list[torch.Tensor] = []   # per block: int64 [rows, k]

    def take(self, logits_of, rows: int):
        """The chunk of ``rows`` positions just fed: ``logits_of(a, b)`` gives float32 logits [b - a, vocab] of
        its rows a..b-1 (the chunk's final hidden states through the norm and lm_head)."""
        n = min(rows, self.ids.numel() - 1 - self.at)   # rows whose next token is a prompt token
        for a in range(0, max(n, 0), SCORE_ROWS):
            b = min(a + SCORE_ROWS, n)
            lp = torch.log_softmax(logits_of(a, b).float(), -1)
            target = self.ids[self.at + a + 1: self.at + b + 1]
            vals = lp.gather(1, target.view(-1, 1))
            if self.k:
                top = torch.topk(lp, self.k, dim=-1)
                vals = torch.cat([vals, top.values], 1)
                self._top.append(top.indices)
            self._vals.append(vals)
            del lp
        self.at += rows

    def read(self, ids: list[int], offsets: list[int]) -> "list[TokenLogprob | None]":
        """One entry per prompt token (``ids``: the prompt's ids on the host; ``offsets``: where each one's text
        starts in the prompt's text): None for the first (nothing precedes it), then a ``TokenLogprob``. The one
        host sync of the scoring."""
        vals = torch.cat(self._vals).tolist() if self._vals else []
        tops = torch.cat(self._top).tolist() if self._top else [[] for _ in vals]
        out: list[TokenLogprob | None] = [None]
        for t, (v, top) in enumerate(zip(vals, tops), start=1):
            out.append(TokenLogprob(ids[t], v[0], list(zip(top, v[1:])), offsets[t]))
        return out
