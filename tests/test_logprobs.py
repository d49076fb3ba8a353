"""Token log-probabilities of ``Model.generate(..., logprobs=k)``: checked against an independent oracle (the
log-softmax of ``Session.forward``'s logits over prompt + generated ids), greedy and sampled (the raw values,
not the tempered / cut ones the sampler draws from); which piece hands out which token's entry (UTF-8 held
back, stop strings, the end of sequence); the argument's checks. The HTTP side is in tests/test_serve.py, the
scheduler's in tests/test_agenerate.py."""
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ahn_rt
from ahn_rt.runtime import _Run
from ahn_rt.sampling import Sampler, SamplingParams, TokenLogprob
from ahn_rt.serve.prompt import Prompt
from ahn_rt.tokenizer import StopMatcher, StreamDecoder

DEMO = Path(__file__).resolve().parents[1] / "weights" / "demo"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def demo():
    return ahn_rt.load(DEMO, dtype="float32", device="cpu")


def _oracle(model, prompt_ids, gen_ids, one_shot=False):
    """float32 logits [len(gen_ids), vocab] of the steps that chose ``gen_ids``, from ``Session.forward`` on a
    fresh session: the prompt, then each generated id in its own forward, as a generation feeds them (the
    decode kernels); ``one_shot``: prompt and generated ids in one forward (the prefill kernels, whose rounding
    moves the demo model's log-probabilities by up to about 4e-5)."""
    with model.new_session() as s:
        if one_shot:
            return s.forward(list(prompt_ids) + list(gen_ids[:-1]))[len(prompt_ids) - 1:]
        rows = [s.forward(prompt_ids, last_only=True)[0]]
        rows += [s.forward([t])[0] for t in gen_ids[:-1]]
    return torch.stack(rows)


def test_greedy_logprobs_equal_the_forward_oracle(demo):
    ids = demo.tokenizer.encode(PROMPT)
    gen = demo.generate(ids, max_new_tokens=24, temperature=0, logprobs=5)
    text = "".join(gen)
    assert gen.finish_reason == "length" and len(gen.logprobs) == gen.stats.new_tokens == 24
    got = [e.token_id for e in gen.logprobs]
    assert demo.tokenizer.decode(got) == text
    ref = torch.log_softmax(_oracle(demo, ids, got), -1)
    one_shot = torch.log_softmax(_oracle(demo, ids, got, one_shot=True), -1)
    assert (ref - one_shot).abs().max() <= 1e-4
    for i, e in enumerate(gen.logprobs):
        row = ref[i]
        assert isinstance(e, TokenLogprob) and isinstance(e.logprob, float)
        assert abs(e.logprob - row[e.token_id].item()) <= 1e-5
        assert e.token_id == int(row.argmax())              # greedy: the chosen token is the argmax ...
        assert len(e.top) == 5
        values = [v for _, v in e.top]
        assert values == sorted(values, reverse=True)
        assert e.top[0] == (e.token_id, e.logprob)          # ... so it heads the top list, with its own value
        want_v, want_i = torch.topk(row, 5)
        assert [t for t, _ in e.top] == want_i.tolist()
        assert max(abs(a - b) for a, b in zip(values, want_v.tolist())) <= 1e-5
        assert e.offset == len(demo.tokenizer.decode(got[:i]))   # where its text starts in the reply


@pytest.mark.parametrize("kw", [dict(temperature=1.0, seed=3, top_k=5, repetition_penalty=1.3),
                                dict(temperature=0.5, seed=4)], ids=["top_k-penalty", "temperature"])
