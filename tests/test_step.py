"""model.step: one token for each of several sessions in one call.

Row b of ``model.step(sessions, tokens)`` equals ``sessions[b].forward([tokens[b]])`` bit for bit
(torch.equal, no tolerance), whatever the batch size and whoever the neighbours are (sessions still
filling the window, at the fill point, long past it), for every memory variant, the swa and full modes,
float32 and bf16; every session advances by one; bad calls get one line. The GPU case is marked cuda."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ahn_rt import ops
from ahn_rt.cache import DecodeBatch
from ahn_rt.errors import AhnError
from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict
from capture_spy import HostSpy

W, S = 6, 2
DEPTHS = [0, 3, S + W - 1, S + W, S + W + 1, 25]      # before, at and past the fill point


def _model(impl="gdn", mode="ahn", dtype="float32", device="cpu"):
    cfg = preset_config("tiny", impl, torch.float32)
    cfg["vocab_size"] = 101
    sd = random_state_dict(cfg, ahn=True, dtype=torch.float32, seed=3)
    return from_state_dict(cfg, {k: v.to(device) for k, v in sd.items()}, window=W, sinks=S, mode=mode,
                           dtype=dtype, device=device)


def _sessions(model, depths, seed=0, pool=None):
    out = []
    for i, d in enumerate(depths):
        s = model.new_session(pool=pool)
        if d:
            g = torch.Generator().manual_seed(seed + i)
            s.forward(torch.randint(0, 101, (d,), generator=g).tolist())
        out.append(s)
    return out


def _check_step(model, batch_order, depths, tokens, pooled=True):
    """Step the sessions in the given order/grouping (sessions of one state pool: one batch per group;
    private sessions: one at a time); compare each row with a twin stepped alone."""
    alone = _sessions(model, depths)
    want = [alone[b].forward([tokens[b]]) for b in range(len(depths))]
    pool = model.new_pool(len(depths) + 2) if pooled and model.config.mode != "full" else None
    together = _sessions(model, depths, pool=pool)
    got = {}
    for group in batch_order:
        logits = model.step([together[b] for b in group], [tokens[b] for b in group])
        assert logits.shape == (len(group), model.config.vocab_size) and logits.dtype == torch.float32
        for row, b in enumerate(group):
            got[b] = logits[row]
    for b in range(len(depths)):
        assert torch.equal(got[b], want[b][0]), f"session {b} (depth {depths[b]}) differs"
        assert together[b].position == depths[b] + 1
        # the states after the step are the same too: the next token agrees
        assert torch.equal(together[b].forward([7]), alone[b].forward([7]))


def test_a_stepper_captures_again_when_the_cache_moved_elsewhere(monkeypatch):
    """The stepper replays a session's captured graph only while the state's buffers are those it was captured
    over (State.layout). Full mode's cache also grows in a prefill or a load, where the stepper's own growth
    check did not see it, so a reused session replayed a graph that wrote freed buffers. A stand-in for the
    capture (which needs CUDA; test_cuda_model runs the real one) records each capture and steps eagerly."""
    from ahn_rt import graph
    from ahn_rt.sampling import Sampler, SamplingParams
    captures = []

    class Captured:
        def __init__(self, session, sampler):
            self.session, self.sampler, self.layout = session, sampler, session.state.layout
            captures.append(self)

        def __call__(self, tok):
            self.logits = self.session.model.decoder.forward(self.session.state, tok.view(1))[0]
            return self.sampler.sample(self.logits)

    monkeypatch.setattr(graph, "_GraphStep", Captured)
    model = _model(mode="full")
    sess = model.new_session()
    sampler = Sampler(SamplingParams(temperature=0), 101, "cpu")
    step = sess.stepper(sampler)
    step.graphed = True
    tok = sampler.sample(sess.forward(list(range(1, 20)), last_only=True)[-1])
    for _ in range(3):
        tok = step(tok)
    assert len(captures) == 1 and sess.state.capacity == 256
    sess.reset()
    tok = sampler.sample(sess.forward([i % 101 for i in range(300)], last_only=True)[-1])   # grows: 512
    assert sess.state.capacity == 512 and sess.state.layout == captures[0].layout + 1
    tok = step(tok)
    assert len(captures) == 2 and captures[1].layout == sess.state.layout
    tok = step(tok)
    assert len(captures) == 2 and sess.position == 302


@pytest.mark.parametrize("impl", ["gdn", "dn", "mamba2"])
@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_step_equals_forward_in_any_batch(impl, dtype):
    model = _model(impl, dtype=dtype)
    tokens = [5, 17, 99, 0, 42, 64]
    # all at once, one at a time, and mixed groups with other neighbours
    for order in ([[0, 1, 2, 3, 4, 5]], [[b] for b in range(6)], [[5, 0, 3], [1, 4], [2]]):
        _check_step(model, order, DEPTHS, tokens)
    _check_step(model, [[0, 1, 2, 3, 4, 5]], DEPTHS, tokens, pooled=False)


def test_step_check_can_fail():
    """The bit-for-bit row check sees a wrong row: the same sessions fed other tokens differ."""
    model = _model()
    with pytest.raises(AssertionError, match="differs"):
        alone = _sessions(model, DEPTHS)
        want = [alone[b].forward([1]) for b in range(6)]
        got = model.step(_sessions(model, DEPTHS, pool=model.new_pool(6)), [2] * 6)
        for b in range(6):
            assert torch.equal(got[b], want[b][0]), f"session {b} differs"


@pytest.mark.parametrize("mode", ["swa", "full"])
def test_step_in_swa_and_full_mode(mode):
    model = _model(mode=mode)
    _check_step(model, [[0, 1, 2, 3, 4, 5]], DEPTHS, [1, 2, 3, 4, 5, 6])


def test_step_accepts_a_tensor_and_rejects_bad_calls():
    model, other = _model(), _model()
    a, b = model.new_session(), model.new_session()
    assert model.step([a, b], torch.tensor([3, 4])).shape == (2, 101)
    for sessions, tokens, msg in (([], [], "no sessions"), ([a, a], [1, 2], "appears twice"),
                                  ([a, b], [1], "one token per session"), ([a, other.new_session()], [1, 2],
                                                                            "of this model"),
                                  ([a, b], [1, 500], "outside the vocabulary"), ([a], 3, "one token per session"), ([a], np.int64(3), "got the single int64")):
        with pytest.raises(AhnError, match=msg):
            model.step(sessions, tokens)
    assert a.position == 1 and b.position == 1          # nothing advanced by a refused call


@pytest.mark.parametrize("mode,pooled", [("ahn", False), ("ahn", True), ("full", False)])
def test_a_step_refused_for_a_half_written_session_advances_none(mode, pooled):
    """A session that a failed call left half-written is refused by model.step, and so is the whole step:
    sessions that step one by one (private states, full mode) met it only in its turn, after those before
    it had advanced (their step's logits lost, and a retry fed their token twice)."""
    from ahn_rt.cache import begin_writes
    model = _model(mode=mode)
    pool = model.new_pool(3) if pooled else None
    a, b, c = (model.new_session(pool=pool) for _ in range(3))
    for s in (a, b, c):
        s.forward([1, 2, 3])
    begin_writes([b.state])                              # as a call that failed midway leaves it
    with pytest.raises(AhnError, match="half-written"):
        model.step([a, b, c], [4, 5, 6])
    assert [s.position for s in (a, b, c)] == [3, 3, 3]
    b.reset()
    b.forward([1, 2, 3])
    ref = model.new_session()
    ref.forward([1, 2, 3])
    assert torch.equal(model.step([a, b, c], [4, 5, 6])[0], ref.forward([4])[0])


@pytest.mark.skipif(ops.backend() != "ext", reason="the compiled ops are not built (the references sync)")
@pytest.mark.parametrize("impl,mode", [("gdn", "ahn"), ("dn", "ahn"), ("mamba2", "ahn"), ("gdn", "swa")])
def test_decode_step_as_captured_makes_no_host_tensor_and_reads_nothing_back(impl, mode):
    """What the CUDA graphs capture (``decode_step`` of one state, ``decode_steps`` of a pooled batch), run
    on the CPU's compiled ops after a first eager step as the graphs do: no tensor made from host data and
    nothing read back to the host (either fails a capture on CUDA), before and past the fill point.
    tests/capture_spy.py shows the spy flags both."""
    model = _model(impl, mode=mode, dtype="bf16")
    dec = model.decoder
    private = _sessions(model, [S + W - 1])[0]
    pooled = _sessions(model, DEPTHS, pool=model.new_pool(len(DEPTHS)))
    batch = DecodeBatch([x.state for x in pooled])
    tok, ids = torch.tensor([3]), torch.arange(len(DEPTHS))
    dec.decode_step(private.state, tok)      # the eager first step, as before a capture (allocations, scratch)
    dec.decode_steps(batch, ids)
    for _ in range(2):                       # at S + W - 1, then at the fill point S + W
        with HostSpy() as spy:
            dec.decode_step(private.state, tok)
            dec.decode_steps(batch, ids)
        assert spy.found == []
        private.state.advance(1)
        batch.advance()


class _InLine:
    """model._SideStream's interface with no second stream: the forked step's arithmetic, in line."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def join(self, t):
        return t


def _forked_run(model, monkeypatch, fork: bool, ids):
    """decode_steps of a pooled batch at DEPTHS for len(ids) steps, with the memory term kept apart and added
    by o_proj's GEMV (``fork``: the path of AHN_RT_DECODE_FORK=1 in a capture, its streams serial here) or
    added in place (the serial step). Returns the logits of every step and the pool's tensors."""
    from ahn_rt import model as model_mod
    monkeypatch.setattr(model_mod._SideStream, "for_decode",
                        classmethod(lambda cls, device: _InLine() if fork else None))
    pool = model.new_pool(len(DEPTHS))
    batch = DecodeBatch([x.state for x in _sessions(model, DEPTHS, pool=pool)])
    out = []
    for t in ids:
        out.append(model.decoder.decode_steps(batch, torch.full((len(DEPTHS),), t)))
        batch.advance()
    return torch.stack(out), {k: v.clone() for k, v in pool.storage.items()}


@pytest.mark.parametrize("impl", ["gdn", "dn", "mamba2"])
@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_forked_memory_step_gives_the_same_bits(monkeypatch, impl, dtype):
    """AHN_RT_DECODE_FORK's arithmetic: the memory step writes its term into a buffer of -0.0 and o_proj adds
    it to the attention output as it loads it (x_add): every logit of every step and the whole pool state
    are the same bits as the serial step that adds the term in place, before, at and past the fill point.
    (On CUDA the same path runs as a parallel branch of the captured graph: test_cuda_model.)"""
    model = _model(impl, dtype=dtype)
    ids = [5, 17, 99, 0, 42]
    serial, s_pool = _forked_run(model, monkeypatch, False, ids)
    forked, f_pool = _forked_run(model, monkeypatch, True, ids)
    assert torch.equal(serial, forked), "the forked step's logits differ from the serial step's"
    for name in s_pool:
        assert torch.equal(s_pool[name], f_pool[name]), f"pool field {name} differs"


def test_forked_memory_step_check_can_fail(monkeypatch):
    """The comparison above sees a lost memory term: o_proj ignoring x_add gives other logits."""
    model = _model("gdn", dtype="bf16")
    serial, _ = _forked_run(model, monkeypatch, False, [5, 17])
    real = ops.gemv
    monkeypatch.setattr(ops, "gemv", lambda *a, x_add=None, **k: real(*a, **k))
    forked, _ = _forked_run(model, monkeypatch, True, [5, 17])
    assert not torch.equal(serial, forked)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("impl", ["gdn", "dn", "mamba2"])
def test_step_equals_forward_on_cuda(impl):
    model = _model(impl, dtype="bf16", device="cuda")
    for order in ([[0, 1, 2, 3, 4, 5]], [[5, 0, 3], [1, 4], [2]]):
        _check_step(model, order, DEPTHS, [5, 17, 99, 0, 42, 64])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("impl", ["gdn", "dn", "mamba2"])
@pytest.mark.parametrize("mode", ["ahn", "swa"])
@pytest.mark.parametrize("fork", ["0", "1"])
def test_step_from_a_pool_replays_its_graphs_on_cuda(monkeypatch, impl, mode, fork):
    """bf16 on the GPU, many steps: model.step of pooled sessions (first step per batch size eager, then
    the captured graph replayed with other slots and tokens) equals each session stepped alone, row by
    row bit for bit, and every session ends at its own position; the pool's unused slots stay zero.
    fork = AHN_RT_DECODE_FORK: the graphs' memory steps on a parallel branch, the eager steps serial."""
    if mode == "swa" and (impl != "gdn" or fork == "1"):
        pytest.skip("swa mode has no memory")
    monkeypatch.setenv("AHN_RT_DECODE_FORK", fork)
    model = _model(impl, mode=mode, dtype="bf16", device="cuda")
    pool = model.new_pool(len(DEPTHS) + 2)
    together = _sessions(model, DEPTHS, pool=pool)
    alone = _sessions(model, DEPTHS)
    used = {s.state.pool_slot for s in together}
    g = torch.Generator().manual_seed(5)
    for step in range(6):
        # odd steps: each batch size's graph replayed for other sessions each time (B = 1 included: its
        # batch must advance the session it stepped, not the one it was captured with)
        groups = ([0, 1, 2, 3, 4, 5],) if step % 2 == 0 else {
            1: ([5, 0, 3], [1, 4], [2]), 3: ([1, 2, 3], [0, 5], [4]), 5: ([0, 2, 4], [3, 1], [5])}[step]
        for group in groups:
            toks = torch.randint(0, 101, (len(group),), generator=g).tolist()
            got = model.step([together[b] for b in group], toks)
            for row, b in enumerate(group):
                assert torch.equal(got[row], alone[b].forward([toks[row]])[0]), f"step {step}: session {b} differs"
    for slot in set(range(pool.size)) - used:
        assert not pool.storage["k"][:, slot].any(), f"unused slot {slot} was written"
    assert [s.position for s in together] == [d + 6 for d in DEPTHS]
