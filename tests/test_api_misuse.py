"""The Python API used the way an embedding service uses it, mistakes included: every caller mistake is
one AhnError at the call (never a TypeError from inside torch, never a silently ignored argument), a
session is used by one caller at a time, and a state file's errors say what to do with a state file.
On the demo model (CPU, loads in well under a second)."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

import ahn_rt
from ahn_rt import AhnError

DEMO = Path(__file__).resolve().parent.parent / "weights" / "demo"
P = "def f(x):\n    return"


@pytest.fixture(scope="module")
def model():
    return ahn_rt.load(DEMO)


@pytest.fixture(scope="module")
def other():
    return ahn_rt.load(DEMO)


@pytest.mark.parametrize("kw", [dict(temperature="0.5"), dict(temperature=None), dict(top_k=1.5),
                                dict(top_k="3"), dict(top_k=True), dict(top_p="0.5"),
                                dict(repetition_penalty=None), dict(min_p=[0.1])])
def test_sampling_arguments_of_the_wrong_type_are_one_line_at_the_call(model, kw):
    name = next(iter(kw))
    with pytest.raises(AhnError, match=name):
        model.generate(P, max_new_tokens=2, **kw)


@pytest.mark.parametrize("prompt,kw,needle", [
    (None, {}, "the prompt must be"),
    (5, {}, "the prompt must be"),
    (b"def f", {}, "bytes"),
    (torch.tensor([[1, 2]]), {}, "1-D integer"),
    # no values to read: torch's NotImplementedError (forward and step said it in one line already)
    (torch.tensor([1, 2], device="meta"), {}, "the prompt is a tensor on the meta device"),
    (P, dict(system="Be brief."), "chat=True"),
    ([1, 2, 3], dict(chat=True), "not to token ids"),
    ([1, 2, 3], dict(system="Be brief."), "not to token ids"),
    (P, dict(stop=5), "stop must be"),
    # any iterable was taken: a dict as the list of its keys, a set in an arbitrary order; chat any truthy value
    (P, dict(stop={"a": 1}), "stop must be a string or a list of strings, got dict"),
    (P, dict(stop={"a", "b"}), "stop must be a string or a list of strings, got set"),
    (P, dict(stop=iter(["a"])), "stop must be a string or a list of strings, got list_iterator"),
    (P, dict(chat="yes"), "chat must be True or False, got str 'yes'"),
    (P, dict(chat=1), "chat must be True or False, got int 1"),
    (P, dict(chat=None), "chat must be True or False, got NoneType None"),
    (P, dict(chat=True, system=3), "system must be text"),
    # a stop string that is not UTF-8 text (a lone surrogate) can never match: it was silently ignored
    (P, dict(stop=["ok", "\udcff"]), r"stop string '\\udcff' is not valid UTF-8 \(byte 0xff"),
    # a system message that is not UTF-8 text was blamed on "the prompt"
    (P, dict(chat=True, system="a\ud800"), "the system message is not valid UTF-8"),
])
def test_prompts_of_the_wrong_type_are_one_line_at_the_call(model, prompt, kw, needle):
    with pytest.raises(AhnError, match=needle):
        model.generate(prompt, max_new_tokens=2, **kw)


def test_a_token_id_tensor_and_stop_none_are_taken(model):
    ids = model.tokenizer.encode(P)
    want = "".join(model.generate(ids, max_new_tokens=4, temperature=0))
    assert "".join(model.generate(torch.tensor(ids), max_new_tokens=4, temperature=0, stop=None)) == want


def test_stop_tuples_and_numpy_bool_chat_are_taken(model):
    """stop: a string, or a list or tuple of strings; chat: a bool, numpy's included. The same refusals
    hold for prefill and agenerate, which share the checks."""
    np = pytest.importorskip("numpy")
    want = "".join(model.generate(P, max_new_tokens=6, temperature=0, stop=["\n"], chat=True))
    assert "".join(model.generate(P, max_new_tokens=6, temperature=0, stop=("\n",), chat=np.bool_(True))) == want
    with pytest.raises(AhnError, match="chat must be True or False"):
        model.prefill(P, chat="yes")


def test_sessions_that_are_not_this_models_are_one_line(model, other):
    foreign = other.new_session()
    with pytest.raises(AhnError, match="another model"):
        model.generate(P, max_new_tokens=2, session=foreign)
    with pytest.raises(AhnError, match="another model"):
        model.prefill(P, session=foreign)
    with pytest.raises(AhnError, match="got str"):
        model.generate(P, max_new_tokens=2, session="s")

    async def agen():
        return model.agenerate(P, max_new_tokens=2, session=foreign)
    with pytest.raises(AhnError, match="another model"):
        asyncio.run(agen())
    closed = model.new_session()
    closed.close()
    with pytest.raises(AhnError, match="closed"):
        model.generate(P, max_new_tokens=2, session=closed)   # at the call, not at the first next()
    s = model.new_session()
    for bad in (None, s, 3):
        with pytest.raises(AhnError, match="list of Sessions"):
            model.step(bad, [1])
    assert model.step((x for x in [s]), [1]).shape == (1, model.config.vocab_size)   # any iterable
    with pytest.raises(AhnError, match="pool must be"):
        model.new_session(pool="p")
    for cap in (-1, 0, 1.5, "8"):
        with pytest.raises(AhnError, match="capacity"):
            model.new_session(capacity=cap)
    # a full-mode option: an ahn / swa state is sinks + window slots, and capacity was ignored
    with pytest.raises(AhnError, match="capacity is for mode 'full' only: a mode 'ahn' state always holds"):
        model.new_session(capacity=100000)
    for w in (None, 5):
        with pytest.raises(AhnError, match="weights must be a path"):
            ahn_rt.load(w)


def test_a_session_in_use_is_refused_not_shared(model):
    s = model.new_session()
    gen = model.generate(P, max_new_tokens=8, temperature=0, session=s)
    next(gen)                                             # the generation holds s until it ends
    for use in (lambda: s.forward([1]), lambda: model.step([s], [1]), lambda: s.fork(), s.reset, s.close,
                lambda: list(model.generate(P, max_new_tokens=2, session=s))):
        with pytest.raises(AhnError, match="in use"):
            use()
    gen.close()
    assert not s.closed and s.forward([1]).shape == (1, model.config.vocab_size)   # free again

    # two threads stepping one session: one of them is refused, the other's steps all land
    s = model.new_session()
    s.forward([1, 2, 3])
    entered, leave = threading.Event(), threading.Event()
    real = s._forward

    def slow(ids, last_only=False):
        entered.set()
        leave.wait(5)
        return real(ids, last_only)
    s._forward = slow
    t = threading.Thread(target=s.forward, args=([4],))
    t.start()
    assert entered.wait(5)
    try:
        with pytest.raises(AhnError, match="in use"):
            model.step([s], [5])
    finally:
        leave.set()
        t.join()
    assert s.position == 4


def test_agenerate_on_a_busy_session_ends_with_the_error(model):
    s = model.new_session()
    gen = model.generate(P, max_new_tokens=8, session=s)
    next(gen)

    async def run():
        return [p async for p in model.agenerate(P, max_new_tokens=4, session=s)]
    try:
        with pytest.raises(AhnError, match="in use"):
            asyncio.run(run())
    finally:
        gen.close()

    async def ok():
        return [p async for p in model.agenerate(P, max_new_tokens=4, temperature=0, session=s)]
    assert asyncio.run(ok()) and s.forward([1]) is not None     # released at the end


def test_asking_a_checkpoint_for_a_tensor_it_lacks_is_one_line(tmp_path):
    """_Source.get looked a missing name up again inside its own error handler: a KeyError traceback (what
    recall_probe.py --init-from-model on a model without a memory met)."""
    from safetensors.torch import save_file
    from ahn_rt.weights import _Source
    save_file({"a": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    src = _Source([tmp_path / "m.safetensors"])
    assert src.get("a").shape == (2,)
    with pytest.raises(AhnError, match="^the checkpoint has no tensor model.layers.0.ahn.fn.D$"):
        src.get("model.layers.0.ahn.fn.D")


def test_two_threads_saving_one_path_do_not_share_a_temporary(tmp_path):
    from ahn_rt.weights import atomic_write
    barrier, errors = threading.Barrier(2, timeout=5), []

    def write(tmp):
        tmp.write_text("x")
        barrier.wait()

    def save():
        try:
            atomic_write(tmp_path / "s.safetensors", write)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=save) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_a_truncated_state_file_says_save_again(model, tmp_path):
    s = model.new_session()
    s.forward([1, 2, 3])
    path = tmp_path / "s.safetensors"
    s.save(path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(AhnError, match="save the session again") as e:
        model.restore(path)
    assert "re-download" not in str(e.value)


def test_more_arguments_are_one_line(model, tmp_path):
    with pytest.raises(AhnError, match="prefill_tokens"):
        model.start_scheduler(prefill_tokens=-1)
    with pytest.raises(AhnError, match="boundary_snapshots"):
        model.enable_prefix_cache(1 << 20, boundary_snapshots="2")
    s = model.new_session()
    s.forward([1, 2, 3])
    for bad in (None, 5):
        with pytest.raises(AhnError, match="file path"):
            s.save(bad)
        with pytest.raises(AhnError, match="file path"):
            model.restore(bad)
    # a state file whose field has another dtype than the model's state: refused, not converted
    from safetensors import safe_open
    from safetensors.torch import save_file
    s.save(tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].double()
    del meta["checksum"]        # (as a file written before the checksum: with it, 'damaged' comes first)
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(AhnError, match=f"field {name} has dtype"):
        model.restore(tmp_path / "b.safetensors")


def test_finish_reason_says_how_a_generation_ended(model):
    g = model.generate(P, max_new_tokens=8)
    next(g)
    g.close()
    assert g.finish_reason == "cancelled"
    g = model.generate(P, max_new_tokens=8)
    g.close()                                       # never started
    assert g.finish_reason == "cancelled"
    g = model.generate(P, max_new_tokens=8)
    next(g)

    def boom():
        raise RuntimeError("boom")
    g._run.launch = boom
    with pytest.raises(RuntimeError):
        list(g)
    assert g.finish_reason == "error"
    g = model.generate(P, max_new_tokens=3, temperature=0)
    list(g)
    g.close()
    assert g.finish_reason in ("stop", "length")


def test_a_generation_refused_its_session_finishes_with_error(model):
    """A generation whose session= is closed or busy by its first next() ends with its AhnError and
    finish_reason "error", as agenerate's does (it stayed None, as if still running)."""
    s = model.new_session()
    g = model.generate(P, max_new_tokens=3, session=s)
    s.close()
    with pytest.raises(AhnError, match="closed"):
        next(g)
    assert g.finish_reason == "error"
    s = model.new_session()
    first = model.generate(P, max_new_tokens=8, session=s)
    next(first)
    g = model.generate(P, max_new_tokens=3, session=s)
    with pytest.raises(AhnError, match="in use"):
        next(g)
    assert g.finish_reason == "error" and first.finish_reason is None
    first.close()
    assert first.finish_reason == "cancelled" and s.forward([1]).shape == (1, model.config.vocab_size)


