"""The prefix cache: an LRU of prefilled states keyed by token prefix, bounded by bytes.

A request whose prompt extends a cached prefix copies that state into its session and prefills only the
rest. A state is reusable only for exactly its prefix, and only bit-exactly when the rest is prefilled in
the same chunks as a cold run would use: chunking computes the same function but not the same rounding
(on CPU in float32 a different split moves the logits by ~1e-7; in bf16, and for a one-token chunk, which
takes the decode kernels, by more). So every prompt is prefilled on one *schedule* — chunks end at every
multiple of the chunk size and at every mark of the prompt (the end of a chat message, an assistant
header) — and the key of a point is a digest of the token ids *and* the chunk boundaries before it. A hit
at point p therefore holds exactly the state a cold prefill of the same prompt has at p, and continuing
on the same schedule gives the same logits, bit for bit (tests/test_prefix_cache.py).

Snapshot points (``snapshot_points``): the first mark (the end of the system message: what most chat
traffic shares), the last two marks before the end (a conversation's previous turns), the whole prompt
(a repeated prompt costs no prefill at all: the entry keeps its last logits), and the last two
chunk-size boundaries before the end (long shared documents without chat structure; with two, any
question shorter than one chunk leaves the document's last whole boundary inside the shared part).
Points at or before the hit are not stored again. Each entry holds the occupied part of the state
(``State.export``, cloned on the model's device); the whole-prompt entry also keeps the float32 logits of
its last position (a vocabulary row: for a small state that is most of the entry, so only the entry that
a repeated prompt can use in full keeps it; an entry without logits serves longer prompts only).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import struct
import threading
from array import array

import torch

from ..errors import int_arg
from .prompt import Prompt


def schedule(n: int, chunk_size: int, marks=(), start: int = 0) -> list[int]:
    """Chunk ends for prefilling positions [start, n) of a sequence: every multiple of chunk_size
    (counted from 0) and every mark in (start, n), then n. Consecutive ends are at most chunk_size apart."""
    ends = set(range((start // chunk_size + 1) * chunk_size, n, chunk_size))
    ends.update(m for m in marks if start < m < n)
    ends.add(n)
    return sorted(ends)


@dataclasses.dataclass
class Plan:
    """A prompt prefilled from position 0: its chunk ends and the cache key of every end."""
    n: int
    chunk_size: int
    ends: list[int]
    marks: tuple
    keys: dict[int, bytes]
    ids_bytes: bytes      # int64 ids, for an exact check of a hit

    def prefix_bytes(self, p: int) -> bytes:
        return self.ids_bytes[: 8 * p]


def make_plan(prompt: Prompt, chunk_size: int) -> Plan:
    ids = array("q", prompt.ids)
    raw = ids.tobytes()
    ends = schedule(len(ids), chunk_size, prompt.marks)
    h = hashlib.blake2b(digest_size=20, person=b"ahn_rt.prefix")
    h.update(struct.pack("<q", chunk_size))
    keys, prev = {}, 0
    for e in ends:
        h.update(struct.pack("<q", e - prev))   # the boundary is part of the key
        h.update(raw[8 * prev: 8 * e])
        keys[e] = h.digest()
        prev = e
    return Plan(len(ids), chunk_size, ends, prompt.marks, keys, raw)


@dataclasses.dataclass
class Entry:
    position: int
    ids_bytes: bytes
    tensors: dict                 # State.export() fields, cloned
    logits: torch.Tensor | None   # float32 [vocab], the logits at position - 1 (whole-prompt entries)
    nbytes: int


class PrefixCache:
    """LRU of prefilled states, at most ``max_bytes`` (device tensors and logits; the id bytes are not
    counted). Thread-safe; one per Model (``Model.enable_prefix_cache``)."""

    def __init__(self, max_bytes: int, boundary_snapshots: int = 2):
        max_bytes = int_arg(max_bytes, "max_bytes", minimum=0,
                            message=f"prefix cache size must be a non-negative number of bytes, got {max_bytes!r}")
        boundary_snapshots = int_arg(boundary_snapshots, "boundary_snapshots", minimum=0)
        self.max_bytes = max_bytes
        self.boundary_snapshots = boundary_snapshots
        self._entries: "collections.OrderedDict[bytes, Entry]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.hit_tokens = self.stores = self.evictions = 0

    def __len__(self):
        return len(self._entries)

    def clear(self):
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def lookup(self, plan: Plan) -> Entry | None:
        """The entry at the deepest chunk end of ``plan`` that is cached and usable (the whole prompt
        needs the entry's logits); None: a miss."""
        with self._lock:
            for e in reversed(plan.ends):
                entry = self._entries.get(plan.keys[e])
                if e == plan.n and entry is not None and entry.logits is None:
                    continue
                if entry is not None and entry.ids_bytes == plan.prefix_bytes(e):
                    self._entries.move_to_end(plan.keys[e])
                    self.hits += 1
                    self.hit_tokens += e
                    return entry
            self.misses += 1
            return None

    def snapshot_points(self, plan: Plan, hit: int) -> list[int]:
        """Where a prefill that starts at ``hit`` stores snapshots (see the module docstring)."""
        n, marks = plan.n, plan.marks
        points = {n}
        if marks:
            points.add(marks[0])
        points.update([m for m in marks if m < n][-2:])
        bounds = [e for e in plan.ends if e % plan.chunk_size == 0 and e < n]
        if self.boundary_snapshots:
            points.update(bounds[-self.boundary_snapshots:])
        return sorted(p for p in points if p > hit)

    def contains(self, plan: Plan, p: int) -> bool:
        with self._lock:
            return plan.keys[p] in self._entries

    def store(self, plan: Plan, p: int, state, logits: torch.Tensor) -> bool:
        """Keep ``state`` (at position p of ``plan``), and at the whole prompt its last logits; False
        when it does not fit."""
        key = plan.keys[p]
        keep_logits = p == plan.n
        with self._lock:
            old = self._entries.get(key)
            if old is not None and (old.logits is not None or not keep_logits):
                self._entries.move_to_end(key)
                return True
        if state.position != p:
            raise AssertionError(f"state at {state.position}, snapshot point {p}")
        tensors = state.export()
        size = sum(t.numel() * t.element_size() for t in tensors.values()) + (logits.numel() * 4 if keep_logits else 0)
        if size > self.max_bytes:
            return False
        entry = Entry(p, plan.prefix_bytes(p), {k: t.clone() for k, t in tensors.items()},
                      logits.detach().reshape(-1).float().clone() if keep_logits else None, size)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            while self._entries and self.nbytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self.nbytes += size
            self.stores += 1
        return True

    def stats(self) -> dict:
        with self._lock:
            return dict(entries=len(self._entries), bytes=self.nbytes, max_bytes=self.max_bytes, hits=self.hits,
                        misses=self.misses, hit_tokens=self.hit_tokens, stores=self.stores,
                        evictions=self.evictions)
