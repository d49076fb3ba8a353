"""Model.agenerate: the scheduler's interleaved generations equal solo generate calls; closing the
iterator, leaving ``async with`` or cancelling the task stops it and releases its session; the timeout;
admission (max_active, a bounded queue); arguments are checked at the call."""
import asyncio
import time
from fractions import Fraction

import pytest
import torch

import ahn_rt
from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict
from ahn_rt.serve.scheduler import QueueFull

V = 97
PROMPTS = [list(range(10 + i, 30 + 3 * i)) for i in range(6)]
KW = [dict(temperature=0.0), dict(temperature=0.9, seed=11, top_k=20), dict(temperature=0.7, seed=3, top_p=0.8),
      dict(temperature=1.0, seed=5, repetition_penalty=1.2)]


class _Tok:
    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture
def model():
    cfg = preset_config("tiny", True, torch.float32)
    cfg["vocab_size"] = V
    m = from_state_dict(cfg, random_state_dict(cfg, ahn=True, dtype=torch.float32, seed=2, std=0.2), window=6, sinks=2,
                        mode="ahn", dtype="float32", device="cpu", chunk_size=8)
    m._tokenizer = _Tok()
    yield m
    if m._scheduler is not None:
        m._scheduler.shutdown()


def _kw(i, n=12):
    return dict(max_new_tokens=n, **KW[i % len(KW)])


async def _collect(gen):
    return "".join([p async for p in gen]), gen.finish_reason


async def _until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        await asyncio.sleep(0.005)


def test_concurrent_agenerate_equals_solo_generate(model):
    solo = []
    for i in range(6):
        g = model.generate(PROMPTS[i], **_kw(i))
        solo.append(("".join(g), g.finish_reason))

    async def main():
        model.start_scheduler(max_active=4)          # 6 generations: two wait for a session
        return await asyncio.gather(*[_collect(model.agenerate(PROMPTS[i], **_kw(i))) for i in range(6)])

    assert asyncio.run(main()) == solo


def test_the_scheduler_steps_its_sessions_together_from_one_pool(model):
    """On the CPU the decoding generations take one batched step (model._step) per loop (continuous batching: they join
    and leave between loops) with sessions from the scheduler's pool of max_active slots; the texts are
    those of solo runs (the test above), and here the batching is seen to happen."""
    solo = ["".join(model.generate(PROMPTS[i], **_kw(i, 20))) for i in range(5)]
    batches, step = [], model._step   # (the scheduler's runs own their sessions: model._step, no re-claim)

    def spy(sessions, tokens):
        batches.append(len(sessions))
        assert all(s.pool is model.scheduler.pool for s in sessions)
        return step(sessions, tokens)
    model._step = spy

    async def main():
        model.start_scheduler(max_active=3)
        out = await asyncio.gather(*[_collect(model.agenerate(PROMPTS[i], **_kw(i, 20))) for i in range(5)])
        return [t for t, _ in out]

    assert asyncio.run(main()) == solo
    pool = model.scheduler.pool
    assert pool.size == 3 and pool.free == 0 and model.scheduler.sessions_in_use == 0   # slots kept for reuse
    assert max(batches) == 3 and min(batches) >= 2 and sum(batches) > 20
    assert model.scheduler.active == 0 and model.scheduler.queued == 0


def test_agenerate_logprobs_equal_generate_in_batched_steps(model):
    """logprobs=k through the scheduler (its batched model._step, each run taking its row's log-softmax in
    _Run.sample) equal generate's (the stepper's logits): the same entries, bit for bit, and after each piece
    the same entries read so far."""
    def solo(i):
        g = model.generate(PROMPTS[i], logprobs=3, **_kw(i, 16))
        seen = [(p, len(g.logprobs)) for p in g]
        return seen, g.logprobs

    async def one(i):
        g = model.agenerate(PROMPTS[i], logprobs=3, **_kw(i, 16))
        return [(p, len(g.logprobs)) async for p in g], g.logprobs

    async def main():
        model.start_scheduler(max_active=4)
        return await asyncio.gather(*[one(i) for i in range(6)])

    want = [solo(i) for i in range(6)]
    got = asyncio.run(main())
    assert got == want
    for seen, entries in got:
        assert len(entries) == 16 and all(len(e.top) == 3 for e in entries) and seen[-1][1] == 16