def test_sampled_runs_report_the_raw_logprob_not_the_processed_one(demo, kw):
    ids = demo.tokenizer.encode(PROMPT)
    gen = demo.generate(ids, max_new_tokens=16, logprobs=2, **kw)
    text = "".join(gen)
    got = [e.token_id for e in gen.logprobs]
    assert len(got) == gen.stats.new_tokens >= 8 and demo.tokenizer.decode(got) == text
    logits = _oracle(demo, ids, got)
    raw = torch.log_softmax(logits, -1)
    reported = torch.tensor([e.logprob for e in gen.logprobs])
    assert torch.allclose(reported, raw[torch.arange(len(got)), got], rtol=0, atol=1e-5)
    for e, row in zip(gen.logprobs, raw):
        assert [t for t, _ in e.top] == torch.topk(row, 2).indices.tolist()
    # What the sampler drew from (penalty, temperature, top-k: Sampler.process, replayed step by step) is another
    # distribution: a test comparing against it would fail, so the check above tells the two apart.
    sampler = Sampler(SamplingParams(**kw), demo.config.vocab_size, "cpu")
    sampler.observe(torch.tensor(ids))
    processed = []
    for t, row in zip(got, logits):
        processed.append(torch.log_softmax(sampler.process(row), -1)[t].item())
        sampler.observe(torch.tensor([t]))
    assert (reported - torch.tensor(processed)).abs().max() > 1e-2


def test_logprobs_off_is_none_and_the_text_is_unchanged(demo):
    on = demo.generate(PROMPT, max_new_tokens=12, temperature=0.8, seed=9, logprobs=0)
    off = demo.generate(PROMPT, max_new_tokens=12, temperature=0.8, seed=9)
    assert list(on) == list(off) and off.logprobs is None
    assert len(on.logprobs) == 12 and all(e.top == [] for e in on.logprobs)


def test_each_piece_comes_with_the_entries_of_the_tokens_it_completes(demo):
    tok = demo.tokenizer
    gen = demo.generate(PROMPT, max_new_tokens=20, temperature=0.9, seed=2, logprobs=1)
    text = ""
    for piece in gen:
        text += piece
        assert b"".join(tok.token_bytes(e.token_id) for e in gen.logprobs).decode("utf-8", "replace") == text


@pytest.mark.parametrize("bad", [21, -1, True, "3", 2.0])
def test_a_bad_logprobs_argument_is_one_line_naming_it(demo, bad):
    with pytest.raises(ahn_rt.AhnError, match="logprobs"):
        demo.generate(PROMPT, logprobs=bad)


# ---- which piece carries which entry: _Run's bookkeeping driven with chosen ids -------------------------
BYTES = {0: b"<eos>", 1: b"a", 2: b"b", 3: b"c", 4: b"ab", 5: b"\xc3", 6: b"\xa9", 7: b"\xe2\x80", 8: b"\x94",
         9: b" x", 10: b"<s>"}


class _ByteTok:
    """A byte-level tokenizer of ten tokens: 5 + 6 is "é", 7 + 8 is "—"."""

    def decode(self, ids):
        return b"".join(BYTES[i] for i in ids).decode("utf-8", "replace")

    def special_ids(self):
        return frozenset({10})


class _Lp:
    def read(self, tid, offset):
        return TokenLogprob(tid, -float(tid), [], offset)


def _drive(ids, stop=(), max_new=100, logprobs=True, skip=False):
    model = SimpleNamespace(eos_ids=lambda: {0})
    run = _Run(model, Prompt((1,)), SamplingParams(), max_new, list(stop), 0 if logprobs else None)
    run._dec, run._stopper = StreamDecoder(_ByteTok(), skip_special=skip), StopMatcher(list(stop))
    run._lp = _Lp() if logprobs else None
    run._t1, run.session = time.perf_counter(), SimpleNamespace(state_nbytes=0)
    for t in ids:
        assert not run.done
        run.land(t)
    assert run.done
    pairs = run.take()
    return [(p, None if e is None else [x.token_id for x in e]) for p, e in pairs], run.finish_reason


