"""The State is the one owner of the decode state: its slot formula against the kernels' (C++ CPU, CUDA)
and the reference's ring writes, the positions each slot holds, the chunk plan's writes and evictions,
the position on host and device, and the documented way to stand a state at any depth."""
import pytest
import torch

from ahn_rt import ops, ref
from ahn_rt.cache import State, ring_slot, ring_spans
from ahn_rt.config import Config
from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict

# Exact checks only (slots, positions, equal tensors): no tolerances in this file.

CASES = [(0, 1), (0, 5), (1, 1), (3, 4), (2, 7), (5, 3)]   # (S, W): S = 0, W = 1, S > W, ...


def _config(S, W, mode="ahn", H=4, Hkv=2, D=8, L=1):
    return Config(family="qwen2", vocab_size=32, hidden_size=H * D, intermediate_size=16, num_layers=L,
                  num_heads=H, num_kv_heads=Hkv, head_dim=D, rope_theta=10000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, attention_bias=True, qk_norm=False, max_position_embeddings=4096,
                  stored_dtype=torch.float32, eos_token_ids=(), ahn_implementation="GatedDeltaNet",
                  window=W, sinks=S, mode=mode, dtype=torch.float32)


def _simulate(S, W, P):
    """Which position each slot holds after P tokens, by replaying the writes one by one."""
    held = {}
    for p in range(P):
        held[ring_slot(p, S, W)] = p
    return [held[s] for s in range(len(held))]


@pytest.mark.parametrize("S,W", CASES)
def test_slot_formula_and_held_positions(S, W):
    st = State(_config(S, W), "cpu")
    for P in range(0, 3 * (S + W) + 3):
        assert st.held_positions().tolist() == _simulate(S, W, P), P
        p = torch.tensor([P])
        assert int(st.slot(p)) == ring_slot(P, S, W)
        st.advance(1)
        assert int(st.pos) == st.position == P + 1


