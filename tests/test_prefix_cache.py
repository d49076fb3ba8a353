"""The prefix cache: a hit gives the logits (and the text) of a cold prefill bit for bit, in every mode
and dtype, for a raw shared prefix, a shared system message and a conversation's next turn; a prompt
that does not extend a cached prefix, or extends it on other chunk boundaries, misses; the LRU evicts by
bytes. Chunking itself changes the rounding (shown here), which is why the cache keeps the cold
schedule."""
import threading

import pytest
import torch

from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict
from ahn_rt.serve.prefix_cache import make_plan, schedule
from ahn_rt.serve.prompt import Prompt, chat_prompt

# Exact comparisons (torch.equal) everywhere except the one test that shows chunking moves the rounding.

W, S, CHUNK, V = 6, 2, 8, 97


class _CharTok:
    """A stand-in tokenizer: one id per character (enough for ChatML marks and streamed text)."""

    def encode(self, text):
        return [ord(c) % V for c in text]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


def _model(mode="ahn", dtype="float32", cache=1 << 24):
    cfg = preset_config("tiny", True, torch.float32)
    cfg["vocab_size"] = V
    m = from_state_dict(cfg, random_state_dict(cfg, ahn=True, dtype=torch.float32, seed=4, std=0.2), window=W, sinks=S,
                        mode=mode, dtype=dtype, device="cpu", chunk_size=CHUNK)
    m._tokenizer = _CharTok()
    if cache:
        m.enable_prefix_cache(cache)
    return m


def _ids(seed, n):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PREFIX = _ids(0, 37)          # crosses S + W (the memory is written) and several chunk boundaries


def test_chunking_moves_the_rounding_but_one_schedule_is_exact():
    m = _model(cache=0)
    ids = _ids(1, 40)
    one = m.new_session(chunk_size=64).forward(ids)[-1]
    split = m.new_session(chunk_size=64)
    split.forward(ids[:17])
    two = split.forward(ids[17:])[-1]
    assert torch.allclose(one, two, rtol=1e-5, atol=1e-5)
    again = m.new_session(chunk_size=64)
    again.forward(ids[:17])
    assert torch.equal(again.forward(ids[17:])[-1], two)


def test_schedule_ends_at_chunk_multiples_and_marks():
    assert schedule(20, 8) == [8, 16, 20]
    assert schedule(20, 8, marks=(3, 16, 19, 20, 25)) == [3, 8, 16, 19, 20]
    assert schedule(20, 8, start=9) == [16, 20]
    p = make_plan(Prompt(tuple(range(20)), (3,)), 8)
    q = make_plan(Prompt(tuple(range(20))), 8)
    assert p.keys[8] != q.keys[8] and p.keys[3] not in q.keys.values()   # boundaries are in the key
    assert make_plan(Prompt(tuple(range(20)), (3,)), 8).keys == p.keys


@pytest.mark.parametrize("mode,dtype", [("ahn", "float32"), ("ahn", "bf16"), ("swa", "float32"), ("full", "bf16")])
@pytest.mark.parametrize("qlen", [1, 30])
def test_hit_equals_cold_logits_and_text(mode, dtype, qlen):
    cold, warm = _model(mode, dtype, cache=0), _model(mode, dtype)
    a, b = PREFIX + _ids(2, 11), PREFIX + _ids(3, qlen)
    warm.prefill(a)                                    # fills the cache (snapshots at 32, 40, 48)
    misses = warm.prefix_cache.misses
    sess, got = warm.prefill(b)
    _, want = cold.prefill(b)
    assert warm.prefix_cache.hits == 1 and warm.prefix_cache.misses == misses
    assert warm.prefix_cache.hit_tokens == 32          # the deepest boundary inside the shared prefix
    entries = {e.position: e for e in warm.prefix_cache._entries.values()}
    assert sorted(entries) == ([32, 38, 40, 48] if qlen == 1 else [32, 40, 48, 56, 64, 67])
    assert entries[48].logits is not None and entries[32].logits is None   # logits: whole prompts only
    assert torch.equal(got, want)
    assert sess.position == len(b)
    kw = dict(max_new_tokens=10, temperature=0.9, seed=7)
    g = warm.generate(b, **kw)
    assert "".join(g) == "".join(cold.generate(b, **kw))
    assert g.stats.cached_tokens == len(b)             # b itself was stored by its prefill