CASES = [
    # a UTF-8 character split over two tokens: both tokens come with the piece that shows it
    ([1, 5, 6, 2, 7, 8, 3], (), 7, [("a", [1]), ("é", [5, 6]), ("b", [2]), ("—", [7, 8]), ("c", [3])], "length"),
    # cut by the length limit in the middle of a character: the flushed U+FFFD carries it
    ([1, 5], (), 2, [("a", [1]), ("\ufffd", [5])], "length"),
    # the end of sequence ends the reply and gets no entry
    ([1, 2, 0], (), 9, [("a", [1]), ("b", [2])], "stop"),
    # a stop string wholly inside a token: that token is cut with it
    ([1, 2, 9], (" x",), 9, [("a", [1]), ("b", [2])], "stop"),
    # "ab" shows its "a" before the stop "bc": it is kept (any of its text is shown), "c" is cut. Its entry waits
    # for the stop matcher, which holds "b", and comes at the end, with an empty piece
    ([4, 3], ("bc",), 9, [("a", []), ("", [4])], "stop"),
    # the held "b" turns out not to start the stop: "ab" comes with the piece that completes it; the next "b"
    # (held in turn) does start it, and is cut with "c"
    ([4, 2, 3], ("bc",), 9, [("a", []), ("b", [4])], "stop"),
    # the stop ends inside the last token, "ab" kept: its "a" is shown
    ([1, 4], ("b",), 9, [("a", [1]), ("a", [4])], "stop"),
]


@pytest.mark.parametrize("ids,stop,max_new,want,reason", CASES, ids=[str(i) for i in range(len(CASES))])
def test_entries_follow_the_text_the_pieces_show(ids, stop, max_new, want, reason):
    got, finish = _drive(ids, stop, max_new)
    assert got == want and finish == reason
    # entries in order, one per token shown; without logprobs the same text in the same pieces
    off, finish_off = _drive(ids, stop, max_new, logprobs=False)
    assert finish_off == reason and off == [(p, None) for p, _ in want if p]


SKIP_CASES = [
    # a special token (10, "<s>") gives no text; its entry comes with the next piece, at the offset where it sits
    ([1, 10, 2, 0], (), 9, [("a", [1]), ("b", [10, 2])], "stop"),
    # between the two bytes of "é": the character still forms
    ([1, 5, 10, 6, 0], (), 9, [("a", [1]), ("é", [5, 10, 6])], "stop"),
    # the stop string "ab" spans it: the text without it holds the stop (the tokens from the cut on get no entry)
    ([3, 1, 10, 2], ("ab",), 9, [("c", [3])], "stop"),
    # a special token still counts against max_new_tokens
    ([1, 10], (), 2, [("a", [1]), ("", [10])], "length"),
]


@pytest.mark.parametrize("ids,stop,max_new,want,reason", SKIP_CASES, ids=[str(i) for i in range(len(SKIP_CASES))])
def test_skip_special_tokens_leaves_them_out_of_the_text(ids, stop, max_new, want, reason):
    got, finish = _drive(ids, stop, max_new, skip=True)
    assert got == want and finish == reason
    # without skipping, the special token's text is shown where it was sampled
    shown, _ = _drive(ids + [0] * (ids[-1] != 0 and max_new > len(ids)), (), max_new, skip=False)
    assert "<s>" in "".join(p for p, _ in shown)


@pytest.mark.parametrize("ids,want", [([1, 2, 0], [(1, 0), (2, 1), (0, 2)]),
                                      # the reply ends inside a character: the end of sequence still comes
                                      # after the flushed U+FFFD (it was listed at that character's offset)
                                      ([1, 5, 0], [(1, 0), (5, 1), (0, 2)])])
def test_with_echo_the_end_of_sequence_entry_sits_at_the_end_of_the_text(ids, want):
    run = _Run(SimpleNamespace(eos_ids=lambda: {0}), Prompt((1,)), SamplingParams(), 9, [], 0, prompt_logprobs=0)
    run._dec, run._stopper, run._lp, run._scorer = StreamDecoder(_ByteTok()), StopMatcher([]), _Lp(), object()
    run._t1, run.session = time.perf_counter(), SimpleNamespace(state_nbytes=0)
    for t in ids:
        run.land(t)
    pairs = run.take()
    text = "".join(p for p, _ in pairs)
    got = [(e.token_id, e.offset) for _, es in pairs for e in es]
    assert run.finish_reason == "stop" and got == want and got[-1][1] == len(text)


