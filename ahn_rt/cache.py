"""The per-sequence state and its one owner, ``State``: the layout, every write, every eviction and the
position (docs/semantics.md §7).

For every layer: keys and values ``[Hkv, C, D]`` (post-RoPE) in C = sinks + window slots — slots
``[0, S)`` hold the sink tokens, slots ``[S, S + W)`` a ring buffer where position ``p >= S`` lives in slot
``S + (p - S) % W`` (so positions below S + W sit in slot p); the AHN memory's per-slot gates ``[C, H]``,
computed when the token was first processed, one field per ``Memory.gate_fields`` (GatedDeltaNet and
DeltaNet: ``beta`` in the model dtype and ``alpha``, the float32 log-decay; Mamba2: ``dt``, float32); the
memory ``Memory.state_shape`` (``[H, Dk, Dv]``) float32. All layers live in one layer-stacked tensor per
field. In ``ahn``/``swa`` modes the state never grows: it is allocated once, either as one slot of a
``StatePool`` (the states of many sequences as one set of tensors, ``[L, N, ...]`` per field, which
steps that batch sequences index by pool slot) or as a private one-slot storage of the same layout
(``allocate``). In ``full`` mode the cache is a private growing buffer (sinks 0, window = capacity,
doubling when needed), i.e. plain causal attention; it has no pool.

What the rest of the code asks the State (and never computes itself):
* ``slot(positions)`` — the one slot formula (the kernels' ``ring_slot`` in csrc/common.h is tested
  against it);
* ``held_positions()`` — which position each occupied slot holds;
* ``plan(T)`` — for a chunk of T tokens: the positions, which of its tokens are written to which slots,
  and which tokens it hands to the memory (``ChunkPlan``);
* ``key_ranges(T)`` — the keys a chunk attends, as ranges of the cache read in place plus the chunk's own;
* ``evicted`` / ``write`` — the tokens (and gates) a chunk hands to the memory, and the chunk's ring
  writes;
* ``advance(n)`` — the position, on the host and on the device; the eager path and the CUDA graph path
  both call it after a step;
* ``fill_random(position)`` — a documented way to stand a state at any depth (benchmarks);
* ``tensors()`` — the fields that make up the state (for size, reset, copies).

Every method that writes the state runs under ``torch.inference_mode`` (buffers that a full-mode cache
grows during a forward are inference tensors, which may only be written in that mode).

The position lives twice: ``position`` on the host and ``pos`` (int64 [1]) on the device, which the
decode kernels read, so one captured CUDA graph serves every step. ``advance`` keeps them equal.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import threading
import warnings

import torch

from . import devices
from .config import Config
from .errors import AhnError, as_int, int_arg

FULL_MIN_CAPACITY = 256


def ring_slot(pos: int, sinks: int, window: int) -> int:
    """Slot of absolute position ``pos`` (an int) in the sinks + ring cache; ``State.slot`` is the same
    formula over tensors, ``ring_slot`` in csrc/common.h the kernels' copy."""
    return pos if pos < sinks else sinks + (pos - sinks) % window


def held_positions(position: int, sinks: int, window: int, device=None) -> torch.Tensor:
    """int64 [min(position, sinks + window)]: the absolute position each occupied slot holds after
    ``position`` tokens (the inverse of ``ring_slot`` over the occupied slots)."""
    S, W = sinks, window
    slots = torch.arange(min(position, S + W), dtype=torch.int64, device=device)
    if position <= S + W:
        return slots
    last = position - 1
    ring = last - torch.remainder(last - S - (slots - S), W)
    return torch.where(slots < S, slots, ring)


@dataclasses.dataclass(frozen=True)
class KeyRange:
    """Keys that a chunk attends which are consecutive both in memory and in position.

    source: "cache" (slots ``[lo, lo + n)`` of the ring cache, as it is before the chunk's writes) or
    "chunk" (rows ``[lo, lo + n)`` of the chunk's own keys); pos: the position of the first key; sink: the
    keys are sinks, which every later query sees whatever the window.
    """
    source: str
    lo: int
    n: int
    pos: int
    sink: bool