def test_aclose_and_async_with_release_the_session(model):
    async def main():
        gen = model.agenerate(PROMPTS[0], max_new_tokens=500, temperature=0)
        assert await gen.__anext__()
        assert model.scheduler.active == 1
        await gen.aclose()
        assert gen.finish_reason == "cancelled" and model.scheduler.active == 0
        assert model.scheduler.sessions_in_use == 0
        async with model.agenerate(PROMPTS[1], max_new_tokens=500, temperature=0) as g2:
            async for _ in g2:
                break
        assert g2.finish_reason == "cancelled" and model.scheduler.active == 0
        assert g2.stats.new_tokens < 500

    asyncio.run(main())


def test_reading_in_another_event_loop_is_one_line_not_a_hang(model):
    """The scheduler hands a generation's pieces to the loop that called agenerate: read in another loop
    (made in one asyncio.run, read in the next) it waited forever. It is refused at once."""
    made = {}

    async def make():
        made["gen"] = model.agenerate(PROMPTS[0], max_new_tokens=4, temperature=0)

    async def read():
        return [p async for p in made["gen"]]

    async def close():
        await made["gen"].aclose()
    asyncio.run(make())
    for use in (read, close):
        with pytest.raises(ahn_rt.AhnError, match="belongs to the event loop that called agenerate"):
            asyncio.run(asyncio.wait_for(use(), 10))

def test_aclose_returns_while_another_task_is_iterating(model):
    """aclose() from one task while another task awaits the same generation (a watchdog closing a stream):
    the reader may take the end event off the queue; aclose still returns once the session is released."""
    async def main():
        model.start_scheduler(max_active=1)
        first = model.agenerate(PROMPTS[0], max_new_tokens=10_000, temperature=0)
        await first.__anext__()
        for queued in (True, False):
            gen = model.agenerate(PROMPTS[1], max_new_tokens=10_000, temperature=0)
            if not queued:
                await first.aclose()             # gen gets the session and decodes
            reader = asyncio.create_task(_collect(gen))
            if queued:
                await asyncio.sleep(0)           # the reader now waits on the queued generation
            else:
                await _until(lambda: gen.stats.new_tokens >= 2)
            await asyncio.wait_for(gen.aclose(), 10)
            assert gen.finish_reason == "cancelled"
            assert await asyncio.wait_for(reader, 10) is not None
            assert model.scheduler.active == (1 if queued else 0)     # first still holds its session
        assert model.scheduler.sessions_in_use == 0

    asyncio.run(main())


def test_cancelling_the_task_stops_at_the_next_token(model):
    async def main():
        gen = model.agenerate(PROMPTS[2], max_new_tokens=10_000, temperature=0)
        got = []

        async def consume():
            async for piece in gen:
                got.append(piece)

        task = asyncio.create_task(consume())
        await _until(lambda: len(got) >= 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: model.scheduler.active == 0)
        n = gen.stats.new_tokens
        await asyncio.sleep(0.05)
        assert gen.stats.new_tokens == n < 10_000          # nothing runs after the cancel
        assert model.scheduler.sessions_in_use == 0
        await _until(lambda: gen.finish_reason is not None, timeout=2)   # nobody reads the end event
        assert gen.finish_reason == "cancelled"

    asyncio.run(main())


