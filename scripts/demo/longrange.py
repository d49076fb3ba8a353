"""Synthetic long-range items for the demo model, shared by the training-data builders and the evaluation.

A passkey of 5 random digits is stated early in a sequence of corpus text and asked for later:

    ...corpus text...
    # passkey: 48213
    ...corpus text (the distance)...
    # the passkey was: 48213
    ...corpus text...

Everything works on token ids: the two lines are the token ids of the templates below (each starting and
ending with a newline token) spliced into a stretch of corpus tokens, so an item always has the same ids
wherever it lands. Digits are single tokens (the demo tokenizer splits every digit), so the passkey is 5
tokens and the answer's token positions are known exactly:

    key_pos     index of the first stated digit      (ids[key_pos + i]    = digit i)
    answer_pos  index of the first answer digit      (ids[answer_pos + i] = digit i)
    distance    answer_pos - key_pos (exact, as requested)

The logits at answer_pos - 1 + i predict answer digit i. Exact recall under greedy decoding is the same as
"the argmax at every one of those five positions is the right digit" (a greedy continuation that gets the
first i digits right is fed exactly the teacher-forced prefix), so one forward pass scores an item.
Every draw comes from a numpy Generator seeded by the caller.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

STATEMENT = "\n# passkey: "
QUESTION = "\n# the passkey was: "
NEWLINE = "\n"
N_DIGITS = 5
CHANCE = 10.0 ** -N_DIGITS
MIN_START = 64          # a statement never starts before this token (keeps it out of the attention sinks)


@dataclasses.dataclass(frozen=True)
class Templates:
    """Token ids of the item pieces under one tokenizer."""
    statement: tuple[int, ...]
    question: tuple[int, ...]
    newline: tuple[int, ...]
    digits: tuple[int, ...]          # the id of "0", ..., "9"

    @classmethod
    def from_tokenizer(cls, path) -> "Templates":
        """From a tokenizer.json (file or the folder holding one)."""
        from tokenizers import Tokenizer
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        tok = Tokenizer.from_file(str(path))

        def enc(s):
            return tuple(tok.encode(s, add_special_tokens=False).ids)
        digits = []
        for d in "0123456789":
            ids = enc(d)
            if len(ids) != 1:
                raise ValueError(f"{path}: digit {d!r} is {len(ids)} tokens; the items need single-token digits")
            digits.append(ids[0])
        t = cls(enc(STATEMENT), enc(QUESTION), enc(NEWLINE), tuple(digits))
        # the spliced lines must read back as the text they stand for
        probe = list(t.statement) + [t.digits[4], t.digits[2]] + list(t.newline)
        if tok.decode(probe, skip_special_tokens=False) != STATEMENT + "42" + NEWLINE:
            raise ValueError(f"{path}: the passkey templates do not round-trip through the tokenizer")
        return t

    @classmethod
    def from_data(cls, folder) -> "Templates":
        """From the manifest.json of build_corpus.py (no tokenizer library needed), else from the
        folder's tokenizer.json."""
        import json
        m = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
        if "templates" not in m:
            return cls.from_tokenizer(Path(folder) / "tokenizer.json")
        t = m["templates"]
        return cls(tuple(t["statement"]), tuple(t["question"]), tuple(t["newline"]), tuple(t["digits"]))

    def to_json(self) -> dict:
        return {"statement": list(self.statement), "question": list(self.question),
                "newline": list(self.newline), "digits": list(self.digits)}

    @property
    def statement_len(self) -> int:
        return len(self.statement) + N_DIGITS + len(self.newline)

    @property
    def question_len(self) -> int:
        return len(self.question) + N_DIGITS + len(self.newline)

    def min_distance(self) -> int:
        """Smallest answer_pos - key_pos: the question line right after the statement line."""
        return N_DIGITS + len(self.newline) + len(self.question)

    def max_distance(self, L: int, min_start: int = MIN_START) -> int:
        """Largest distance that fits a sequence of L tokens (the answer's last digit at L - 1)."""
        return L - N_DIGITS - (min_start + len(self.statement))


@dataclasses.dataclass(frozen=True)
class Item:
    key_pos: int
    answer_pos: int
    digits: tuple[int, ...]          # the passkey as token ids
    text: str                        # the passkey as text, e.g. "48213"

    @property
    def distance(self) -> int:
        return self.answer_pos - self.key_pos

    @property
    def answer_positions(self) -> range:
        return range(self.answer_pos, self.answer_pos + N_DIGITS)

    def to_json(self) -> dict:
        return {"key_pos": self.key_pos, "answer_pos": self.answer_pos, "distance": self.distance,
                "passkey": self.text}