def test_token_bytes_are_the_raw_bytes_of_byte_level_tokens(demo):
    tok = demo.tokenizer
    text = "Héllo wörld — ✓ 日本 <|im_end|>"
    ids = tok.encode(text)
    parts = [tok.token_bytes(i) for i in ids]
    assert b"".join(parts) == text.encode("utf-8")
    partial = [p for p in parts if p.decode("utf-8", "replace") != p.decode("utf-8", "ignore")]
    assert partial                                    # some tokens hold part of a character: decode([id]) loses them
    assert all(tok.decode([i]) == "\ufffd" for i, p in zip(ids, parts) if p in partial and len(p) == 1)
    assert tok.token_bytes(tok.token_id("<|im_end|>")) == b"<|im_end|>"
    assert tok.token_bytes(tok.vocab_size + 5) == b""          # padded embedding rows: no token


@pytest.mark.cuda
def test_cuda_graph_and_scheduler_logprobs_equal_the_forward_oracle():
    """On CUDA a generation's steps replay a captured graph whose logits are a static buffer the next step
    overwrites, and the values reach the host through pinned buffers without a sync of their own: the entries
    of generate (the graph path) and of agenerate with three concurrent runs (the scheduler's batched step)
    must still equal the log-softmax of eager one-token forwards, and carry the greedy tokens."""
    import asyncio
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    model = ahn_rt.load(DEMO, dtype="float32", device="cuda")
    ids = model.tokenizer.encode(PROMPT)

    def check(entries, n):
        got = [e.token_id for e in entries]
        assert len(got) == n
        ref = torch.log_softmax(_oracle(model, ids, got), -1).cpu()
        for e, row in zip(entries, ref):
            assert e.token_id == int(row.argmax()) and abs(e.logprob - row[e.token_id].item()) <= 1e-5
            assert [t for t, _ in e.top] == torch.topk(row, 3).indices.tolist()

    gen = model.generate(ids, max_new_tokens=20, temperature=0, logprobs=3)
    "".join(gen)
    check(gen.logprobs, 20)

    async def many():
        gens = [model.agenerate(ids, max_new_tokens=20, temperature=0, logprobs=3) for _ in range(3)]

        async def read(g):
            return "".join([p async for p in g])
        await asyncio.gather(*(read(g) for g in gens))
        return gens
    for g in asyncio.run(many()):
        check(g.logprobs, 20)
        assert [e.token_id for e in g.logprobs] == [e.token_id for e in gen.logprobs]


# ---- prompt log-probabilities (generate(..., prompt_logprobs=k), the server's echo) -------------------------
LONG = ("Once upon a time there was a little fox who lived at the edge of a deep green forest. Every morning "
        "she ran down to the river to drink and to watch the fish jump. ") * 2


def _prompt_oracle(model, ids):
    """log-softmax of Session.forward over the whole prompt on a fresh session of the default chunk size (one
    prefill): row t - 1 is the distribution of token t."""
    with model.new_session() as s:
        return torch.log_softmax(s.forward(ids), -1)


@pytest.mark.parametrize("chunk", [7, 1])   # 1: every chunk a single token, through the decode kernels
def test_prompt_logprobs_equal_the_forward_oracle(demo, chunk):
    ids = demo.tokenizer.encode(LONG if chunk != 1 else LONG[:120])
    assert len(ids) > demo.config.window and len(ids) > 3 * chunk   # chunks cross the window into the memory
    ref = _prompt_oracle(demo, ids)
    with demo.new_session(chunk_size=chunk) as s:
        gen = demo.generate(ids, max_new_tokens=0, temperature=0, prompt_logprobs=3, session=s)
        assert list(gen) == [] and gen.finish_reason == "length" and gen.logprobs is None
    got = gen.prompt_logprobs
    assert len(got) == len(ids) and got[0] is None
    # 1e-4, not 1e-5: the oracle's one prefill and the scored run's chunks (other GEMM shapes, the memory fed
    # chunk by chunk, single tokens through the decode kernels) round differently (up to 1.3e-5 here)
    for t, e in enumerate(got[1:], start=1):
        row = ref[t - 1]
        assert e.token_id == ids[t] and abs(e.logprob - row[ids[t]].item()) <= 1e-4
        assert [i for i, _ in e.top] == torch.topk(row, 3).indices.tolist()
        assert max(abs(v - w) for (_, v), w in zip(e.top, torch.topk(row, 3).values.tolist())) <= 1e-4
        assert e.offset == len(demo.tokenizer.decode(ids[:t]))
    assert gen.prompt_text == demo.tokenizer.decode(ids)
    # an off-by-one (position t's value read from row t, not t - 1) is far outside the tolerance
    shifted = max(abs(e.logprob - ref[t, ids[t]].item()) for t, e in enumerate(got[1:-1], start=1))
    assert shifted > 0.5


