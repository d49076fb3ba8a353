"""The state pool: the fixed-size states of many sessions as one set of tensors, handed out by slot.

Exact checks only (torch.equal, no tolerance): a pooled session computes what a private one computes,
prefill, decode and ``model.step``, for every memory variant and swa mode; its writes stay inside its own
slot (every other slot of the pool is unchanged bit for bit, and a negative control shows the check sees
a write into a neighbour); slots are handed out and given back (close, the context manager, garbage
collection); fork, save and restore work on pooled sessions; mistakes get one line."""
from __future__ import annotations

import gc

import pytest
import torch

from ahn_rt.cache import StatePool
from ahn_rt.errors import AhnError
from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict
from ahn_rt.sampling import Sampler, SamplingParams

W, S, V = 6, 2, 101


def _model(impl="gdn", mode="ahn", dtype="float32", device="cpu"):
    cfg = preset_config("tiny", impl, torch.float32)
    cfg["vocab_size"] = V
    sd = random_state_dict(cfg, ahn=True, dtype=torch.float32, seed=3)
    return from_state_dict(cfg, {k: v.to(device) for k, v in sd.items()}, window=W, sinks=S, mode=mode,
                           dtype=dtype, device=device)


def _ids(n, seed):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _other_slots(pool, slot):
    """Copies of every pool tensor without slot ``slot``."""
    out = {}
    for name, t in pool.storage.items():
        axis = 1 if name in ("k", "v", "memory") or name.startswith("gate.") else 0   # layer-stacked: [L, N, ...]
        keep = [i for i in range(pool.size) if i != slot]
        out[name] = t.index_select(axis, torch.tensor(keep, device=t.device)).clone()
    return out


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_layout_views_share_the_pool_storage():
    model = _model()
    pool = model.new_pool(3)
    assert isinstance(pool, StatePool) and pool.size == pool.free == 3
    sessions = [model.new_session(pool=pool) for _ in range(3)]
    assert pool.free == 0 and [s.state.pool_slot for s in sessions] == [0, 1, 2]
    st = sessions[1].state
    L = model.config.num_layers
    for name, t in st.tensors().items():
        for i in range(L):
            assert t[i].is_contiguous(), name                     # what the kernels take per layer
    assert st.k.data_ptr() == pool.storage["k"][0, 1].data_ptr()
    assert st.pos.data_ptr() == pool.storage["pos"][1:].data_ptr()
    # the pool is the states, no more: size x one state
    assert pool.nbytes == 3 * st.nbytes == 3 * model.new_session().state_nbytes


@pytest.mark.parametrize("impl,mode", [("gdn", "ahn"), ("dn", "ahn"), ("mamba2", "ahn"), ("gdn", "swa")])
def test_pooled_session_equals_private_and_touches_only_its_slot(impl, mode):
    model = _model(impl, mode)
    pool = model.new_pool(3)
    neighbours = [model.new_session(pool=pool) for _ in range(2)]
    for j, s in enumerate(neighbours):
        s.forward(_ids(5 + 7 * j, seed=j))
    mine, alone = model.new_session(pool=pool), model.new_session()
    assert mine.state.pool_slot == 2
    before = _other_slots(pool, 2)
    prompt = _ids(3 * (S + W) + 1, seed=9)                   # past the fill point: the memory works
    assert torch.equal(mine.forward(prompt), alone.forward(prompt))
    for t in _ids(4, seed=10):                               # the decode path
        assert torch.equal(mine.forward([t]), alone.forward([t]))
    assert torch.equal(model.step([mine], [3]), alone.forward([3]))
    assert _same(_other_slots(pool, 2), before), "a pooled session wrote outside its slot"
    # the check can fail: a write into a neighbour's slot is seen
    neighbours[0].state.k[0, 0, 0, 0] += 1
    assert not _same(_other_slots(pool, 2), before)