def insert_passkey(filler: np.ndarray, L: int, distance: int, rng: np.random.Generator, t: Templates, *,
                   min_start: int = MIN_START, key_pos: int | None = None) -> tuple[np.ndarray, Item]:
    """A sequence of exactly L token ids (int64): corpus tokens from ``filler`` (which must hold at least
    L - statement_len - question_len of them, taken in order from its start) with a passkey stated at
    ``key_pos`` (drawn uniformly where the item fits, unless given) and asked for at key_pos + distance.
    Returns (ids, item)."""
    lo, hi = min_start + len(t.statement), L - N_DIGITS - distance
    if distance < t.min_distance() or hi < lo:
        raise ValueError(f"distance {distance} does not fit a sequence of {L} tokens "
                         f"(between {t.min_distance()} and {t.max_distance(L, min_start)})")
    if key_pos is None:
        key_pos = int(rng.integers(lo, hi + 1))
    elif not lo <= key_pos <= hi:
        raise ValueError(f"key_pos {key_pos} outside [{lo}, {hi}] for distance {distance}, L {L}")
    d = rng.integers(0, 10, size=N_DIGITS)
    digits = tuple(t.digits[int(x)] for x in d)
    answer_pos = key_pos + distance
    s0 = key_pos - len(t.statement)                          # statement line starts here
    gap = answer_pos - len(t.question) - (key_pos + N_DIGITS + len(t.newline))
    tail = L - (answer_pos + N_DIGITS)                       # room after the answer digits
    need = s0 + gap + max(0, tail - len(t.newline))
    if len(filler) < need:
        raise ValueError(f"filler has {len(filler)} tokens, the item needs {need}")
    parts = [filler[:s0], t.statement, digits, t.newline,
             filler[s0:s0 + gap], t.question, digits, t.newline[:tail],
             filler[s0 + gap:s0 + gap + max(0, tail - len(t.newline))]]
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    assert ids.size == L, (ids.size, L)
    return ids, Item(key_pos, answer_pos, digits, "".join(str(int(x)) for x in d))


def load_tokens(path) -> np.ndarray:
    """A .bin file of the corpus builder: little-endian uint16 ids (memory-mapped). An empty file (a split
    without files) is no tokens; a file of an odd number of bytes (cut short) is an AhnError (numpy's mmap
    errors for both were a traceback)."""
    size = Path(path).stat().st_size
    if size % 2:
        from ahn_rt.errors import AhnError
        raise AhnError(f"{path} has {size:,} bytes, not a whole number of uint16 token ids: it is damaged or "
                       "truncated; build the corpus again with scripts/demo/build_corpus.py")
    if size == 0:
        return np.zeros(0, dtype="<u2")
    return np.memmap(path, dtype="<u2", mode="r")


class SequenceSampler:
    """Random training sequences of L tokens from a token array: a uniformly drawn stretch of corpus, with
    probability ``passkey_frac`` carrying one passkey at a distance drawn uniformly from
    [dist_min, dist_max] (clipped to what fits)."""

    def __init__(self, tokens: np.ndarray, L: int, t: Templates, *, seed: int, passkey_frac: float = 0.5,
                 dist_min: int | None = None, dist_max: int | None = None, min_start: int = MIN_START):
        if len(tokens) < L + 1:
            raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than one sequence of {L}")
        self.tokens, self.L, self.t = tokens, L, t
        self.rng = np.random.default_rng(seed)
        self.passkey_frac = float(passkey_frac)
        self.min_start = min_start
        top = t.max_distance(L, min_start)
        self.dist_min = max(t.min_distance(), dist_min if dist_min is not None else t.min_distance())
        self.dist_max = min(top, dist_max if dist_max is not None else top)
        if self.passkey_frac > 0 and self.dist_min > self.dist_max:
            raise ValueError(f"no passkey distance in [{dist_min}, {dist_max}] fits sequences of {L} tokens")

    def sample(self) -> tuple[np.ndarray, Item | None]:
        off = int(self.rng.integers(0, len(self.tokens) - self.L + 1))
        crop = np.asarray(self.tokens[off:off + self.L], dtype=np.int64)
        if self.rng.random() >= self.passkey_frac:
            return crop, None
        dist = int(self.rng.integers(self.dist_min, self.dist_max + 1))
        return insert_passkey(crop, self.L, dist, self.rng, self.t, min_start=self.min_start)

    def batch(self, B: int) -> tuple[np.ndarray, list]:
        seqs = [self.sample() for _ in range(B)]
        return np.stack([s for s, _ in seqs]), [it for _, it in seqs]


def eval_text_sequences(tokens: np.ndarray, L: int, n: int) -> list[np.ndarray]:
    """n plain sequences of L tokens, evenly spaced over the token array (non-overlapping when it holds
    n * L tokens or more); deterministic."""
    span = len(tokens) - L
    if span < 0:
        raise ValueError(f"{len(tokens)} tokens cannot hold a sequence of {L}")
    starts = [0] if n == 1 else [round(i * span / (n - 1)) for i in range(n)]
    return [np.asarray(tokens[s:s + L], dtype=np.int64) for s in starts[:n]]


def eval_passkey_sequences(tokens: np.ndarray, L: int, distances, n: int, t: Templates, *, seed: int,
                           min_start: int = MIN_START) -> dict[int, list[tuple[np.ndarray, Item]]]:
    """For every distance, n sequences of L tokens of corpus text (seeded random stretches) each holding
    one passkey at exactly that distance: {distance: [(ids, item)]}. The same seed gives the same items."""
    out = {}
    for d in distances:
        rng = np.random.default_rng([seed, int(d)])
        seqs = []
        for _ in range(n):
            off = int(rng.integers(0, len(tokens) - L + 1))
            crop = np.asarray(tokens[off:off + L], dtype=np.int64)
            seqs.append(insert_passkey(crop, L, int(d), rng, t, min_start=min_start))
        out[int(d)] = seqs
    return out