def test_the_public_surface_is_listed_and_typed():
    assert set(ahn_rt.__all__) <= set(dir(ahn_rt))
    assert (Path(ahn_rt.__file__).parent / "py.typed").is_file()
    import typing
    hints = typing.get_type_hints(ahn_rt.load)
    assert {"weights", "window", "sinks", "mode", "dtype", "device", "chunk_size", "return"} <= set(hints)
    for cls in (ahn_rt.Model, ahn_rt.Session, ahn_rt.Generation):   # every hint resolves at run time
        for name, f in vars(cls).items():
            f = f.fget if isinstance(f, property) else f
            if callable(f) and not name.startswith("_"):
                typing.get_type_hints(f)
    assert "prompt" in typing.get_type_hints(ahn_rt.Model.generate)
    assert "tokens" in typing.get_type_hints(ahn_rt.Model.step)


def test_an_open_generation_says_how_to_free_its_session(model):
    s = model.new_session()
    with model.generate(P, max_new_tokens=8, session=s) as gen:
        for _ in gen:
            break                                   # a caller that stops reading early
        with pytest.raises(AhnError, match="close"):
            s.forward([1])
    assert gen.finish_reason == "cancelled" and s.forward([1]) is not None   # leaving `with` freed it


def test_eos_ids_are_read_once_at_load_not_per_request(tmp_path):
    import shutil
    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder)
    m = ahn_rt.load(folder)
    eos = m.eos_ids()
    (folder / "generation_config.json").write_text("{broken")   # edited (or removed) while serving
    assert m.eos_ids() == eos
    assert list(m.generate(P, max_new_tokens=2))
    with pytest.raises(AhnError, match="generation_config.json"):
        ahn_rt.load(folder)                                          # a broken file fails at load