def test_step_over_a_pool_equals_each_session_alone():
    model = _model()
    pool = model.new_pool(4)
    depths = [0, S + W - 1, S + W, 25]
    pooled = [model.new_session(pool=pool) for _ in depths]
    alone = [model.new_session() for _ in depths]
    for j, d in enumerate(depths):
        if d:
            pooled[j].forward(_ids(d, seed=j))
            alone[j].forward(_ids(d, seed=j))
    tokens = [4, 8, 15, 16]
    got = model.step(pooled, tokens)
    for j in range(4):
        assert torch.equal(got[j], alone[j].forward([tokens[j]])[0])
        assert pooled[j].position == depths[j] + 1


def test_slots_are_handed_out_and_given_back():
    model = _model()
    pool = model.new_pool(2)
    a, b = model.new_session(pool=pool), model.new_session(pool=pool)
    with pytest.raises(AhnError, match="all 2 slots of the state pool are in use") as e:
        model.new_session(pool=pool)
    assert "\n" not in str(e.value)
    a.forward(_ids(9, seed=1))
    slot = a.state.pool_slot
    a.close()
    a.close()                                               # harmless
    assert a.closed and pool.free == 1
    with pytest.raises(AhnError, match="session is closed"):
        a.forward([1])
    with pytest.raises(AhnError, match="session is closed"):
        model.step([a, b], [1, 2])
    c = model.new_session(pool=pool)                        # the freed slot, zeroed
    assert c.state.pool_slot == slot and c.position == 0
    assert all(not t.any() for t in c.state.tensors().values())
    assert torch.equal(c.forward([5, 6]), model.new_session().forward([5, 6]))
    with c:                                                 # the context manager closes
        pass
    assert c.closed and pool.free == 1
    del b                                                   # dropped without close: the slot comes back
    gc.collect()
    assert pool.free == 2


def test_fork_save_and_restore_of_pooled_sessions(tmp_path):
    model = _model()
    pool = model.new_pool(2)
    a = model.new_session(pool=pool)
    a.forward(_ids(S + W + 5, seed=2))
    f = a.fork()
    assert f.pool is pool and pool.free == 0 and f.state.pool_slot != a.state.pool_slot
    with pytest.raises(AhnError, match="in use"):           # the pool is full: fork says so
        a.fork()
    a.save(tmp_path / "a.safetensors")
    r = model.restore(tmp_path / "a.safetensors")
    for t in (7, 8, 9):
        want = a.forward([t])
        assert torch.equal(f.forward([t]), want) and torch.equal(r.forward([t]), want)


