"""One Model serves many threads: concurrent and interleaved ``generate`` calls each give exactly what
they give alone, with their own stats, and sequential calls keep reusing one session."""
import threading

import pytest
import torch

import ahn_rt
from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict

# Exact equality only (texts, token counts): no tolerances in this file.

PROMPTS = [list(range(10 + i, 30 + 3 * i)) for i in range(8)]
KW = [dict(temperature=0.0), dict(temperature=0.9, seed=11, top_k=20), dict(temperature=0.7, seed=3, top_p=0.8),
      dict(temperature=1.0, seed=5, repetition_penalty=1.2)]


class _Tok:
    """A stand-in tokenizer: ids are text, one piece per id (generate needs decode/encode only)."""

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def model():
    cfg = preset_config("tiny", True, torch.float32)
    cfg["vocab_size"] = 97
    m = from_state_dict(cfg, random_state_dict(cfg, ahn=True, dtype=torch.float32, seed=2, std=0.2), window=6, sinks=2,
                        mode="ahn", dtype="float32", device="cpu")
    m._tokenizer = _Tok()
    return m


def _solo(model, i):
    g = model.generate(PROMPTS[i], max_new_tokens=12, **KW[i % len(KW)])
    return "".join(g), g.stats.new_tokens


def test_threads_equal_solo_runs(model):
    solo = [_solo(model, i) for i in range(8)]
    got = [None] * 8
    barrier = threading.Barrier(8)

    def worker(i):
        barrier.wait()
        for _ in range(2):
            got[i] = _solo(model, i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == solo


def test_interleaved_generators_equal_solo_runs(model):
    solo = [_solo(model, i) for i in range(4)]
    gens = [model.generate(PROMPTS[i], max_new_tokens=12, **KW[i]) for i in range(4)]
    texts = ["", "", "", ""]
    live = set(range(4))
    while live:
        for i in sorted(live):
            try:
                texts[i] += next(gens[i])
            except StopIteration:
                live.discard(i)
    assert [(t, g.stats.new_tokens) for t, g in zip(texts, gens)] == solo


def test_sequential_calls_reuse_one_session(model):
    "".join(model.generate(PROMPTS[0], max_new_tokens=3))
    idle = list(model._idle)
    "".join(model.generate(PROMPTS[1], max_new_tokens=3))
    assert model._idle == idle and len(idle) >= 1


def test_closing_a_generation_frees_its_session(model):
    n = len(model._idle)
    g = model.generate(PROMPTS[2], max_new_tokens=50)
    next(g)
    assert len(model._idle) == n - 1 or n == 0
    g.close()
    assert len(model._idle) == max(n, 1)


def test_last_stats_is_per_thread(model):
    "".join(model.generate(PROMPTS[0], max_new_tokens=2))
    mine = model.last_stats
    other = {}
    t = threading.Thread(target=lambda: other.setdefault("s", model.last_stats))
    t.start()
    t.join()
    assert mine.prompt_tokens == len(PROMPTS[0]) and other["s"].prompt_tokens == 0
    assert isinstance(mine, ahn_rt.GenerationStats)


def test_stats_line_gives_no_decode_rate_without_a_decode_step():
    """One new token comes out of the prefill: the line said "decode 1 tok at 0.0 tok/s"."""
    s = ahn_rt.GenerationStats(prompt_tokens=5, new_tokens=1, prefill_s=0.01, decode_s=0.002, state_bytes=1024)
    assert "decode 1 tok (no decode step)," in s.line() and "tok at" not in s.line()
    s.new_tokens = 0
    assert "decode 0 tok (no decode step)," in s.line()
    s.new_tokens = 5
    assert "decode 5 tok at 2000.0 tok/s, state 1.00 KiB" in s.line()