def _kernel_writes(fn, S, W, device):
    """Positions 0..N written one by one through decode_prep: the slot that changes is where it wrote."""
    H, Hkv, D = 2, 1, 4
    C = S + W
    kc = torch.zeros(Hkv, C, D, device=device)
    vc, bc, ac = torch.zeros_like(kc), torch.zeros(C, H, device=device), torch.zeros(C, H, device=device)
    ke, ve, be, ae = torch.zeros(Hkv, D, device=device), torch.zeros(Hkv, D, device=device), \
        torch.zeros(H, device=device), torch.zeros(H, device=device)
    inv_freq = torch.zeros(D // 2, device=device)          # angle 0: RoPE is the identity
    slots, evicted = [], []
    for p in range(3 * C + 2):
        proj = torch.zeros(H * D + 2 * Hkv * D + 3 * H, device=device)
        proj[H * D: H * D + Hkv * D] = p + 1                # k = p + 1 everywhere
        before = kc.clone()
        fn(proj=proj, inv_freq=inv_freq, pos=torch.tensor([p], device=device), q_norm=None, k_norm=None,
           norm_eps=1e-6, a_log=torch.zeros(H, device=device), dt_bias=torch.zeros(H, device=device),
           k_cache=kc, v_cache=vc, beta_cache=bc, alpha_cache=ac, sinks=S, window=W, k_evict=ke,
           v_evict=ve, beta_evict=be, alpha_evict=ae)
        changed = (kc != before).any(-1).any(0).nonzero().flatten().tolist()
        slot = int((kc[0, :, 0] == p + 1).nonzero().flatten()[0])
        assert changed in ([slot], []), (p, changed)
        slots.append(slot)
        evicted.append(int(ke[0, 0]) - 1 if p >= S + W else None)   # the token handed to the memory
    return slots, evicted


def _expected(S, W):
    C = S + W
    return ([ring_slot(p, S, W) for p in range(3 * C + 2)],
            [p - W if p >= S + W else None for p in range(3 * C + 2)])


@pytest.mark.parametrize("S,W", CASES)
@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_kernels_write_the_slot_the_state_names(S, W, impl):
    """The Python formula (State.slot / ring_slot) against the reference and the C++ kernel (common.h's
    ring_slot), across the fill point: same slot, and the token handed to the memory is p - W."""
    if impl == "cpu" and not ops.ext_available():
        pytest.skip("extension not built")
    fn = ref.decode_prep_ref if impl == "ref" else torch.ops.ahn_rt.decode_prep
    assert _kernel_writes(fn, S, W, "cpu") == _expected(S, W)


@pytest.mark.cuda
@pytest.mark.parametrize("S,W", CASES)
def test_cuda_kernel_writes_the_slot_the_state_names(S, W):
    assert _kernel_writes(torch.ops.ahn_rt.decode_prep, S, W, "cuda") == _expected(S, W)


@pytest.mark.parametrize("S,W", CASES)
@pytest.mark.parametrize("chunks", [[1] * 20, [7, 13], [20], [3, 1, 9, 7]])
def test_chunk_plan(S, W, chunks):
    """Evicted tokens are exactly t - W for every reading row t >= S + W, in order; writes land in the
    slot the formula names."""
    st = State(_config(S, W), "cpu")
    for T in chunks:
        p0 = st.position
        plan = st.plan(T)
        assert plan.positions.tolist() == list(range(p0, p0 + T))
        held = st.held_positions()
        reads = plan.positions[plan.read_rows].tolist()
        assert reads == [t for t in range(p0, p0 + T) if t >= S + W]
        evicted = held[plan.evict_slots].tolist() + plan.positions[list(plan.evict_rows)].tolist()
        assert evicted == [t - W for t in reads]
        kept = plan.positions[plan.write_rows].tolist()
        assert kept == [t for t in range(p0, p0 + T) if t < S or t >= p0 + T - W]
        assert plan.write_slots == [ring_slot(t, S, W) for t in kept]
        assert len(plan.writes) <= 3 and len(plan.evict_cache) <= 2
        # in order: every position to its own slot, nothing evicted (the writes may precede the attention)
        assert plan.in_order == (p0 + T <= S + W)
        if plan.in_order:
            assert plan.write_slots == list(range(p0, p0 + T)) and plan.n_evict == 0
        st.advance(T)


def test_ring_spans_runs_and_misuse():
    assert ring_spans(10, 5, 4, 8) == [(0, 10, 2), (2, 4, 3)]     # positions 10..14: slots 10, 11 | 4, 5, 6
    assert ring_spans(1, 2, 4, 8) == [(0, 1, 2)]                  # sinks
    assert ring_spans(7, 0, 4, 8) == []
    with pytest.raises(ValueError, match="neither all sinks"):
        ring_spans(3, 3, 4, 1)      # crosses the sinks' end
    with pytest.raises(ValueError, match="neither all sinks"):
        ring_spans(4, 9, 4, 8)      # more than one window of ring positions


def test_evicted_with_nothing_handed_over():
    st = State(_config(2, 4), "cpu")
    plan = st.plan(3)
    k = torch.randn(3, 2, 8)
    k_ev, v_ev, g_ev = st.evicted(0, plan, k, k, {n: torch.randn(3, 4) for n in st.gates})
    assert plan.n_evict == 0 and k_ev.shape == (0, 2, 8) and all(g.shape == (0, 4) for g in g_ev.values())


@pytest.mark.parametrize("chunks", [[100, 200, 7], [300], [1] * 5 + [600]])
def test_chunk_plan_full_mode(chunks):
    """Full attention: nothing is evicted, every token is written at its own position, as one run of slots,
    also when the chunk makes the cache grow."""
    st = State(_config(0, 1, mode="full"), "cpu")
    for T in chunks:
        p0 = st.position
        plan = st.plan(T)
        assert st.capacity >= p0 + T
        assert plan.n_evict == 0 and plan.evict_cache == [] and len(plan.evict_rows) == 0
        assert plan.writes == [(0, p0, T)] and plan.in_order
        st.advance(T)


@pytest.mark.parametrize("S,W", CASES + [(4, 16), (0, 5), (3, 1)])
@pytest.mark.parametrize("chunks", [[1] * 12, [7, 13], [25], [3, 1, 9, 7, 30]])
def test_key_ranges_cover_every_key_once(S, W, chunks):
    """The ranges a chunk attends are the occupied slots and the chunk rows, each exactly once, each
    range consecutive in position with the positions the slots hold, and sink ranges hold exactly the
    positions below S."""
    st = State(_config(S, W), "cpu")
    for T in chunks:
        p0 = st.position
        held = st.held_positions().tolist()
        seen_slots, seen_rows = [], []
        for r in st.key_ranges(T):
            if r.source == "cache":
                pos = [held[s] for s in range(r.lo, r.lo + r.n)]
                seen_slots += range(r.lo, r.lo + r.n)
            else:
                pos = [p0 + i for i in range(r.lo, r.lo + r.n)]
                seen_rows += range(r.lo, r.lo + r.n)
            assert pos == list(range(r.pos, r.pos + r.n))
            assert all((p < S) == r.sink for p in pos)
        assert sorted(seen_slots) == list(range(len(held))) and len(set(seen_slots)) == len(seen_slots)
        assert sorted(seen_rows) == list(range(T)) and len(set(seen_rows)) == len(seen_rows)
        st.advance(T)


def test_swa_plan_never_evicts():
    st = State(_config(2, 3, mode="swa"), "cpu")
    st.advance(10)
    assert st.plan(9).n_evict == 0 and st.memory is None


def test_fill_random_stands_a_state_at_depth():
    cfg = preset_config("tiny", True, torch.float32)
    cfg["vocab_size"] = 64
    model = from_state_dict(cfg, random_state_dict(cfg, ahn=True, dtype=torch.float32), window=6, sinks=2,
                            mode="ahn", dtype="float32", device="cpu")
    sess = model.new_session()
    st = sess.state
    st.fill_random(50, torch.Generator().manual_seed(0))
    assert st.position == int(st.pos) == 50
    assert st.k.abs().sum(-1).ne(0).all() and st.memory.abs().sum() > 0
    again = model.new_session().state
    again.fill_random(50, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(st.tensors().values(), again.tensors().values()))
    assert torch.isfinite(sess.forward([1, 2, 3])).all() and sess.position == 53
    shallow = model.new_session().state
    shallow.fill_random(3)
    assert shallow.memory.abs().sum() == 0 and shallow.k[:, :, 3:].abs().sum() == 0


def test_full_mode_capacity_and_growth():
    cfg = preset_config("tiny", False, torch.float32)
    cfg["vocab_size"] = 64
    model = from_state_dict(cfg, random_state_dict(cfg, ahn=False, dtype=torch.float32), mode="full",
                            dtype="float32", device="cpu")
    sess = model.new_session(capacity=1000)
    assert sess.state.capacity == 1000
    sess.state.fill_random(999)
    buf = sess.state.k
    sess.forward([5])
    assert sess.state.k is buf and sess.position == 1000
    sess.forward([6])                                 # grows: the buffers move, the contents stay
    assert sess.state.capacity == 2000 and sess.state.k is not buf
    assert torch.equal(sess.state.k[:, :, :1000], buf)


def test_grown_full_cache_can_be_reset_and_reused_outside_inference_mode():
    """A full-mode cache grown inside a forward (inference mode) is reset, saved, forked and reused by
    plain code; generate() reuses such a session through reset()."""
    cfg = preset_config("tiny", False, torch.float32)
    cfg["vocab_size"] = 64
    model = from_state_dict(cfg, random_state_dict(cfg, ahn=False, dtype=torch.float32), mode="full",
                            dtype="float32", device="cpu")
    sess = model.new_session()
    first = sess.forward(list(range(1, 60)) * 5)          # 295 tokens: grows 256 -> 512
    assert sess.state.capacity == 512
    other = sess.fork()
    sess.reset()
    assert sess.position == 0 and int(sess.state.pos) == 0
    assert torch.equal(sess.forward(list(range(1, 60)) * 5), first)
    assert other.position == 295


def test_fill_random_refuses_a_negative_depth():
    from ahn_rt import AhnError
    st = State(_config(2, 4), "cpu")
    for bad in (-1, -100, 2.5, True, "3"):
        with pytest.raises(AhnError, match="integer >= 0"):
            st.fill_random(bad)
        assert st.position == int(st.pos) == 0            # untouched
    st.fill_random(torch.tensor(7).item())
    assert st.position == 7


def test_a_cpu_state_beyond_the_free_memory_is_refused_before_it_is_allocated(monkeypatch):
    """On the CPU an allocation larger than the machine's memory succeeds (overcommit) and zeroing it gets the
    process killed without a word: a state of more than 1 GiB is checked against the free memory first (RAM +
    swap) and refused in one line, with nothing allocated; one that fits is allocated as before."""
    from ahn_rt import AhnError, devices
    cfg = _config(2, 2 ** 23)                              # about 1.4 GiB of ring and gates
    asked = []

    def free(device, swap=False):
        asked.append((torch.device(device).type, swap))
        return 1 << 30

    monkeypatch.setattr(devices, "free_bytes", free)
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: pytest.fail("allocated before the check"))
    with pytest.raises(AhnError, match=r"cannot allocate the state on cpu: .* GiB needed .*lower the window") as e:
        State(cfg, "cpu")
    assert "\n" not in str(e.value) and asked == [("cpu", True)]
    monkeypatch.undo()
    monkeypatch.setattr(devices, "free_bytes", lambda device, swap=False: asked.append("small") or 0)
    State(_config(2, 4), "cpu")                            # under 1 GiB: not asked, allocated
    assert asked == [("cpu", True)]