def test_bad_pools_are_one_line():
    with pytest.raises(AhnError, match="full mode grows each sequence's cache"):
        _model(mode="full").new_pool(2)
    model, other = _model(), _model()
    for size in (0, -1, 1.5, True):
        with pytest.raises(AhnError, match="positive integer size"):
            model.new_pool(size)
    with pytest.raises(AhnError, match="belongs to another model"):
        model.new_session(pool=other.new_pool(1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("impl", ["gdn", "dn", "mamba2"])
def test_pooled_sessions_on_cuda_equal_private_ones(impl):
    """bf16 on the GPU: prefill, the captured-graph decode steps and model.step of pooled sessions equal a
    private session's bit for bit, and the neighbours' slots stay untouched."""
    model = _model(impl, dtype="bf16", device="cuda")
    pool = model.new_pool(3)
    other = model.new_session(pool=pool)
    other.forward(_ids(11, seed=4))
    mine, alone = model.new_session(pool=pool), model.new_session()
    before = {k: v.cpu() for k, v in _other_slots(pool, mine.state.pool_slot).items()}
    prompt = _ids(3 * (S + W) + 1, seed=9)
    assert torch.equal(mine.forward(prompt), alone.forward(prompt))
    greedy = SamplingParams(temperature=0)
    sa, sb = (m.stepper(Sampler(greedy, V, model.device)) for m in (mine, alone))
    ta = tb = torch.tensor([3], device="cuda")
    for _ in range(6):                                      # eager first step, then graph replays
        ta, tb = sa(ta), sb(tb)
        assert torch.equal(sa.logits, sb.logits) and int(ta) == int(tb)
    assert torch.equal(model.step([mine], [5]), alone.forward([5]))
    after = {k: v.cpu() for k, v in _other_slots(pool, mine.state.pool_slot).items()}
    assert _same(after, before), "a pooled session wrote outside its slot"


def test_ctrl_c_while_a_pooled_session_is_made_or_closed_keeps_every_slot(monkeypatch):
    """Ctrl-C (KeyboardInterrupt) between taking a slot and the session owning it gave the slot to nobody:
    the pool lost it for good; Ctrl-C between giving the slot back and dropping the state left an open
    session on a free slot, which the next session took (two sessions writing one slot)."""
    import weakref

    import ahn_rt.cache as cache
    model = _model()
    pool = model.new_pool(2)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    for target, name in ((cache.State, "reset"), (weakref, "finalize")):
        with monkeypatch.context() as m:
            m.setattr(target, name, interrupted)
            with pytest.raises(KeyboardInterrupt):
                model.new_session(pool=pool)
        gc.collect()
        assert pool.free == 2, f"Ctrl-C in {name} lost a slot"
    s = model.new_session(pool=pool)

    class InterruptedOnceFreed(list):   # Ctrl-C lands in release, once the slot is free
        def sort(self, *a, **k):
            super().sort(*a, **k)
            raise KeyboardInterrupt
    free = pool._free
    pool._free = InterruptedOnceFreed(free)
    with pytest.raises(KeyboardInterrupt):
        s.close()
    pool._free = list(pool._free)
    assert s.closed and pool.free == 2
    t = model.new_session(pool=pool)
    with pytest.raises(AhnError, match="session is closed"):
        s.forward([1])
    assert torch.equal(t.forward([5, 6]), model.new_session().forward([5, 6]))


def test_a_session_whose_slot_was_released_refuses_and_its_close_frees_nothing():
    """pool.release(slot) of a live session's slot (StatePool's documented method) left the session open on a
    free slot: the next session took the slot and both wrote it, and the first one's close() then freed the
    second one's slot (pool.free 2 with one session left; a third session then shared it too), or raised a
    raw ValueError when nobody had taken it."""
    model = _model()
    pool = model.new_pool(2)
    s = model.new_session(pool=pool)
    s.forward(_ids(5, seed=1))
    pool.release(s.state.pool_slot)
    t = model.new_session(pool=pool)
    assert t.state.pool_slot == s.state.pool_slot
    for call in (lambda: s.forward([1]), lambda: model.step([s], [1]), lambda: s.fork(), lambda: s.reset(),
                 lambda: model.prefill([1, 2], session=s), lambda: model.generate([1, 2], session=s)):
        with pytest.raises(AhnError, match=r"pool slot was given back with pool.release\(\).*close\(\) it"):
            call()
    s.close()
    assert s.closed and pool.free == 1                      # t keeps its slot
    u = model.new_session(pool=pool)
    assert u.state.pool_slot != t.state.pool_slot
    want = model.new_session().forward([5, 6])
    assert torch.equal(t.forward([5, 6]), want) and torch.equal(u.forward([5, 6]), want)
    for bad in (t.state.pool_slot + 5, -1, "0", None):      # not a slot in use: one line, not a raw ValueError
        with pytest.raises(AhnError, match="is not in use"):
            pool.release(bad)
    small = model.new_pool(1)
    v = model.new_session(pool=small)
    small.release(v.state.pool_slot)
    w = model.new_session(pool=small)
    del v                                                   # dropped: does not free w's slot
    gc.collect()
    assert small.free == 0 and not w.closed
    with pytest.raises(AhnError, match="all 1 slots"):
        model.new_session(pool=small)


def test_release_takes_a_slot_of_any_integer_type():
    """release(slot) takes what the API's other integer arguments take (numpy's integers too): a slot read
    from an array was refused as "not in use", though it was."""
    np = pytest.importorskip("numpy")
    model = _model()
    pool = model.new_pool(2)
    s = model.new_session(pool=pool)
    slot = np.int64(s.state.pool_slot)
    pool.release(slot)
    assert pool.free == 2 and not pool.holds(s.state)
    with pytest.raises(AhnError, match="is not in use"):
        pool.release(slot)                                  # free now
    for bad in (True, 0.0):
        with pytest.raises(AhnError, match="is not in use"):
            pool.release(bad)