def _tiny(mode, window, sinks):
    from ahn_rt.init_weights import preset_config, random_state_dict
    from ahn_rt.runtime import from_state_dict
    cfg = preset_config("tiny", True, torch.float32)
    cfg["vocab_size"] = 101
    sd = random_state_dict(cfg, ahn=True, dtype=torch.float32, seed=0)
    return from_state_dict(cfg, sd, window=window, sinks=sinks, mode=mode, dtype="float32", device="cpu")


def test_a_full_mode_state_restores_whatever_window_and_sinks_were_given(tmp_path):
    a, b = _tiny("full", 6, 2), _tiny("full", 50, 0)     # window and sinks do nothing in full mode
    s = a.new_session()
    s.forward(list(range(3, 30)))
    s.save(tmp_path / "f.safetensors")
    r = b.restore(tmp_path / "f.safetensors")
    assert torch.equal(r.forward([7]), s.forward([7]))
    with pytest.raises(AhnError, match="different mode"):
        _tiny("swa", 6, 2).restore(tmp_path / "f.safetensors")


def test_a_dropped_model_is_freed_after_agenerate_and_its_worker_ends():
    import gc
    import weakref

    def use():
        m = ahn_rt.load(DEMO)

        async def go():
            return [p async for p in m.agenerate(P, max_new_tokens=2)]
        assert asyncio.run(go())
        return weakref.ref(m), m.scheduler._thread
    import time
    ref, worker = use()
    for _ in range(100):                 # the worker may still be ending the last generation: a moment
        gc.collect()
        if ref() is None:
            break
        time.sleep(0.05)
    assert ref() is None                 # the worker thread no longer keeps the model (and its weights)
    worker.join(5)
    assert not worker.is_alive()


def test_empty_paths_are_one_line(model, tmp_path):
    # '' was pathlib's current folder: "no model.safetensors ... in .", "cannot write .: it is a folder",
    # ". is a folder"; tokenizer='' was no tokenizer at all (the one beside the weights, silently)
    for kw, name in ((dict(weights=""), "weights"), (dict(weights=DEMO, ahn=" "), "ahn"),
                     (dict(weights=DEMO, tokenizer=""), "tokenizer")):
        with pytest.raises(AhnError, match=f"^{name} is empty; give "):
            ahn_rt.load(**kw)
    with pytest.raises(AhnError, match="save needs a file path, got an empty string"):
        model.new_session().save("")
    with pytest.raises(AhnError, match="restore needs a file path, got an empty string"):
        model.restore("")


def test_token_ids_that_cannot_be_decoded_are_one_line(model):
    # the tokenizers library's OverflowError ("number too small to fit in target type") or TypeError
    tok = model.tokenizer
    assert tok.decode(torch.tensor(tok.encode("hi"))) == tok.decode(tok.encode("hi")) == "hi"
    for bad in ([-1], [2 ** 64], [1.5], ["a"], 5, None, torch.tensor(5)):
        with pytest.raises(AhnError, match="decode needs a list of token ids"):
            tok.decode(bad)