def key_ranges(p0: int, T: int, sinks: int, window: int) -> list[KeyRange]:
    """Every key a chunk of T tokens at positions ``[p0, p0 + T)`` may attend, as at most five ranges in
    position order: the cached sinks, the ring (one range, or two where it wraps), the chunk's sink rows
    and the rest of the chunk. The attention reads the cache in place through these (no copy); which
    query sees which key of a range is the sinks + window rule (docs/semantics.md §2)."""
    S, W = sinks, window
    out = []
    occupied = min(p0, S + W)
    if min(occupied, S):
        out.append(KeyRange("cache", 0, min(occupied, S), 0, True))
    if p0 > S:
        if p0 <= S + W:                        # not wrapped yet: slot == position
            out.append(KeyRange("cache", S, p0 - S, S, False))
        else:                                  # the ring holds positions [p0 - W, p0), oldest at s0
            s0 = ring_slot(p0 - W, S, W)
            out.append(KeyRange("cache", s0, S + W - s0, p0 - W, False))
            if s0 > S:
                out.append(KeyRange("cache", S, s0 - S, p0 - W + S + W - s0, False))
    chunk_sinks = max(0, min(S, p0 + T) - p0)
    if chunk_sinks:
        out.append(KeyRange("chunk", 0, chunk_sinks, p0, True))
    if T > chunk_sinks:
        out.append(KeyRange("chunk", chunk_sinks, T - chunk_sinks, p0 + chunk_sinks, False))
    return out


def ring_spans(p: int, n: int, sinks: int, window: int) -> list[tuple[int, int, int]]:
    """Positions [p, p + n) (all sinks, or all ring positions and n <= window) as runs of consecutive slots:
    [(offset, slot, length)], the run's first position being p + offset. At most two runs (the ring wraps
    once)."""
    if n > 0 and not (p + n <= sinks or (p >= sinks and n <= window)):
        raise ValueError(f"ring_spans: positions [{p}, {p + n}) are neither all sinks nor at most one window "
                         f"of ring positions (sinks {sinks}, window {window})")
    out, off = [], 0
    while off < n:
        s = ring_slot(p + off, sinks, window)
        m = n - off if p + off < sinks else min(n - off, sinks + window - s)
        out.append((off, s, m))
        off += m
    return out


@dataclasses.dataclass
class ChunkPlan:
    """What a chunk of ``T`` tokens at positions ``[p0, p0 + T)`` does to the state (docs/semantics.md §3).
    Every set of rows and slots is a few runs of consecutive ones, so the cache is read and written by
    slices (views and block copies), never by index tensors.

    positions:   int64 [T], the chunk's absolute positions.
    writes:      [(row, slot, n)]: chunk rows [row, row + n) go to slots [slot, slot + n) (the rows still in
                 the cache after the chunk: the sinks and the last W; at most three runs).
    evict_cache: [(slot, n)]: the cache slots of the cached tokens the chunk hands to the memory, in order
                 (at most two runs),
    evict_rows:  range: then the chunk rows it hands over (tokens that enter and leave the window inside
                 the chunk). Pair i (of n = cached + rows) is read by chunk row ``T - n + i`` (the last n).
    in_order:    the chunk fills the cache in order (p0 + T <= S + W): position p goes to slot p and no token
                 leaves, so its writes may come before its attention, which then finds every key it attends
                 in slots [0, p0 + T) (``model.prefill``, ``ops.prefill_attention``'s ``cached``).
    """
    p0: int
    T: int
    positions: torch.Tensor
    writes: list[tuple[int, int, int]]
    evict_cache: list[tuple[int, int]]
    evict_rows: range
    in_order: bool = False

    @property
    def n_evict(self) -> int:
        return sum(n for _, n in self.evict_cache) + len(self.evict_rows)

    @property
    def read_rows(self) -> slice:
        """The chunk rows that read the memory (after writing their pair's evicted token)."""
        return slice(self.T - self.n_evict, self.T)

    # The same sets as flat index lists (tests and debugging).
    @property
    def write_rows(self) -> list[int]:
        return [r + i for r, _, n in self.writes for i in range(n)]

    @property
    def write_slots(self) -> list[int]:
        return [s + i for _, s, n in self.writes for i in range(n)]

    @property
    def evict_slots(self) -> list[int]:
        return [s + i for s, n in self.evict_cache for i in range(n)]