def test_timeout_stops_and_raises(model):
    async def main():
        gen = model.agenerate(PROMPTS[3], max_new_tokens=100_000, temperature=0, timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            async for _ in gen:
                pass
        assert time.monotonic() - t0 < 5 and gen.finish_reason == "timeout"
        assert model.scheduler.active == 0 and 0 < gen.stats.new_tokens < 100_000

    asyncio.run(main())


def test_bounded_queue_refuses_and_the_rest_complete(model):
    async def main():
        model.start_scheduler(max_active=2, max_queue=1)
        gens = [model.agenerate(PROMPTS[i], **_kw(i, 6)) for i in range(3)]
        with pytest.raises(QueueFull):
            model.agenerate(PROMPTS[3], **_kw(3, 6))
        return await asyncio.gather(*[_collect(g) for g in gens])

    got = asyncio.run(main())
    assert got == [("".join(model.generate(PROMPTS[i], **_kw(i, 6))), got[i][1]) for i in range(3)]


def test_a_queued_generation_can_be_closed_and_times_out_in_the_queue(model):
    async def main():
        model.start_scheduler(max_active=1)
        first = model.agenerate(PROMPTS[0], max_new_tokens=10_000, temperature=0)
        queued = model.agenerate(PROMPTS[1], max_new_tokens=3, temperature=0)
        expires = model.agenerate(PROMPTS[2], max_new_tokens=3, temperature=0, timeout=0.2)
        await first.__anext__()
        assert model.scheduler.queued == 2
        await queued.aclose()
        assert queued.finish_reason == "cancelled" and queued.stats.new_tokens == 0
        with pytest.raises(TimeoutError):
            await expires.__anext__()
        assert expires.stats.new_tokens == 0 and model.scheduler.queued == 0
        await first.aclose()

    asyncio.run(main())


def test_start_scheduler_in_another_thread_during_agenerate_does_not_refuse_it(model, monkeypatch):
    """A service that changes its limits (start_scheduler) while other threads call agenerate: a call that
    picked the old scheduler just before it was replaced (and shut down) goes to the new one, not AhnError."""
    from ahn_rt.serve.scheduler import Scheduler
    want = "".join(model.generate(PROMPTS[0], **_kw(0)))
    submit, replaced = Scheduler.submit, []

    def racing_submit(self, *a, **kw):
        if not replaced:            # the other thread's start_scheduler lands between the two lines
            replaced.append(model.start_scheduler(max_active=2))
        return submit(self, *a, **kw)
    monkeypatch.setattr(Scheduler, "submit", racing_submit)

    async def main():
        old = model.start_scheduler(max_active=1)
        gen = model.agenerate(PROMPTS[0], **_kw(0))
        assert old._closing and gen.ticket.scheduler is replaced[0] is model.scheduler
        return await _collect(gen)

    assert asyncio.run(main()) == (want, "length")


def _numpy_reals():
    try:
        import numpy as np
    except ImportError:
        return []
    return [np.float32(3.5), np.int64(4)]


def test_arguments_are_checked_at_the_call(model):
    async def main():
        for bad in [dict(max_new_tokens=-1), dict(temperature=-1), dict(stop=[""]), dict(timeout=0)]:
            with pytest.raises(ahn_rt.AhnError):
                model.agenerate(PROMPTS[0], **bad)
        for bad in [-1, float("nan"), True, "1"]:
            with pytest.raises(ahn_rt.AhnError, match="timeout"):
                model.agenerate(PROMPTS[0], timeout=bad)
        for no_limit in [float("inf"), 1e308, 10 ** 400]:     # no OverflowError for an int past every float
            assert (await _collect(model.agenerate(PROMPTS[0], **_kw(0, 2), timeout=no_limit)))[1] == "length"
        for real in [Fraction(7, 2), *_numpy_reals()]:        # any real number, as the sampling arguments take
            assert (await _collect(model.agenerate(PROMPTS[0], **_kw(0, 2), timeout=real)))[1] == "length"
        with pytest.raises(ahn_rt.AhnError, match="empty"):
            model.agenerate([])
        with pytest.raises(ahn_rt.AhnError, match="vocabulary"):
            model.agenerate([V + 5, 1, 2])

    asyncio.run(main())
    with pytest.raises(ahn_rt.AhnError, match="event loop"):
        model.agenerate(PROMPTS[0])


def test_a_failing_generation_raises_in_its_caller_only(model):
    want = "".join(model.generate(PROMPTS[1], **_kw(1)))

    async def main():
        bad = model.agenerate(PROMPTS[0], max_new_tokens=50, temperature=0)
        good = model.agenerate(PROMPTS[1], **_kw(1))

        def boom():
            raise RuntimeError("device lost")
        bad.run.launch = boom                       # its own step (interleaved) ...
        bad.run.sample = lambda logits: boom()      # ... or its row of a step taken together
        with pytest.raises(RuntimeError, match="device lost"):
            await _collect(bad)
        assert bad.finish_reason == "error"
        return await _collect(good)

    assert asyncio.run(main())[0] == want
    assert model.scheduler.active == 0 and model.scheduler.sessions_in_use == 0


def test_a_failing_metrics_hook_is_printed_and_every_generation_goes_on(model, capfd):
    """start_scheduler(metrics=...) with a hook that raises: each generation still gets its solo text, every
    session comes back once, and the worker lives on (the error was raised in _end after the session was
    given back: the generation was ended twice, its session lent twice, and the worker died)."""
    class Broken:
        def first_token(self, seconds, cached):
            raise RuntimeError("metrics bug")
        next_token = finished = first_token

    solo = [("".join(g), g.finish_reason) for g in (model.generate(PROMPTS[i], **_kw(i)) for i in range(4))]

    async def main():
        model.start_scheduler(max_active=2, metrics=Broken())
        return await asyncio.wait_for(asyncio.gather(*[_collect(model.agenerate(PROMPTS[i], **_kw(i)))
                                                       for i in range(4)]), 30)

    assert asyncio.run(main()) == solo
    sched = model.scheduler
    assert sched._thread.is_alive() and sched.sessions_in_use == 0 and sched.active == 0
    assert len(sched._idle) == len({id(s) for s in sched._idle}) == sched.pool.size == 2
    assert "metrics bug" in capfd.readouterr().err


def test_long_prompts_prefill_one_chunk_per_step_while_others_stream(model):
    async def main():
        model.start_scheduler(max_active=4)          # prefill budget: one chunk (8 tokens) per step
        a = model.agenerate(PROMPTS[0], max_new_tokens=10_000, temperature=0)
        await a.__anext__()
        longs = [model.agenerate([(7 * i + k) % V for i in range(200)], max_new_tokens=1, temperature=0)
                 for k in range(2)]                  # 25 chunks each
        firsts = [asyncio.ensure_future(g.__anext__()) for g in longs]
        n_a = 0
        while not all(f.done() for f in firsts):
            await a.__anext__()
            n_a += 1
        for g in (*longs, a):
            await g.aclose()
        return n_a

    # the stream keeps decoding: one token per step, and the two prompts share one chunk per step
    assert asyncio.run(main()) >= 45


def test_the_core_does_not_import_the_server_stack():
    import subprocess
    import sys
    code = ("import asyncio, sys, torch\n"
            "from ahn_rt.init_weights import preset_config, random_state_dict\n"
            "from ahn_rt.runtime import from_state_dict\n"
            "cfg = preset_config('tiny', True, torch.float32); cfg['vocab_size'] = 97\n"
            "m = from_state_dict(cfg, random_state_dict(cfg, dtype=torch.float32), window=6, sinks=2, device='cpu')\n"
            "m.enable_prefix_cache(1 << 20); m._tokenizer = type('T', (), {'decode': lambda s, ids: 'x'})()\n"
            "''.join(m.generate([1, 2, 3], max_new_tokens=2))\n"
            "async def go():\n"
            "    return [p async for p in m.agenerate([1, 2, 3], max_new_tokens=2)]\n"
            "asyncio.run(go())\n"
            "import ahn_rt.serve.sessions, ahn_rt.serve.metrics, ahn_rt.serve.process\n"
            "bad = [k for k in ('fastapi', 'uvicorn', 'starlette', 'httpx', 'openai') if k in sys.modules]\n"
            "assert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_the_process_exits_cleanly_while_generations_run():
    """At interpreter exit every scheduler cancels its generations and its worker ends before the interpreter
    finalizes: a daemon worker stopped there inside a torch call aborts the process (exit code 134)."""
    import subprocess
    import sys
    code = ("import atexit, threading\n"
            "def check():   # registered before ahn_rt is imported, so it runs after ahn_rt's exit hook\n"
            "    alive = [t for t in threading.enumerate() if t.name == 'ahn_rt-scheduler']\n"
            "    print('workers', len(alive), 'ended', [g.ticket.run.finish_reason for g in gens], flush=True)\n"
            "atexit.register(check)\n"
            "import asyncio, torch\n"
            "from ahn_rt.init_weights import preset_config, random_state_dict\n"
            "from ahn_rt.runtime import from_state_dict\n"
            "cfg = preset_config('tiny', True, torch.float32); cfg['vocab_size'] = 97\n"
            "m = from_state_dict(cfg, random_state_dict(cfg, dtype=torch.float32), window=6, sinks=2, device='cpu')\n"
            "m._tokenizer = type('T', (), {'decode': lambda s, ids: 'x'})()\n"
            "m._eos_ids = (None, frozenset())   # no end of sequence: the generations run until exit\n"
            "gens, reading = [], threading.Event()\n"
            "def serve():   # an event loop in a daemon thread, still reading when the main thread exits\n"
            "    async def main():\n"
            "        m.start_scheduler(max_active=1)\n"
            "        gens.extend(m.agenerate([1, 2, 3], max_new_tokens=10**9) for _ in range(2))\n"
            "        await gens[0].__anext__()\n"
            "        reading.set()\n"
            "        async for _ in gens[0]:\n"
            "            pass\n"
            "    asyncio.run(main())\n"
            "threading.Thread(target=serve, daemon=True).start()\n"
            "assert reading.wait(60)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "workers 0 ended ['cancelled', 'cancelled']" in p.stdout, (p.stdout, p.stderr)


def test_a_final_state_that_cannot_be_kept_fails_that_generation_only(model, monkeypatch):
    """keep_state (a server conversation): copying the final state failed (out of memory, say) inside _end,
    and the error escaped into the step: every generation of that step ended with it. Now only the
    generation whose state could not be kept ends with "error" (and no final_state); the others finish."""
    from ahn_rt.cache import State
    from ahn_rt.serve.scheduler import AsyncGeneration
    want = [("".join(g), g.finish_reason) for g in (model.generate(PROMPTS[i], **_kw(i)) for i in (1, 2))]

    def no_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(State, "export", no_memory)

    async def main():
        model.start_scheduler(max_active=3)
        keep = AsyncGeneration(model.scheduler, model._new_run(PROMPTS[0], max_new_tokens=5, temperature=0.0),
                               keep_state=True)
        others = [model.agenerate(PROMPTS[i], **_kw(i)) for i in (1, 2)]
        got = await asyncio.wait_for(asyncio.gather(_collect(keep), *map(_collect, others), return_exceptions=True), 30)
        return keep, got

    keep, got = asyncio.run(main())
    assert isinstance(got[0], ahn_rt.AhnError) and "final state could not be kept" in str(got[0])
    assert "OutOfMemoryError" in str(got[0]) and keep.finish_reason == "error" and keep.ticket.final_state is None
    assert got[1:] == want
    sched = model.scheduler
    assert sched._thread.is_alive() and sched.sessions_in_use == 0 and sched.active == 0


def test_a_queued_generation_collected_inside_the_worker_does_not_kill_it(model):
    """An unread queued generation whose last reference goes while the worker sorts the queue (the garbage
    collector runs where the worker allocates): its __del__ removed the ticket from the queue under the
    worker's feet, the worker's own remove raised ValueError and it died, every generation hanging. The
    collection is staged here at the worker's deadline check of that ticket."""
    import gc
    want = [("".join(g), g.finish_reason) for g in (model.generate(PROMPTS[1], **_kw(1, 30)),)]
    fired = []

    class Trap(float):           # compared as `now > deadline`: a float subclass's __lt__ runs first
        def __lt__(self, now):
            if held:
                held.clear()     # the queued generation's last reference: __del__ runs here, in the worker
                gc.collect()
                fired.append(True)
                return True      # ... and its deadline has passed: the worker removes it too
            return False

    async def main():
        model.start_scheduler(max_active=1)
        busy = model.agenerate(PROMPTS[1], **_kw(1, 30))
        first = await busy.__anext__()
        gen = model.agenerate(PROMPTS[2], max_new_tokens=5)
        ticket = gen.ticket
        with model.scheduler._cv:
            ticket.deadline = Trap(1e300)
            held.append(gen)
        del gen
        rest = await asyncio.wait_for(_collect(busy), 10)
        await _until(lambda: ticket.ended.is_set())
        return first + rest[0], rest[1], ticket

    held = []
    text, reason, ticket = asyncio.run(main())
    assert fired and [(text, reason)] == want and ticket.run.finish_reason in ("cancelled", "timeout")
    sched = model.scheduler
    assert sched._thread.is_alive() and sched.sessions_in_use == 0 and sched.active == 0 and not sched._waiting


def test_an_end_of_sequence_token_ends_the_text_with_stop(model):
    """generate and agenerate stop at the first sampled end-of-sequence id: it is neither shown nor counted,
    and the finish reason is "stop". The tiny model never samples an eos by chance, so one is made of a token
    the reply samples at step k >= 3 (and, greedy, of its first token: an empty reply). No test saw a reply
    end at an eos before: a generation that ignored them passed."""
    kw = dict(max_new_tokens=12, temperature=0.9, seed=11)
    model._eos_ids = (model.folder, frozenset())
    g = model.generate(PROMPTS[0], **kw)
    free = "".join(g)
    assert g.finish_reason == "length" and g.stats.new_tokens == 12
    toks = [int(t) for t in free[1:-1].split("><")]              # _Tok.decode: "<id>" per token
    k = next(i for i in range(3, 12) if toks[i] not in toks[:i])  # a token first sampled at step k
    model._eos_ids = (model.folder, frozenset({toks[k]}))
    want = "".join(f"<{t}>" for t in toks[:k])
    g = model.generate(PROMPTS[0], **kw)
    assert ("".join(g), g.finish_reason, g.stats.new_tokens) == (want, "stop", k)
    first = int("".join(model.generate(PROMPTS[1], max_new_tokens=1, temperature=0))[1:-1])
    assert first not in toks[:k]
    model._eos_ids = (model.folder, frozenset({first}))
    g = model.generate(PROMPTS[1], max_new_tokens=12, temperature=0)
    assert ("".join(g), g.finish_reason, g.stats.new_tokens) == ("", "stop", 0)

    async def main():        # the scheduler's runs, stepped together, stop alike
        model.start_scheduler(max_active=2)
        return await asyncio.gather(_collect(model.agenerate(PROMPTS[0], **kw)),
                                    _collect(model.agenerate(PROMPTS[1], max_new_tokens=12, temperature=0)))

    model._eos_ids = (model.folder, frozenset({toks[k], first}))
    assert asyncio.run(main()) == [(want, "stop"), ("", "stop")]