def test_a_tokenizer_that_is_not_there_fails_at_load(tmp_path):
    with pytest.raises(AhnError, match="tokenizer not found"):
        ahn_rt.load(DEMO, tokenizer=tmp_path / "missing.json")    # not at the first request
    assert ahn_rt.load(DEMO, tokenizer=DEMO / "tokenizer.json").tokenizer.encode("x")


def test_a_tokenizer_that_is_not_a_file_is_named_so_in_words_for_api_and_cli():
    """/dev/null exists: it was "tokenizer not found", with the API's "leave tokenizer out" that the CLI's
    --tokenizer user cannot map to a flag."""
    with pytest.raises(AhnError, match=r"^tokenizer is not a regular file: /dev/null .*leave the tokenizer out"):
        ahn_rt.load(DEMO, tokenizer="/dev/null")


def test_a_model_made_from_tensors_says_it_has_no_tokenizer():
    """from_state_dict's model has no folder to find a tokenizer in: generate said "no tokenizer: None not
    found"; it says where the model came from and what to do (its ids still run)."""
    from ahn_rt.init_weights import preset_config, random_state_dict
    from ahn_rt.runtime import from_state_dict
    cfg = preset_config("tiny", "gdn", torch.float32)
    m = from_state_dict(cfg, random_state_dict(cfg, ahn=True, dtype=torch.float32, seed=3))
    with pytest.raises(AhnError, match=r"^no tokenizer: this model was made from tensors \(from_state_dict\)") as e:
        m.generate([1, 2, 3], max_new_tokens=2)
    assert "None" not in str(e.value)
    assert m.new_session().forward([1, 2, 3]).shape == (3, cfg["vocab_size"])

def test_a_tokenizer_folder_is_taken_as_train_takes_it(tmp_path):
    """tokenizer= (--tokenizer) the folder that holds tokenizer.json said "tokenizer not found", though it was
    there; the train command and Tokenizer.from_file take a folder. A folder without one is named as such."""
    assert ahn_rt.load(DEMO, tokenizer=DEMO).tokenizer.encode("x") == ahn_rt.load(DEMO).tokenizer.encode("x")
    with pytest.raises(AhnError, match=r"^no tokenizer.json in the folder .* \(give the path of a tokenizer.json"):
        ahn_rt.load(DEMO, tokenizer=tmp_path)


def test_an_agenerate_dropped_unread_is_cancelled():
    import gc
    import time
    m = ahn_rt.load(DEMO)

    async def drop():
        gen = m.agenerate(P, max_new_tokens=1_000_000)     # a request handler that failed before reading
        ticket = gen.ticket
        del gen
        gc.collect()
        for _ in range(100):                               # the event loop runs on meanwhile
            if ticket.ended.is_set():
                break
            await asyncio.sleep(0.05)
        return ticket
    ticket = asyncio.run(drop())
    assert ticket.ended.is_set() and ticket.run.finish_reason == "cancelled"
    assert m.scheduler.sessions_in_use == 0
    m.scheduler.shutdown()