def allocate(config: Config, device, n: int, capacity: int) -> dict[str, torch.Tensor]:
    """Zeroed storage for ``n`` states of ``config`` with ``capacity`` cache slots each, as one tensor per
    field with the pool-slot axis second for the layer-stacked fields (layer i of every sequence is one
    block ``[n, ...]``, each sequence's part of it contiguous):

    k, v              [L, n, Hkv, C, D]   model dtype
    gate.<name>       [L, n, C, H]        per ``Memory.gate_fields`` (ahn mode)
    memory            [L, n, *Memory.state_shape]  float32 (ahn mode)
    pos               [n]                 int64, each sequence's position on the device
    k_evict, v_evict  [n, Hkv, D]         scratch: the token a decode step hands to the memory
    gate_evict.<name> [n, H]              scratch: its gates (ahn mode)
    """
    c = config
    L, Hkv, D, H = c.num_layers, c.num_kv_heads, c.head_dim, c.num_heads
    fields = {"k": ((L, n, Hkv, capacity, D), c.dtype), "v": ((L, n, Hkv, capacity, D), c.dtype)}
    if c.mode == "ahn":
        from . import memory
        mem = memory.get(c.ahn_implementation)
        for name, f in mem.gate_fields(c).items():
            dt = torch.float32 if f.float32 else c.dtype
            fields["gate." + name] = ((L, n, capacity, H), dt)
            fields["gate_evict." + name] = ((n, H), dt)
        fields["memory"] = ((L, n, *mem.state_shape(c)), torch.float32)
    fields["pos"] = ((n,), torch.int64)
    fields["k_evict"] = ((n, Hkv, D), c.dtype)
    fields["v_evict"] = ((n, Hkv, D), c.dtype)
    return zeros(fields, c, device, n, capacity)


def zeros(fields: dict, c: Config, device, n: int, capacity: int) -> dict[str, torch.Tensor]:
    """name -> (shape, dtype) -> zeroed tensors on ``device``; memory that is not there (more than the
    device has, or more than torch can size) is an AhnError saying how much was needed and what to lower,
    raised before anything is kept."""
    need = sum(math.prod(shape) * dt.itemsize for shape, dt in fields.values())
    device = torch.device(device)
    # on the CPU an allocation beyond the machine's memory succeeds (overcommit) and zeroing it is killed
    free = devices.free_bytes(device, swap=True) if device.type == "cpu" and need > 1 << 30 else None
    if need < 2 ** 62 and (free is None or need <= free):   # 2**62: beyond any machine, and what torch can size
        try:
            return {name: torch.zeros(shape, dtype=dt, device=device) for name, (shape, dt) in fields.items()}
        except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is one; the CPU allocator raises it plain
            if not isinstance(e, torch.OutOfMemoryError) and "memory" not in str(e).lower():
                raise
    raise AhnError(_allocation_failure(c, device, n, capacity, need))


def _allocation_failure(c: Config, device, n: int, capacity: int, need: int) -> str:
    """The one line a state allocation that does not fit says: how much it needed and what to lower."""
    from .runtime import human_bytes
    what = f"{n} states" if n > 1 else "the state"
    if c.mode == "full":
        slots = f"{capacity} cache slots (full attention keeps every token)"
        hint = "use a shorter prompt, or mode ahn or swa (a fixed window)"
    else:
        slots = f"sinks {c.sinks} + window {c.window} = {capacity} cache slots"
        # (the command lines' flag and the API's argument: the same message serves both)
        hint = ("lower the window (--window, load(window=))" if c.window >= c.sinks
                else "lower the sinks (--sinks, load(sinks=))") + (
            " or the sessions at once (--max-sessions, new_pool(size))" if n > 1 else "")
    return (f"cannot allocate {what} on {device}: {human_bytes(need)} needed for {slots} x {c.num_layers} "
            f"layers; {hint}")