def test_whole_prompt_hit_needs_no_prefill():
    cold, warm = _model(cache=0), _model()
    kw = dict(max_new_tokens=8, temperature=0.8, seed=1)
    first = warm.generate(PREFIX, **kw)
    text = "".join(first)
    again = warm.generate(PREFIX, **kw)
    assert "".join(again) == text == "".join(cold.generate(PREFIX, **kw))
    assert first.stats.cached_tokens == 0 and again.stats.cached_tokens == len(PREFIX)
    assert torch.equal(warm.prefill(PREFIX)[1], cold.prefill(PREFIX)[1])


def test_shared_system_message_and_next_turn_hit():
    cold, warm = _model(cache=0), _model()
    tok = warm.tokenizer
    system = ("system", "You are a careful assistant. " * 2)
    t1 = chat_prompt(tok, [system, ("user", "first question?")])
    other = chat_prompt(tok, [system, ("user", "another one")])
    warm.prefill(t1)
    _, got = warm.prefill(other)
    assert warm.prefix_cache.hit_tokens == t1.marks[0]          # the end of the system message
    assert torch.equal(got, cold.prefill(other)[1])
    # the next turn extends turn 1's whole prompt (its open assistant header is a mark of turn 2)
    t2 = chat_prompt(tok, [system, ("user", "first question?"), ("assistant", "an answer"), ("user", "and?")])
    assert t2.ids[:len(t1)] == t1.ids and len(t1) in t2.marks
    before = warm.prefix_cache.hit_tokens
    _, got = warm.prefill(t2)
    assert warm.prefix_cache.hit_tokens - before == len(t1)
    assert torch.equal(got, cold.prefill(t2)[1])
    # generate() with messages builds the same prompt
    msgs = [{"role": "system", "content": system[1]}, {"role": "user", "content": "another one"}]
    kw = dict(max_new_tokens=6, temperature=0)
    assert "".join(warm.generate(msgs, **kw)) == "".join(cold.generate(other, **kw))


def test_prompt_that_extends_no_cached_prefix_misses():
    warm = _model()
    warm.prefill(PREFIX)
    c = warm.prefix_cache
    hits, misses = c.hits, c.misses
    g = warm.generate([(PREFIX[0] + 1) % V] + PREFIX[1:], max_new_tokens=2)
    "".join(g)
    assert c.hits == hits and c.misses == misses + 1 and g.stats.cached_tokens == 0
    # the same tokens on other chunk boundaries (a mark at 3) are not the cached state
    warm.prefill(Prompt(tuple(PREFIX + [1, 2]), (3,)))
    assert c.hits == hits and c.misses == misses + 2
    # a prompt shorter than every snapshot
    warm.prefill(PREFIX[:5])
    assert c.hits == hits


def _entry_bytes(m, n):
    s = m.new_session()
    s.forward(_ids(9, n))
    return sum(t.numel() * t.element_size() for t in s.state.export().values()) + V * 4


def test_lru_eviction_by_bytes():
    probe = _model(cache=0)
    one = _entry_bytes(probe, 20)                   # past S + W: every state has the same size
    m = _model(cache=2 * one + one // 2)
    c = m.prefix_cache
    c.boundary_snapshots = 0                        # one snapshot per prompt: the whole prompt
    p1, p2, p3 = _ids(11, 20), _ids(12, 20), _ids(13, 20)
    m.prefill(p1)
    m.prefill(p2)
    assert len(c) == 2 and c.nbytes == 2 * one
    m.prefill(p1)                                   # a hit: p1 is now the most recent
    m.prefill(p3)                                   # evicts p2, the least recently used
    assert len(c) == 2 and c.nbytes <= c.max_bytes and c.evictions == 1
    hits = c.hits
    m.prefill(p2)
    assert c.hits == hits                           # p2 was evicted (and is stored again, evicting p1)
    m.prefill(p3)
    assert c.hits == hits + 1
    tiny = _model(cache=one - 1)                    # an entry larger than the whole cache is not kept
    tiny.prefix_cache.boundary_snapshots = 0
    tiny.prefill(p1)
    assert len(tiny.prefix_cache) == 0 and tiny.prefix_cache.nbytes == 0


def test_threads_with_a_shared_cache_equal_cold_runs():
    cold, warm = _model(cache=0), _model()
    prompts = [PREFIX + _ids(20 + i, 3 + i) for i in range(6)]
    kw = [dict(max_new_tokens=8, temperature=0.9, seed=i) for i in range(6)]
    want = ["".join(cold.generate(p, **k)) for p, k in zip(prompts, kw)]
    got = [None] * 6
    barrier = threading.Barrier(6)

    def worker(i):
        barrier.wait()
        got[i] = "".join(warm.generate(prompts[i], **kw[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert warm.prefix_cache.hits + warm.prefix_cache.misses == 6