def test_threads_stepping_sessions_of_one_pool_take_turns(model, monkeypatch):
    """Model.step over sessions of one pool runs under the pool's step lock (the steps share its captured
    graphs' buffers on CUDA), so threads that step different sessions of one pool get what each gets
    alone. The spy shows the lock is held inside every pooled batch step: without it the check fails."""
    from ahn_rt import runtime
    pool = model.new_pool(4)
    real, seen = runtime.batch_step, []

    def spy(dec, states, ids, graphs):
        seen.append(pool.step_lock.locked())
        return real(dec, states, ids, graphs)
    monkeypatch.setattr(runtime, "batch_step", spy)
    prompts = [[5 + i, 9, 11 + i] for i in range(4)]

    def run(i, out):
        s = model.new_session(pool=pool)
        try:
            s.forward(prompts[i])
            out[i] = [model.step([s], [7 + t]) for t in range(6)]
        finally:
            s.close()
    alone = {}
    for i in range(4):
        run(i, alone)
    together = {}
    threads = [threading.Thread(target=run, args=(i, together)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen and all(seen)
    for i in range(4):
        assert all(torch.equal(a, b) for a, b in zip(alone[i], together[i]))


def test_a_call_that_fails_midway_leaves_a_session_that_refuses_until_reset(model, monkeypatch, tmp_path):
    """An exception between a call's first state write and its position update (here: the MLP of layer 2
    raises, in a prefill and in a decode step) leaves layers 0-1 written: the session then refuses forward,
    step, generate, fork and save with a one-line AhnError, and after reset() it runs exactly like a new session.
    An error before any write (an id out of range) leaves the session usable."""
    dec = model.decoder
    real_mlp, real_steps = dec._mlp_, dec.decode_steps
    calls = []

    def failing_mlp(h, lw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real_mlp(h, lw)

    ids = [5, 9, 11, 13, 17, 19, 23]
    s = model.new_session()
    with pytest.raises(AhnError, match="vocabulary|range|vocab"):
        s.forward([10 ** 9])
    want = s.forward(ids)                       # the id error wrote nothing: the session still works
    s.reset()
    monkeypatch.setattr(dec, "_mlp_", failing_mlp)
    with pytest.raises(RuntimeError, match="simulated"):
        s.forward(ids)
    monkeypatch.setattr(dec, "_mlp_", real_mlp)
    for use in (lambda: s.forward([3]), lambda: model.step([s], [3]), lambda: model.generate(P, session=s),
                lambda: model.prefill(P, session=s),
                lambda: s.fork(), lambda: s.save(tmp_path / "torn.safetensors")):
        with pytest.raises(AhnError, match="half-written: reset"):
            use()
    s.reset()
    assert torch.equal(s.forward(ids), want)

    def failing_steps(batch, tokens):
        raise RuntimeError("kernel failed (simulated)")
    monkeypatch.setattr(dec, "decode_steps", failing_steps)
    with pytest.raises(RuntimeError, match="simulated"):
        model.step([s], [3])
    monkeypatch.setattr(dec, "decode_steps", real_steps)
    with pytest.raises(AhnError, match="half-written"):
        s.forward([3])
    s.close()


def test_a_call_that_fails_after_its_first_chunk_or_session_leaves_none_half_advanced(model, monkeypatch):
    """A call that writes in several steps (a prompt's chunks; model.step over private states, one session after
    another) and fails after the first has returned: forward left the session at the end of its first chunk,
    step left the sessions before the failing one advanced, each usable and none marked, so a retry fed those
    tokens twice. Now each state that moved refuses until reset(), and a full-mode cache grows before any
    write, so running out of memory there leaves every session as it was."""
    dec = model.decoder
    real = dec.forward
    calls, failure = [], []

    def second_call_fails(st, ids, *args, **kw):
        calls.append(1)
        if len(calls) == 2:   # between two chunks / sessions: nothing of this call written yet
            raise failure[0]
        return real(st, ids, *args, **kw)

    async def agen(sess):
        return [p async for p in model.agenerate(ids, max_new_tokens=2, session=sess)]

    s, a, b, g, h = (model.new_session(chunk_size=4) for _ in range(5))
    monkeypatch.setattr(dec, "forward", second_call_fails)
    ids = list(range(3, 13))
    for call, exc in ((lambda: s.forward(ids), KeyboardInterrupt),
                      (lambda: model.step([a, b], [3, 4]), KeyboardInterrupt),
                      (lambda: list(model.generate(ids, max_new_tokens=2, session=g)), KeyboardInterrupt),
                      (lambda: asyncio.run(agen(h)), RuntimeError)):   # (the scheduler's worker takes Exception)
        calls.clear()
        failure[:] = [exc]
        with pytest.raises(exc):
            call()
    monkeypatch.setattr(dec, "forward", real)
    for sess in (s, a, g, h):
        with pytest.raises(AhnError, match="half-written: reset"):
            sess.forward([3])
    assert b.position == 0 and b.forward([4]).shape == (1, model.config.vocab_size)
    s.reset()
    assert torch.equal(s.forward(ids), model.new_session(chunk_size=4).forward(ids))

    full = ahn_rt.load(DEMO, mode="full")          # a cache of 256 slots, grown by doubling
    from ahn_rt import cache

    def no_memory(*args, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory (simulated)")
    s, a, b = (full.new_session(chunk_size=128) for _ in range(3))
    b.forward(list(range(256)))                    # b's next token needs a larger cache, a's does not
    monkeypatch.setattr(cache, "zeros", no_memory)
    for call in (lambda: s.forward(list(range(300))), lambda: full.step([a, b], [3, 4])):
        with pytest.raises(RuntimeError, match="simulated"):
            call()
    monkeypatch.undo()
    assert (s.position, a.position, b.position) == (0, 0, 256)
    assert not any(x.state.torn for x in (s, a, b))
    assert s.forward(list(range(300))).shape == (300, full.config.vocab_size)


def test_a_graphs_batch_of_one_advances_the_state_it_last_stepped(model):
    """A captured B = 1 step of a pool serves whichever session of the pool steps next: its batch's
    ``states`` change per replay, and ``advance`` must move that state, not the one it was captured with
    (on CUDA a pooled model.step([sB]) after model.step([sA]) advanced sA). CPU: the batch built as
    batch_step builds a graph's, then re-pointed as BatchStep does."""
    from ahn_rt.cache import DecodeBatch, begin_writes
    pool = model.new_pool(3)
    a, b = model.new_session(pool=pool), model.new_session(pool=pool)
    a.forward([1, 2, 3])
    b.forward([4, 5])
    batch = DecodeBatch([a.state], torch.tensor([a.state.pool_slot]))
    begin_writes([b.state])
    batch.states = [b.state]   # (BatchStep also re-points state0 now; advance must not depend on it)
    batch.advance()
    assert (a.position, b.position, b.state.torn) == (3, 3, False)
    assert pool.storage["pos"][[a.state.pool_slot, b.state.pool_slot]].tolist() == [3, 3]
    a.close()
    b.close()


def test_concurrent_agenerate_on_sessions_of_one_pool(model):
    """Two agenerate calls given sessions of one pool run as one batch on the scheduler (which owns both
    sessions for the runs): both finish, each with the text it gives alone. They failed with 'this
    session is in use' when the batched step claimed the sessions again."""
    pool = model.new_pool(2)
    s1, s2 = model.new_session(pool=pool), model.new_session(pool=pool)
    prompts = [P, "import os\n"]
    alone = ["".join(model.generate(p, max_new_tokens=6, temperature=0)) for p in prompts]

    async def one(s, p):
        async with model.agenerate(p, max_new_tokens=6, temperature=0, session=s) as gen:
            return "".join([piece async for piece in gen]), gen.finish_reason

    async def both():
        return await asyncio.gather(one(s1, prompts[0]), one(s2, prompts[1]))
    got = asyncio.run(both())
    assert [text for text, _ in got] == alone and all(r in ("stop", "length") for _, r in got)
    s1.close()
    s2.close()


def test_a_call_racing_close_never_writes_the_released_slot(model):
    """A close() from another thread that lands between a call's closed-check and its taking the session
    gives the pool slot back (and a new session may hold it by then): the call must be refused as closed,
    not write that slot. The race is forced in one thread: the session's lock runs the close (and a new
    session taking the slot) when the call first tries to take it. Before the fix, reset() zeroed the
    new session's state."""
    pool = model.new_pool(1)
    s = model.new_session(pool=pool)
    s.forward([5, 9, 11])
    taken = {}

    class CloseFirst:
        def __init__(self, lock):
            self.lock, self.armed = lock, True

        def acquire(self, blocking=True):
            if self.armed:
                self.armed = False
                s.close()                                 # "another thread" closes s here
                taken["t"] = model.new_session(pool=pool)  # and its slot goes to a new session
                taken["logits"] = taken["t"].forward([7, 8, 9])
            return self.lock.acquire(blocking)

        def release(self):
            self.lock.release()
    s._busy = CloseFirst(s._busy)
    with pytest.raises(AhnError, match="closed"):
        s.reset()
    t = taken["t"]
    assert t.position == 3 and t.state.k.any()           # the new owner's state is intact
    t.reset()
    assert torch.equal(t.forward([7, 8, 9]), taken["logits"])
    t.close()


def test_token_ids_of_any_integer_dtype_are_taken_and_bytes_are_refused(model):
    """forward/step take a 1-D tensor of any integer dtype (an int16 or uint8 tensor was refused with 'must
    be a 1-D integer tensor'); bytes, which iterate as ints, are refused instead of fed as ids, and a meta
    tensor (no values) in one line instead of torch's NotImplementedError."""
    want = model.new_session().forward([5, 9, 11])
    for dtype in (torch.int16, torch.uint8, torch.int8):
        assert torch.equal(model.new_session().forward(torch.tensor([5, 9, 11], dtype=dtype)), want)
    s = model.new_session()
    assert torch.equal(model.step([s], torch.tensor([5], dtype=torch.int16)), model.new_session().forward([5]))
    for bad, needle in ((b"def", "got bytes"), (bytearray(b"d"), "got bytearray"), ("def", "got str"),
                        (torch.tensor([1.0]), "1-D float32 tensor"), (torch.tensor([True]), "1-D bool tensor"),
                        # no values to range-check: NotImplementedError from torch
                        (torch.tensor([5], device="meta"), "token_ids is a tensor on the meta device")):
        with pytest.raises(AhnError, match=needle):
            s.forward(bad)
        with pytest.raises(AhnError, match=needle):
            model.step([s], bad)
    assert s.position == 1



def test_a_uint64_token_id_past_int64_is_named_as_given(model):
    """A uint64 tensor's id of 2**63 or more was named as its int64 wrap ("token id -1 is outside the
    vocabulary" for 2**64 - 1), an id the caller never gave; generate already named it as given."""
    s = model.new_session()
    for v in (2 ** 64 - 1, 2 ** 63):
        ids = torch.tensor([3, v], dtype=torch.uint64)
        for call in (lambda: s.forward(ids), lambda: model.step([s, model.new_session()], ids)):
            with pytest.raises(AhnError, match=f"token id {v} is outside the vocabulary"):
                call()
    assert s.position == 0 and s.forward(torch.tensor([3], dtype=torch.uint64)).shape == (1, model.config.vocab_size)

def _read_in_thread(g):
    """Iterate the generation ``g`` in a new thread: (the thread, the pieces it got, the errors it raised)."""
    got, errors = [], []

    def read():
        try:
            got.extend(g)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    t = threading.Thread(target=read)
    t.start()
    return t, got, errors


def test_a_generation_closed_from_another_thread_stops_at_the_next_token(model):
    """close() from another thread while the reading thread is inside next() (a cancel button, a watchdog)
    raised Python's 'ValueError: generator already executing' and cancelled nothing; it now stops the
    reader at its next token and frees the session. A second thread reading the same generation gets a
    one-line AhnError."""
    s = model.new_session()
    g = model.generate(P, max_new_tokens=1000, session=s)
    entered, go = threading.Event(), threading.Event()
    real = g._run.land

    def land(tid):                       # the reader waits inside next() until the close has returned
        entered.set()
        go.wait(5)
        return real(tid)
    g._run.land = land
    t, got, errors = _read_in_thread(g)
    assert entered.wait(5)
    with pytest.raises(AhnError, match="being read by another thread"):
        next(g)
    g.close()                            # raised ValueError before the fix
    go.set()
    t.join(5)
    assert not t.is_alive() and not errors and g._run.sampled <= 3
    assert g.finish_reason == "cancelled"
    assert s.forward([1]).shape == (1, model.config.vocab_size)   # the session is free again


def test_a_generation_closed_from_another_thread_during_its_prefill_yields_nothing(model):
    """close() from another thread while the reader is still prefilling the prompt: the reader went on with
    every remaining prefill chunk and then handed out the first token's text after close() had returned
    (the first token is accepted by the prefill's end, not by land(), which drops it). Now the prefill stops
    at the chunk in flight and nothing is yielded."""
    s = model.new_session(chunk_size=8)
    g = model.generate(P * 12, max_new_tokens=50, temperature=0, session=s)
    entered, go = threading.Event(), threading.Event()
    real, chunks = g._run.prefill_chunk, []

    def prefill_chunk():                 # the reader waits inside its first chunk until close() has returned
        chunks.append(1)
        if len(chunks) == 1:
            entered.set()
            go.wait(5)
        return real()
    g._run.prefill_chunk = prefill_chunk
    t, got, errors = _read_in_thread(g)
    assert entered.wait(5)
    g.close()
    go.set()
    t.join(5)
    assert not t.is_alive() and not errors
    assert got == [] and g.finish_reason == "cancelled" and g.stats.new_tokens == 0
    assert len(chunks) == 1                                       # the rest of the prompt was not prefilled
    assert s.forward([1]).shape == (1, model.config.vocab_size)   # the session is free again


def test_integer_arguments_of_any_integer_type_are_taken(model):
    """A service computes its limits with numpy (or reads them from an array): max_new_tokens=np.int64(8)
    was refused with "max_new_tokens must be a non-negative integer, got np.int64(8)", and so were seed,
    chunk_size, capacity, a pool size and the prefix cache's size, though top_k and token ids took any
    integer type. Each now takes what ``numbers.Integral`` names (never bool), with the same result as the
    Python int; a float still fails."""
    np = pytest.importorskip("numpy")
    want = "".join(model.generate(P, max_new_tokens=6, temperature=0.8, seed=5))
    assert "".join(model.generate(P, max_new_tokens=np.int64(6), temperature=0.8, seed=np.int64(5))) == want
    assert "".join(model.generate(P, max_new_tokens=np.int32(6), temperature=0.8, seed=np.uint16(5))) == want
    s = model.new_session(chunk_size=np.int64(3), capacity=None)
    assert s.chunk_size == 3 and type(s.chunk_size) is int
    pool = model.new_pool(np.int64(2))
    assert pool.size == 2 and type(pool.size) is int
    pool_session = model.new_session(pool=pool)
    pool_session.close()
    cache = model.enable_prefix_cache(np.int64(1 << 20), boundary_snapshots=np.int8(1))
    assert cache.max_bytes == 1 << 20 and cache.boundary_snapshots == 1
    model.enable_prefix_cache(0)
    m = ahn_rt.load(DEMO, chunk_size=np.int64(64))
    assert m.chunk_size == 64
    for bad in (dict(max_new_tokens=np.float64(6)), dict(seed=np.float32(5)), dict(max_new_tokens=np.bool_(True))):
        with pytest.raises(AhnError, match=next(iter(bad))):
            model.generate(P, **{"max_new_tokens": 2, **bad})
    # the scheduler's limits too (they were refused: "max_active must be a positive integer, got np.int64(4)")
    sched = model.start_scheduler(max_active=np.int64(4), max_queue=np.int32(5), prefill_tokens=np.uint16(16))
    assert (sched.max_active, sched.max_queue, sched.prefill_tokens) == (4, 5, 16)
    assert all(type(v) is int for v in (sched.max_active, sched.max_queue, sched.prefill_tokens))
    for bad in (dict(max_active=np.float64(4)), dict(max_queue=np.bool_(True)), dict(prefill_tokens=np.int64(0))):
        with pytest.raises(AhnError, match=next(iter(bad))):
            model.start_scheduler(**bad)
    sched.shutdown()      # the next agenerate makes a default one


def test_last_only_is_a_bool_not_any_truthy_value(model):
    """forward's last_only took any value by its truth, as chat once did: last_only="no" (or "False") gave the
    last position's logits alone, and the state advanced all the same."""
    np = pytest.importorskip("numpy")
    s = model.new_session()
    for bad in ("no", "False", 1, None, [False]):
        with pytest.raises(AhnError, match=f"last_only must be True or False, got {type(bad).__name__}"):
            s.forward([1, 2, 3], last_only=bad)
    assert s.position == 0                                 # nothing ran
    assert s.forward([1, 2, 3], last_only=np.bool_(True)).shape == (1, model.config.vocab_size)
    assert s.forward([4, 5], last_only=False).shape == (2, model.config.vocab_size)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_named(tmp_path):
    """Another model's tokenizer (--tokenizer / tokenizer=) whose ids reach past the embedding: the first
    prompt failed with "token id 14990 is outside the vocabulary [0, 4096)", which names neither the tokenizer
    nor the fix. It is named when the tokenizer is read (the CLI reads it at load); the model's own loads."""
    from tokenizers import Tokenizer
    big = Tokenizer.from_file(str(DEMO / "tokenizer.json"))          # 4096 tokens, the demo's vocabulary
    big.add_special_tokens([f"<|extra_{i}|>" for i in range(3)])
    big.save(str(tmp_path / "tokenizer.json"))
    m = ahn_rt.load(DEMO, tokenizer=tmp_path / "tokenizer.json")
    with pytest.raises(AhnError, match=r"^the tokenizer .*tokenizer.json has 4099 tokens but the model's embedding has "
                                       r"4096 rows \(ids 4096..4098 have none\); give the model's own tokenizer.json"):
        m.generate(P, max_new_tokens=1)
    assert ahn_rt.load(DEMO, tokenizer=DEMO / "tokenizer.json").tokenizer.vocab_size == 4096


@pytest.mark.parametrize("what", ["forward", "step", "generate", "prefill", "decode"])
@pytest.mark.parametrize("ids", [{5, 6, 7}, frozenset({5, 6}), {5: 1, 6: 2}], ids=["set", "frozenset", "dict"])
def test_token_ids_without_an_order_are_refused(model, what, ids):
    """A set of token ids was fed in hash order and a dict as its keys, silently: the sequence the model saw
    was not one the caller wrote (``stop`` refuses them for the same reason)."""
    sess = model.new_session()
    call = {"forward": lambda: sess.forward(ids), "step": lambda: model.step([sess], ids),
            "generate": lambda: model.generate(ids, max_new_tokens=1),
            "prefill": lambda: model.prefill(ids), "decode": lambda: model.tokenizer.decode(ids)}[what]
    with pytest.raises(AhnError, match=f"got {type(ids).__name__}, which has no order; give a list"):
        call()
    assert sess.position == 0


def test_a_set_of_sessions_is_refused_by_step(model):
    """Row b of step's logits belongs to sessions[b]: a set of sessions stepped in an order the caller cannot
    know (and two sets of the same sessions could pair tokens and sessions differently)."""
    a, b = model.new_session(), model.new_session()
    with pytest.raises(AhnError, match="step: sessions must be a list of Sessions, got set, which has no order"):
        model.step({a, b}, [5, 6])
    assert a.position == b.position == 0
    assert model.step((a, b), [5, 6]).shape == (2, model.config.vocab_size)


@pytest.mark.parametrize("bad", [2 ** 70, -(2 ** 70), 2 ** 63])
def test_a_token_id_beyond_int64_is_outside_the_vocabulary(model, bad):
    """forward / step said "token_ids must be a list of ints or a 1-D integer tensor" for a list of ints (torch
    could not hold the id); generate named the id. All three name it now."""
    sess = model.new_session()
    for call in (lambda: sess.forward([1, bad]), lambda: model.step([sess], [bad]),
                 lambda: model.generate([1, bad], max_new_tokens=1)):
        with pytest.raises(AhnError, match=rf"^token id {bad} is outside the vocabulary \[0, 4096\)$"):
            call()
    assert sess.position == 0


def test_chunk_size_is_checked_when_set():
    """A session's (or model's) chunk_size set to 0, a float or a string failed in the next prefill with
    range()'s ValueError or a TypeError; now the assignment raises AhnError and the old value stays."""
    import numpy as np
    model = ahn_rt.load(DEMO)   # (its own: the test sets its chunk_size)
    s = model.new_session()
    want = s.forward(list(range(3, 40)))
    for bad in (0, -1, 2.5, "8", True):
        for obj in (s, model):
            before = obj.chunk_size
            with pytest.raises(AhnError, match="chunk_size"):
                obj.chunk_size = bad
            assert obj.chunk_size == before
    t = model.new_session()
    t.chunk_size = np.int64(5)
    assert t.chunk_size == 5 and type(t.chunk_size) is int
    # the same as a chunk size of int 5 bit for bit; the one-shot prefill's up to bf16 rounding (chunks under 32
    # rows keep the model's dtype in their GEMMs, a 37-row prompt computes them in float32 and rounds once)
    u = model.new_session()
    u.chunk_size = 5
    got = t.forward(list(range(3, 40)))
    assert torch.equal(got, u.forward(list(range(3, 40))))
    torch.testing.assert_close(got, want, rtol=0, atol=0.25)
    t.chunk_size = None
    assert t.chunk_size == model.chunk_size


def test_sessions_parked_between_generate_calls_are_bounded(monkeypatch):
    """generate() without a session parks the one it borrowed for the next call: N concurrent calls left N
    states parked for the model's life (1.2 GB each at the 3B shape's window), and a full-mode cache grown by
    one long prompt kept its size. Now at most runtime.IDLE_SESSIONS stay parked, the others are closed, and a
    full-mode cache past runtime.IDLE_FULL_SLOTS is closed too."""
    from ahn_rt import runtime
    m = ahn_rt.load(DEMO)
    gens = [m.generate(P, max_new_tokens=3, temperature=0) for _ in range(4)]
    for g in gens:
        next(g)                      # each has borrowed its session: four at once
    borrowed = [g._run.session for g in gens]
    assert len({id(s) for s in borrowed}) == 4
    for g in gens:
        list(g)
    assert len(m._idle) == runtime.IDLE_SESSIONS == 2
    closed = [s for s in borrowed if s not in m._idle]
    assert len(closed) == 2 and all(s._state is None for s in closed)
    first = "".join(m.generate(P, max_new_tokens=3, temperature=0))
    assert "".join(m.generate(P, max_new_tokens=3, temperature=0)) == first and len(m._idle) == 2

    full = ahn_rt.load(DEMO, mode="full")
    monkeypatch.setattr(runtime, "IDLE_FULL_SLOTS", 256)
    "".join(full.generate(P, max_new_tokens=2))
    assert len(full._idle) == 1 and full._idle[0].state.capacity == 256
    long = full.tokenizer.decode(full.tokenizer.encode(P) * 40)   # past 256 tokens: the cache grows to 512
    "".join(full.generate(long, max_new_tokens=2))
    assert full._idle == []