class State:
    """One sequence's state: views of entry ``pool_slot`` of a storage that ``allocate`` made — a
    ``StatePool``'s shared one, or a private one-entry storage when ``pool`` is None. Every field is a
    view (``k`` = ``storage["k"][:, pool_slot]``, ...), so layer i's ``k[i]`` is contiguous and stays at
    one address for the state's life (what a captured CUDA graph needs), except in full mode, whose cache
    grows: ``layout`` counts its moves, and a graph captured at another count is stale."""

    def __init__(self, config: Config, device, capacity: int | None = None, *, pool: "StatePool | None" = None,
                 pool_slot: int = 0):
        self.config = config
        self.device = torch.device(device)
        c = config
        self.full = c.mode == "full"
        if self.full:
            self.sinks = 0
            self.capacity = max(FULL_MIN_CAPACITY, capacity or 0)
            self.window = self.capacity
        else:
            self.sinks, self.window = c.sinks, c.window
            self.capacity = c.sinks + c.window
        self.ahn = c.mode == "ahn"
        self.layout = 0   # bumped each time the buffers move (full mode's growth, whoever asks for it)
        self.pool, self.pool_slot = pool, pool_slot
        store = pool.storage if pool is not None else allocate(c, self.device, 1, self.capacity)
        i = pool_slot
        self.k, self.v = store["k"][:, i], store["v"][:, i]
        # The memory's per-slot gates (name -> [L, C, H]) and its state (ahn mode only).
        self.gates: dict[str, torch.Tensor] = {}
        self.gate_evict: dict[str, torch.Tensor] = {}
        self.gate_fields = {}
        self.memory = None
        if self.ahn:
            from . import memory
            self.gate_fields = memory.get(c.ahn_implementation).gate_fields(c)
            for name in self.gate_fields:
                self.gates[name] = store["gate." + name][:, i]
                # Scratch (not state): the gates of the token handed from the ring to the memory.
                self.gate_evict[name] = store["gate_evict." + name][i]
            self.memory = store["memory"][:, i]
        # Scratch (not state): the token handed from the ring to the memory during one decode step.
        self.k_evict, self.v_evict = store["k_evict"][i], store["v_evict"][i]
        self.pos = store["pos"][i: i + 1]
        self.position = 0
        self.torn = False   # a call's writes began (begin_writes) and it never advanced: see begin_writes
        self._warned_positions = False

    # ---- layout ------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that make up the state (without scratch), by name."""
        out = {"k": self.k, "v": self.v, **self.gates}
        if self.ahn:
            out["memory"] = self.memory
        return out

    def slot(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot of each absolute position (int64 tensor): ``ring_slot`` over a tensor."""
        S, W = self.sinks, self.window
        return torch.where(positions < S, positions, S + (positions - S) % W)

    @property
    def occupied(self) -> int:
        """Slots [0, occupied) hold tokens."""
        return min(self.position, self.capacity)

    def held_positions(self) -> torch.Tensor:
        """int64 [occupied]: the absolute position held by each occupied slot."""
        return held_positions(self.position, self.sinks, self.window, self.device)

    # ---- a chunk of tokens -------------------------------------------------------------------
    def plan(self, T: int) -> ChunkPlan:
        """The writes and evictions of a chunk of T tokens at the current position (grows a full-mode
        cache first when needed)."""
        self.ensure_capacity(self.position + T)
        p0, S, W = self.position, self.sinks, self.window
        pos = torch.arange(p0, p0 + T, dtype=torch.int64, device=self.device)
        # Memory pairs (docs/semantics.md §3): query t in [t0, p0 + T) reads after writing token t - W.
        t0 = max(p0, S + W)
        n_ev = max(0, p0 + T - t0) if self.ahn else 0
        first, end = t0 - W, t0 - W + n_ev            # positions handed to the memory: [first, end)
        cached_end = max(first, min(end, p0))
        evict_cache = [(s, n) for _, s, n in ring_spans(first, cached_end - first, S, W)]
        # Ring writes: the chunk's tokens that are still a sink or inside the window afterwards.
        n_sink = max(0, min(S, p0 + T) - p0)
        r1 = max(n_sink, T - W)
        writes = [(r, s, n) for r, s, n in ring_spans(p0, n_sink, S, W)]
        writes += [(r1 + r, s, n) for r, s, n in ring_spans(p0 + r1, T - r1, S, W)]
        return ChunkPlan(p0=p0, T=T, positions=pos, writes=writes, evict_cache=evict_cache,
                         evict_rows=range(cached_end - p0, end - p0), in_order=p0 + T <= S + W)

    def key_ranges(self, T: int) -> list[KeyRange]:
        """The keys a chunk of T tokens at the current position attends (``key_ranges``)."""
        return key_ranges(self.position, T, self.sinks, self.window)

    def evicted(self, layer: int, plan: ChunkPlan, k: torch.Tensor, v: torch.Tensor,
                gates: dict[str, torch.Tensor]):
        """The tokens the chunk hands to the memory of one layer, in order: from the cache (before the
        chunk's writes) and from the chunk's own k, v [T, Hkv, D] and gates {field: [T, H]}.
        Returns (k [n, Hkv, D], v [n, Hkv, D], {field: [n, H]}): views of the cache or the chunk where the
        tokens are one run (the usual case), else a copy. Use them before ``write``."""
        r = plan.evict_rows
        parts = [(self.k[layer][:, s:s + n].transpose(0, 1), self.v[layer][:, s:s + n].transpose(0, 1),
                  {name: buf[layer][s:s + n] for name, buf in self.gates.items()}) for s, n in plan.evict_cache]
        if len(r):
            parts.append((k[r.start:r.stop], v[r.start:r.stop], {name: g[r.start:r.stop] for name, g in gates.items()}))
        if not parts:   # nothing handed over: empty rows of the right shapes
            return k[:0], v[:0], {name: g[:0] for name, g in gates.items()}
        if len(parts) == 1:
            return parts[0]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                {name: torch.cat([p[2][name] for p in parts]) for name in gates})

    def write(self, layer: int, plan: ChunkPlan, k: torch.Tensor, v: torch.Tensor,
              gates: dict[str, torch.Tensor] | None = None):
        """The chunk's ring writes for one layer (call after everything that reads the cache: the
        attention over ``key_ranges`` and ``evicted``; with ``plan.in_order`` before, as nothing it overwrites
        is read), one block copy per run of slots.
        ``gates``: {field: [T, H]} in ahn mode."""
        for r, s, n in plan.writes:
            self.k[layer][:, s:s + n].copy_(k[r:r + n].transpose(0, 1))
            self.v[layer][:, s:s + n].copy_(v[r:r + n].transpose(0, 1))
            for name, buf in self.gates.items():
                buf[layer][s:s + n].copy_(gates[name][r:r + n])

    # ---- position ----------------------------------------------------------------------------
    @torch.inference_mode()
    def advance(self, n: int):
        """The position moves by n tokens, on the host and on the device. Every path calls this after
        its step: the prefill, the eager decode step, and the caller of a replayed CUDA graph."""
        self.position += n
        self.pos.fill_(self.position)
        self.torn = False

    def ensure_capacity(self, total: int) -> bool:
        """Full mode: grow (doubling) so ``total`` positions fit. Returns True when buffers moved.
        Warns once per session when full attention goes past max_position_embeddings; ahn/swa modes run
        any length without a word, as the official model does (docs/semantics.md §9)."""
        if not self.full:
            return False
        if total > self.config.max_position_embeddings and not self._warned_positions:
            self._warned_positions = True
            warnings.warn(f"full attention past max_position_embeddings ({self.config.max_position_embeddings}): "
                          "the base model was not trained for these positions; consider mode 'ahn'", stacklevel=3)
        if total <= self.capacity:
            return False
        new = self.capacity
        while new < total:
            new *= 2
        # (a full-mode state is never in a pool: its buffers are its own and may move)
        shape = (*self.k.shape[:2], new, self.k.shape[3])
        grown = zeros({"k": (shape, self.k.dtype), "v": (shape, self.v.dtype)}, self.config, self.device, 1, new)
        k, v = grown["k"], grown["v"]
        k[:, :, : self.capacity] = self.k
        v[:, :, : self.capacity] = self.v
        self.k, self.v = k, v
        self.capacity = self.window = new
        self.layout += 1
        return True

    @torch.inference_mode()
    def reset(self):
        for t in self.tensors().values():
            t.zero_()
        self.position = 0
        self.pos.zero_()
        self.torn = False

    @torch.inference_mode()
    def fill_random(self, position: int, generator: torch.Generator | None = None):
        """Stand the state at depth ``position`` as if that many tokens had been consumed, with random
        values: K/V ~ N(0, 1) in the occupied slots, the gates uniform in each field's ``GateField.random``
        range (GatedDeltaNet: beta in (0.05, 0.95), alpha in (-0.5, -0.01); DeltaNet: alpha 0; Mamba2: dt in
        (0.001, 0.1)), a small memory once tokens have left the window (``generator``: on the state's
        device; default seeded 0). For benchmarks and shape tests: the cost of a step depends on the
        depth, not on the values (a real context comes from ``Session.forward``)."""
        # A negative depth once reached the kernels (a native crash): check it here.
        if isinstance(position, bool) or not hasattr(position, "__index__") or operator.index(position) < 0:
            raise AhnError(f"fill_random needs a position (depth) that is an integer >= 0, got {position!r}")
        position = operator.index(position)
        self.ensure_capacity(position)
        self.reset()
        n = min(position, self.capacity)
        g = generator if generator is not None else torch.Generator(self.device).manual_seed(0)
        self.k[:, :, :n].normal_(generator=g)
        self.v[:, :, :n].normal_(generator=g)
        for name, buf in self.gates.items():
            buf[:, :n].uniform_(*self.gate_fields[name].random, generator=g)
        if self.ahn:
            if position > self.sinks + self.window:
                self.memory.normal_(0.0, 0.02, generator=g)
        self.position = 0
        self.advance(position)

    # ---- the state as a value (save / restore / fork) -----------------------------------------
    @property
    def SLOT_AXIS(self) -> dict[str, int]:
        """Fields with a slot axis, and where it is: only the occupied slots [0, occupied) are exported."""
        return {"k": 2, "v": 2, **{name: 1 for name in self.gates}}

    def export(self) -> dict[str, torch.Tensor]:
        """The occupied part of every field (views, no copy): k/v [L, Hkv, n, D], gates [L, n, H],
        memory [L, H, Dk, Dv], with n = ``occupied``. Together with ``position`` this is the whole
        state; ``load`` puts it back."""
        n = self.occupied
        return {name: t.narrow(self.SLOT_AXIS[name], 0, n) if name in self.SLOT_AXIS else t
                for name, t in self.tensors().items()}

    @torch.inference_mode()
    def load(self, tensors: dict[str, torch.Tensor], position: int):
        """Replace the state by an exported one (``export`` of a state of the same layout) at
        ``position``. Shapes and dtypes are checked, before anything is allocated or written (a full-mode
        cache grows only to a position its tensors hold); a mismatch raises ValueError naming the field."""
        n = position if self.full else min(position, self.capacity)   # the occupied slots at ``position``
        own = self.tensors()
        if set(tensors) != set(own):
            raise ValueError(f"fields {sorted(tensors)} do not match this state's {sorted(own)}")
        for name, t in own.items():
            want = list(t.shape)
            if name in self.SLOT_AXIS:
                want[self.SLOT_AXIS[name]] = n
            if list(tensors[name].shape) != want:
                raise ValueError(f"field {name} has shape {list(tensors[name].shape)}, this state needs {want}")
            if tensors[name].dtype != t.dtype:   # copy_ would convert it silently
                raise ValueError(f"field {name} has dtype {tensors[name].dtype}, this state needs {t.dtype}")
        if self.ensure_capacity(position):
            own = self.tensors()   # full mode: the grown buffers
        self.reset()
        for name, t in own.items():
            dst = t.narrow(self.SLOT_AXIS[name], 0, n) if name in self.SLOT_AXIS else t
            dst.copy_(tensors[name])
        self.position = 0
        self.advance(position)

    @torch.inference_mode()
    def copy_from(self, other: "State"):
        """This state becomes a copy of ``other`` (same layout): one device copy per field. A state that may
        be half-written is not copied (``refuse_torn``)."""
        refuse_torn([other])
        self.ensure_capacity(other.capacity)
        for name, t in self.tensors().items():
            src = other.tensors()[name]
            if name in self.SLOT_AXIS and src.shape != t.shape:   # full mode: other is smaller
                t.zero_()
                t.narrow(self.SLOT_AXIS[name], 0, src.shape[self.SLOT_AXIS[name]]).copy_(src)
            else:
                t.copy_(src)
        self.position = other.position
        self.pos.copy_(other.pos)
        self.torn = False

    @property
    def nbytes(self) -> int:
        scratch = (self.k_evict, self.v_evict, *self.gate_evict.values(), self.pos)
        return sum(t.numel() * t.element_size() for t in (*self.tensors().values(), *scratch) if t is not None)


_SLOT0: dict = {}   # device -> int64 [1] tensor holding 0: the slots of a one-state batch


def begin_writes(states):
    """A call starts writing ``states`` (a prefill chunk, one decode step); each state's ``advance`` ends
    it. A call that raises or is interrupted in between (out of memory, Ctrl-C, a failed kernel) can leave
    some layers written and the position unmoved, so the next call would feed the memory twice: such a
    state refuses every call (AhnError) until ``reset``, ``load`` or ``copy_from`` of a whole state. All
    are checked before any is marked."""
    refuse_torn(states)
    for st in states:
        st.torn = True


def refuse_torn(states):
    """AhnError if any of ``states`` may be half-written (``begin_writes``)."""
    if any(st.torn for st in states):
        raise AhnError("a call on this session failed or was interrupted while it wrote the state, which may "
                       "be half-written: reset() the session (or close it) and feed the sequence again")


def shared_pool(states) -> "StatePool | None":
    """The ``StatePool`` every one of ``states`` lives in, or None (a private state, or several pools):
    only states of one pool step as one batch."""
    pool = states[0].pool if states else None
    return pool if pool is not None and all(st.pool is pool for st in states) else None


class DecodeBatch:
    """The states of one decode step in the form the decode kernels take: each field is a layer-stacked
    tensor over entries of one storage (``k[i]``: [N, Hkv, C, D], ``memory[i]``: [N, ...], ``pos``: [N],
    the eviction scratch [N, ...]) and ``slots`` (int64 [B] on the device) names the entry that row b of
    the step reads and writes. One state: its own views with N = 1 and slots [0]. Several states: the
    storage of their common ``StatePool`` and their pool slots (``slots`` may be a caller's static buffer,
    as a captured CUDA graph needs). Only the kernels write through it; ``advance`` moves positions."""

    def __init__(self, states: list["State"], slots: torch.Tensor | None = None):
        if not states:
            raise ValueError("a decode batch needs at least one state")
        st0 = self.state0 = states[0]
        self.states = states
        self.sinks, self.window, self.ahn, self.full = st0.sinks, st0.window, st0.ahn, st0.full
        if len(states) == 1 and slots is None:
            self.k, self.v = st0.k.unsqueeze(1), st0.v.unsqueeze(1)
            self.gates = {n: t.unsqueeze(1) for n, t in st0.gates.items()}
            self.gate_evict = {n: t.unsqueeze(0) for n, t in st0.gate_evict.items()}
            self.memory = st0.memory.unsqueeze(1) if st0.memory is not None else None
            self.k_evict, self.v_evict, self.pos = st0.k_evict.unsqueeze(0), st0.v_evict.unsqueeze(0), st0.pos
            dev = st0.device
            if dev not in _SLOT0:
                _SLOT0[dev] = torch.zeros(1, dtype=torch.int64, device=dev)
            self.slots = _SLOT0[dev]
            return
        pool = shared_pool(states)
        if pool is None:
            raise ValueError("states stepped together must come from one StatePool")
        if len({st.pool_slot for st in states}) != len(states):
            raise ValueError("a state appears twice in one decode batch")
        store = pool.storage
        self.k, self.v = store["k"], store["v"]
        self.gates = {n: store["gate." + n] for n in st0.gates}
        self.gate_evict = {n: store["gate_evict." + n] for n in st0.gate_evict}
        self.memory = store.get("memory")
        self.k_evict, self.v_evict, self.pos = store["k_evict"], store["v_evict"], store["pos"]
        want = [st.pool_slot for st in states]
        if slots is None:
            slots = torch.tensor(want, dtype=torch.int64, device=st0.device)
        self.slots = slots

    def __len__(self) -> int:
        return len(self.states)

    @torch.inference_mode()
    def advance(self):
        """Every state of the batch moves by one token, on the host and on the device (one kernel for the
        batch; the same positions ``State.advance`` would write)."""
        if len(self.states) == 1:   # (a graph's batch serves other states later: not state0)
            self.states[0].advance(1)
            return
        for st in self.states:
            st.position += 1
            st.torn = False
        self.pos.index_add_(0, self.slots, torch.ones_like(self.slots))


class StatePool:
    """The fixed-size states of up to ``size`` sequences of one model (modes ``ahn`` and ``swa``), allocated
    once as one set of tensors (``allocate``) and handed out by pool slot: ``acquire()`` gives a zeroed
    ``State`` that views a free slot, ``release(state.pool_slot)`` returns the slot. Nothing is allocated after
    construction, so a service's memory is fixed up front and never fragments; kernels that step many
    sequences at once index the shared tensors by ``State.pool_slot``. Full mode (a cache that grows per
    sequence) has no pool: each such state is private. Thread-safe."""

    def __init__(self, config: Config, device, size: int):
        if config.mode == "full":
            raise ValueError("full mode grows each sequence's cache: its states cannot share a pool; "
                             "use mode 'ahn' or 'swa', or sessions without a pool")
        size = int_arg(size, "size", message=f"a state pool needs a positive integer size, got {size!r}")
        self.config = config
        self.device = torch.device(device)
        self.size = size
        self.capacity = config.sinks + config.window
        self.storage = allocate(config, self.device, size, self.capacity)
        self._free = list(range(size - 1, -1, -1))     # pop() hands out the lowest free slot
        self._holders: dict[int, State] = {}            # slot -> the state that acquire handed it to
        self.graphs: dict = {}   # ("step", B) -> Model.step's captured decode of B sessions (ahn_rt.graph)
        # One Model.step over this pool's sessions at a time: the steps share the captured graphs' buffers.
        self.step_lock = threading.Lock()
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage.values())

    def acquire(self) -> State:
        """A zeroed state at position 0 in a free slot; ValueError when every slot is taken."""
        # Ctrl-C (or a failure) from the slot's removal to the return: the slot goes back, else it had no
        # owner to give it back and the pool lost it for good. (Indexing and del call nothing, so the
        # interrupt cannot land between them: pop() could leave with the slot unnamed.)
        slot = None
        try:
            with self._lock:
                if not self._free:
                    raise ValueError(f"all {self.size} slots of the state pool are in use; close a session "
                                     "or make a larger pool")
                slot = self._free[-1]
                del self._free[-1]
            st = State(self.config, self.device, pool=self, pool_slot=slot)
            st.reset()
            self._holders[slot] = st
        except BaseException:
            if slot is not None:
                self.release(slot)
            raise
        return st

    def holds(self, state: State) -> bool:
        """Whether ``state`` still holds its slot (``acquire`` gave it, and it was not released since)."""
        return self._holders.get(state.pool_slot) is state

    def release(self, slot: int):
        """Slot ``slot`` (a state's ``pool_slot``) is free again; the state that held it refuses every call
        afterwards (``Session.close`` does this; a session whose slot was released refuses its calls and
        its close gives nothing back). Releasing a free slot raises AhnError."""
        n = as_int(slot)   # numpy's integers too (a slot read from an array was "not in use")
        with self._lock:
            if n is None or not 0 <= n < self.size or n in self._free:
                raise AhnError(f"pool slot {slot!r} is not in use: close() a session to give its slot back")
            self._put_back(n)

    def give_back(self, state: State):
        """``release`` the slot of ``state`` if it still holds it; nothing if the slot was released meanwhile
        (and may belong to another state by now)."""
        with self._lock:
            if self._holders.get(state.pool_slot) is state:
                self._put_back(state.pool_slot)

    def _put_back(self, slot: int):
        """(under ``_lock``) slot ``slot`` has no holder and is free again."""
        self._holders.pop(slot, None)
        self._free.append(slot)
        self._free.sort(reverse=True)