@pytest.mark.parametrize("cgroup,want,want_swap", [
    ({}, 8, 10),                                                                  # no cgroup files: the machine's
    ({"/sys/fs/cgroup/memory.max": "max", "/sys/fs/cgroup/memory.current": "5"}, 8, 10),   # v2, no limit
    ({"/sys/fs/cgroup/memory.max": str(4 << 30), "/sys/fs/cgroup/memory.current": str(1 << 30)}, 3, 3),
    ({"/sys/fs/cgroup/memory/memory.limit_in_bytes": str(2 ** 63 - 4096),            # v1, "no limit"
      "/sys/fs/cgroup/memory/memory.usage_in_bytes": "7"}, 8, 10),
    ({"/sys/fs/cgroup/memory/memory.limit_in_bytes": str(9 << 30),
      "/sys/fs/cgroup/memory/memory.usage_in_bytes": str(0)}, 8, 9),
], ids=["none", "v2-max", "v2-limit", "v1-unlimited", "v1-limit"])
def test_free_bytes_reads_the_machine_and_the_containers_limit(monkeypatch, cgroup, want, want_swap):
    """The CPU's free memory: MemAvailable (+ SwapFree with swap=True), capped by a memory cgroup's room (a
    container's /proc/meminfo shows the host's memory)."""
    import io
    from ahn_rt import devices
    files = {"/proc/meminfo": f"MemTotal: 99 kB\nMemAvailable:    {8 << 20} kB\nSwapFree: {2 << 20} kB\n\n",
             **cgroup}

    def fake_open(path, *a, **k):
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    monkeypatch.setattr(devices, "open", fake_open, raising=False)
    assert devices.free_bytes("cpu") == want << 30
    assert devices.free_bytes("cpu", swap=True) == want_swap << 30


def test_a_state_that_does_not_fit_is_one_line_naming_the_size():
    from ahn_rt import AhnError
    from ahn_rt.cache import StatePool
    for W in (10 ** 11, 10 ** 21):                         # beyond the allocator; beyond what torch can size
        with pytest.raises(AhnError, match=r"cannot allocate the state on cpu: .* TiB needed .*lower the window") as e:
            State(_config(2, W), "cpu")
        assert "\n" not in str(e.value) and f"window {W}" in str(e.value)
    with pytest.raises(AhnError, match=r"lower the sinks \(--sinks, load\(sinks=\)\)"):
        State(_config(10 ** 11, 4), "cpu")
    with pytest.raises(AhnError, match=r"cannot allocate 3 states .*--max-sessions"):
        StatePool(_config(2, 10 ** 11), "cpu", 3)
    st = State(_config(0, 4, mode="full"), "cpu")
    with pytest.raises(AhnError, match="full attention keeps every token"), \
            pytest.warns(UserWarning, match="past max_position_embeddings"):   # the usual warning comes first
        st.ensure_capacity(10 ** 17)
    assert st.capacity == 256 and st.k.shape[2] == 256    # unchanged, still usable