def test_prompt_logprobs_in_blocks_of_rows_equal_one_block(demo, monkeypatch):
    ids = demo.tokenizer.encode(LONG)
    with demo.new_session(chunk_size=64) as s:
        whole = demo.generate(ids, max_new_tokens=0, prompt_logprobs=2, session=s)
        list(whole)
    monkeypatch.setattr(ahn_rt.sampling, "SCORE_ROWS", 5)    # 64-row chunks in blocks of 5 rows, a last short one
    with demo.new_session(chunk_size=64) as s:
        blocks = demo.generate(ids, max_new_tokens=0, prompt_logprobs=2, session=s)
        list(blocks)
    for a, b in zip(whole.prompt_logprobs[1:], blocks.prompt_logprobs[1:]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) <= 1e-5
        assert [i for i, _ in a.top] == [i for i, _ in b.top]


def test_prompt_logprobs_leave_the_generation_unchanged(demo):
    ids = demo.tokenizer.encode(LONG)
    runs = []
    for k in (None, 0):
        with demo.new_session(chunk_size=7) as s:
            gen = demo.generate(ids, max_new_tokens=6, temperature=0, logprobs=2, prompt_logprobs=k, session=s)
            runs.append(("".join(gen), [(e.token_id, e.logprob, e.top, e.offset) for e in gen.logprobs], gen))
    (text, lps, off), (text2, lps2, on) = runs
    assert text2 == text and lps2 == lps                 # the first token and the rest: bit for bit
    assert off.prompt_logprobs is None and on.prompt_logprobs[0] is None
    assert all(e.top == [] for e in on.prompt_logprobs[1:])   # k = 0: the chosen token's value only
    with pytest.raises(ahn_rt.AhnError, match="prompt_logprobs"):
        demo.generate(ids, prompt_logprobs=21)
    with pytest.raises(ahn_rt.AhnError, match="prompt_logprobs"):
        demo.generate(ids, prompt_logprobs=-1)


def test_prompt_logprobs_bypass_the_prefix_cache(demo):
    ids = demo.tokenizer.encode(LONG)
    ref = _prompt_oracle(demo, ids)
    demo.enable_prefix_cache(1 << 26)
    try:
        list(demo.generate(ids, max_new_tokens=1))          # stores the prompt's snapshots
        hits = demo.prefix_cache.hits
        gen = demo.generate(ids, max_new_tokens=1, prompt_logprobs=0)
        list(gen)
        assert gen.stats.cached_tokens == 0 and demo.prefix_cache.hits == hits
        assert all(abs(e.logprob - ref[t - 1, ids[t]].item()) <= 1e-4 for t, e in enumerate(gen.prompt_logprobs)
                   if e is not None)
    finally:
        demo.enable_prefix_cache(0)


def test_with_prompt_logprobs_the_end_of_sequence_gets_an_entry(demo, monkeypatch):
    # lm-eval's scoring asks for one token and drops the last entry: an end of sequence without an entry would
    # make it drop a prompt token instead. With echo it is listed (OpenAI, vLLM); without, as before
    ids = demo.tokenizer.encode(PROMPT)
    first = demo.generate(ids, max_new_tokens=1, temperature=0, logprobs=0)
    list(first)
    eos = first.logprobs[0].token_id
    monkeypatch.setattr(demo, "eos_ids", lambda: {eos})
    plain = demo.generate(ids, max_new_tokens=1, temperature=0, logprobs=0)
    assert list(plain) == [] and plain.finish_reason == "stop" and plain.logprobs == []
    echo = demo.generate(ids, max_new_tokens=1, temperature=0, logprobs=0, prompt_logprobs=0)
    assert list(echo) == [] and echo.finish_reason == "stop"
    assert [(e.token_id, e.offset) for e in echo.logprobs] == [(eos, 0)]
    assert echo.logprobs[0].logprob == first.logprobs[0].logprob
