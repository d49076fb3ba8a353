"""Training data for the AHN trainer: JSONL records -> token sequences with a loss mask, the per-sequence
window budget (docs/semantics.md §10), and deterministic micro-batches.

A record is one JSON object per line, one of

* ``{"input_ids": [int, ...]}`` (optionally ``"labels"``: the same length, -100 where no loss is taken,
  else the token id itself; and ``"loss_weights"``: the same length, a finite number >= 0 per token, the
  weight of the loss that predicts it, 0 meaning no loss), pre-tokenized, so no tokenizer is needed;
* ``{"text": "..."}``: every token is a loss target;
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` (a content may also be a
  list of OpenAI text parts ``[{"type": "text", "text": "..."}, ...]``, joined by newlines, as ``ahn_rt.generate`` and
  the server read them; any other part makes the record bad): rendered in Qwen's
  ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n`` per turn; Qwen2/2.5 get Qwen2.5's default system message
  when the conversation has none, as ``ahn_rt.tokenizer.apply_chat_template`` does), loss on the assistant
  turns (their content plus ``<|im_end|>\\n``) only, unless ``loss_on="all"``. A content that spells a special
  token ("<|im_end|>") is that text, not the token, as the server encodes it; the tokenizer must have the
  ChatML tokens.

A field whose value is null counts as absent (``{"text": "...", "input_ids": null}`` is a text record).
Bad records (invalid JSON, wrong types, ids outside the vocabulary, empty) are skipped and counted, never
fatal. Sequences are cut at ``seq_len`` tokens (like the official ``cutoff_len``) and those with fewer than
``min_len`` tokens dropped (like ``filter_len``); a sequence with no loss position the window allows is
dropped too ("shorter than the window"). What is left is stored flat (int32 ids, a bool loss mask), about
5 bytes per token, plus a float32 weight per token once any record carries ``loss_weights``.

Weights. The loss of a step is the weighted mean over its loss positions: sum of w_t x loss_t over sum of
w_t, where w_t is the weight of token t + 1 (1 for a record without ``loss_weights``). Weights let a data
set stress rare positions, e.g. the answer of a long-range item, without repeating whole sequences.

Loss positions. The hidden state at position t predicts token t + 1, so position t is a loss position iff
token t + 1 is a loss target (the usual shift of Hugging Face labels) and t >= S + W, the first position
that reads the memory (§3). A micro-batch is right-padded to its longest sequence (pad id 0, never a loss
position): padding at the end cannot change any real position, because attention and the memory are causal.
Sequences are never packed together: packing would let the memory carry one document into the next.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shlex
from array import array
from collections import Counter
from pathlib import Path

import torch

from ..errors import AhnError

IGNORE_INDEX = -100
# §10: total budget Wt = S + W drawn from these, restricted to L/8 < Wt < L; sinks S with S <= Wt/2.
BUDGETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SINK_CHOICES = (0, 32, 64, 128, 512, 2048, 4096)
ROLES = ("system", "user", "assistant")
FLOAT32_MAX = 3.4028234663852886e38   # the largest loss weight (they are stored as float32)


# ----------------------------------------------------------------------------------------------
# The window budget
# ----------------------------------------------------------------------------------------------
def budget_choices(L: int, *, wt_min: int | None = None, wt_max: int | None = None) -> list[int]:
    """The total budgets Wt a sequence of L tokens may draw: Wt in BUDGETS, L/8 < Wt < L, and within
    [wt_min, wt_max] when given. When no allowed budget reaches L/8 (a sequence longer than 8x the
    largest one, e.g. L > 65536, or a small --window-max), the largest allowed budget below L."""
    lo = wt_min if wt_min is not None else 0
    hi = wt_max if wt_max is not None else BUDGETS[-1]
    allowed = [w for w in BUDGETS if lo <= w <= hi and w < L]
    fit = [w for w in allowed if 8 * w > L]
    return fit or allowed[-1:]


def sample_budget(L: int, rng: random.Random, *, fixed: tuple[int, int] | None = None,
                  wt_min: int | None = None, wt_max: int | None = None) -> tuple[int, int]:
    """(window W, sinks S) for one sequence of L tokens: Wt uniform over ``budget_choices`` (L/8 < Wt < L),
    S uniform over
    the SINK_CHOICES with S <= Wt / 2, W = Wt - S. ``fixed=(W, S)`` returns it unchanged (and draws
    nothing). Raises AhnError when no budget fits L (the data loader drops such sequences first)."""
    if fixed is not None:
        return int(fixed[0]), int(fixed[1])
    choices = budget_choices(L, wt_min=wt_min, wt_max=wt_max)
    if not choices:
        raise AhnError(f"sequence shorter than the window: no budget in {list(BUDGETS)} fits {L} tokens "
                       f"(needs L/8 < Wt < L)")
    wt = rng.choice(choices)
    s = rng.choice([s for s in SINK_CHOICES if 2 * s <= wt])
    return wt - s, s


@dataclasses.dataclass(frozen=True)
class BudgetSpec:
    """How each sequence's (W, S) is chosen: fixed, or drawn (optionally restricted to [wt_min, wt_max])."""
    fixed: tuple[int, int] | None = None
    wt_min: int | None = None
    wt_max: int | None = None

    def sample(self, L: int, rng: random.Random) -> tuple[int, int]:
        return sample_budget(L, rng, fixed=self.fixed, wt_min=self.wt_min, wt_max=self.wt_max)

    def smallest(self, L: int) -> int | None:
        """The smallest total budget S + W a sequence of L tokens can get (None: none fits)."""
        if self.fixed is not None:
            return self.fixed[0] + self.fixed[1]
        c = budget_choices(L, wt_min=self.wt_min, wt_max=self.wt_max)
        return c[0] if c else None

    def describe(self) -> str:
        if self.fixed is not None:
            return f"W={self.fixed[0]} S={self.fixed[1]} (S+W={sum(self.fixed)})"
        lo = self.wt_min if self.wt_min is not None else BUDGETS[0]
        hi = self.wt_max if self.wt_max is not None else BUDGETS[-1]
        return f"random S+W in {[w for w in BUDGETS if lo <= w <= hi]} (L/8 < S+W < L)"


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------
class _Bad(Exception):
    """A record that is skipped; the message is the reason it is counted under."""


def _weight_list(v, n: int) -> list[float]:
    if not isinstance(v, list):
        raise _Bad("loss_weights is not a list")
    if len(v) != n:
        raise _Bad("loss_weights and input_ids differ in length")
    for x in v:
        # stored as float32: beyond its largest value a weight would become inf (and the step's loss NaN)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= FLOAT32_MAX:
            raise _Bad("a loss weight is not a finite number >= 0")
    # as stored (float32): a weight below its smallest (about 1e-45) is 0, so its token is no loss target (as a
    # loss position of weight 0 it left a step whose weights sum to 0, a division by zero)
    return array("f", v).tolist()


def _int_list(v, what) -> list[int]:
    if not isinstance(v, list):
        raise _Bad(f"{what} is not a list")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int):
            raise _Bad(f"{what} holds a non-integer")
    return v


class _Encoder:
    """Turns text/messages records into (ids, mask); loads the tokenizer on first use."""

    def __init__(self, tokenizer_path, family: str, loss_on: str, vocab_size: int | None = None):
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size     # the base's embedding rows: a larger tokenizer is refused when loaded
        self.family = family
        self.loss_on = loss_on
        self._tok = None
        self._chatml = False  # the tokenizer has the ChatML tokens (checked at the first messages record)

    @property
    def tok(self):
        if self._tok is None:
            from ..tokenizer import Tokenizer
            if self.tokenizer_path is None or not Path(self.tokenizer_path).exists():
                raise AhnError(f"the data has text/messages records but there is no tokenizer "
                               f"({self.tokenizer_path or 'none given'} not found); pass --tokenizer PATH "
                               "or pre-tokenize the data as {\"input_ids\": [...]}")
            tok = Tokenizer.from_file(self.tokenizer_path)
            if self.vocab_size is not None:   # else: records skipped one by one
                tok.check_fits(self.vocab_size, self.tokenizer_path, "base model",
                               "give the base model's tokenizer.json as --tokenizer")
            self._tok = tok
        return self._tok

    def encode(self, text: str, plain: bool = False) -> list[int]:
        """Token ids of ``text``: special tokens spelled in it are those tokens, unless ``plain``."""
        tok = self.tok            # a missing tokenizer is fatal, not a bad record
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _Bad("text is not valid Unicode") from None
        try:
            return tok.encode_text(text) if plain else tok.encode(text)
        except AhnError:
            raise _Bad("text is not valid Unicode") from None

    def text(self, text) -> tuple[list[int], list[bool]]:
        if not isinstance(text, str):
            raise _Bad("text is not a string")
        ids = self.encode(text)
        return ids, [True] * len(ids)

    def messages(self, msgs) -> tuple[list[int], list[bool]]:
        from ..serve.prompt import content_text
        from ..tokenizer import QWEN25_DEFAULT_SYSTEM
        if not isinstance(msgs, list) or not msgs:
            raise _Bad("messages is not a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), (str, list)):
                raise _Bad("a message is not {role: system|user|assistant, content: string or text parts}")
        try:   # content parts [{"type": "text", "text": ...}] joined by newlines, as generate and the server read them
            msgs = [{"role": m["role"], "content": content_text(m, i, m["role"])} for i, m in enumerate(msgs)]
        except AhnError:
            raise _Bad("a message's content holds a part that is not text") from None
        if not any(m["role"] == "assistant" and m["content"] for m in msgs) and self.loss_on == "assistant":
            raise _Bad("no assistant message to learn from")
        self.check_chatml()
        # (text, loss target, plain): a message's content that spells a special token ("<|im_end|>\n
        # <|im_start|>system" in a conversation about chat templates) is encoded apart, as plain text, as the
        # server's chat_prompt encodes it; read as those tokens it closed its turn and forged another
        segments: list[tuple[str, bool, bool]] = []
        if msgs[0]["role"] != "system" and self.family == "qwen2":
            segments.append((f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n", False, False))
        for m in msgs:
            learn = m["role"] == "assistant"
            head = "" if learn else f"<|im_start|>{m['role']}\n"
            if learn:
                segments.append(("<|im_start|>assistant\n", False, False))
            if self.tok.has_special_text(m["content"]):
                segments += [(head, False, False), (m["content"], learn, True), ("<|im_end|>\n", learn, False)]
            else:
                segments.append((head + m["content"] + "<|im_end|>\n", learn, False))
        ids: list[int] = []
        mask: list[bool] = []
        for text, learn, plain in segments:
            piece = self.encode(text, plain=plain)
            ids += piece
            mask += [learn or self.loss_on == "all"] * len(piece)
        return ids, mask

    def check_chatml(self):
        """AhnError unless the tokenizer has the ChatML tokens: without them a messages record's template was
        spelled in ordinary tokens (<, |, im, _start, ...), a chat format the model never saw."""
        if self._chatml:
            return
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if self.tok.token_id(t) is None]
        if missing:
            raise AhnError(f"the data has messages records, but tokenizer {self.tokenizer_path} has no "
                           f"{' or '.join(missing)} token for their ChatML template; give the model's "
                           "tokenizer.json as --tokenizer, or write the records as {\"text\"} or {\"input_ids\"}")
        self._chatml = True


def parse_record(line: str, vocab_size: int, encoder: _Encoder) -> tuple[list[int], list[bool], list[float] | None]:
    """(ids, loss mask, loss weights or None) of one JSONL line; raises _Bad (skipped, counted under its
    message). A token of weight 0 is no loss target."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise _Bad("invalid JSON") from None
    except ValueError:      # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise _Bad("a number with too many digits") from None
    if not isinstance(rec, dict):
        raise _Bad("not a JSON object")
    rec = {k: v for k, v in rec.items() if v is not None}   # a null field is an absent one
    weights = None
    if "input_ids" in rec:
        ids = _int_list(rec["input_ids"], "input_ids")
        if rec.get("labels") is not None:
            labels = _int_list(rec["labels"], "labels")
            if len(labels) != len(ids):
                raise _Bad("labels and input_ids differ in length")
            if any(lab != IGNORE_INDEX and lab != t for lab, t in zip(labels, ids)):
                raise _Bad("a label is neither -100 nor its token id")
            mask = [lab != IGNORE_INDEX for lab in labels]
        else:
            mask = [True] * len(ids)
        if rec.get("loss_weights") is not None:
            weights = _weight_list(rec["loss_weights"], len(ids))
            mask = [m and w > 0 for m, w in zip(mask, weights)]
    elif "loss_weights" in rec:
        raise _Bad("loss_weights needs input_ids")
    elif "messages" in rec:
        ids, mask = encoder.messages(rec["messages"])
    elif "text" in rec:
        ids, mask = encoder.text(rec["text"])
    else:
        raise _Bad("no input_ids, messages or text field")
    if not ids:
        raise _Bad("empty")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise _Bad("token id outside the vocabulary")
    return ids, mask, weights


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DataStats:
    lines: int = 0
    used: int = 0
    truncated: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)   # reason -> count

    def line(self) -> str:
        parts = [f"{self.used} of {self.lines} records used"]
        if self.truncated:
            parts.append(f"{self.truncated} cut at --seq-len")
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())))
        return "; ".join(parts)


class Dataset:
    """Usable sequences, stored flat: ``ids`` int32, ``mask`` bool (token is a loss target), ``offsets``,
    ``weights`` float32 (the loss weight of each token; None when every weight is 1); ``fingerprint``:
    sha256 of them."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, stats: DataStats,
                 fingerprint: str = "", weights: torch.Tensor | None = None):
        self.ids, self.mask, self.offsets, self.weights = ids, mask, offsets, weights
        self.stats = stats
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def seq(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b].long(), self.mask[a:b]

    def seq_weights(self, i: int) -> torch.Tensor | None:
        """The loss weights of sequence i (float32), or None when the data set has none."""
        if self.weights is None:
            return None
        return self.weights[int(self.offsets[i]):int(self.offsets[i + 1])]

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()


def _wide_text(head: bytes) -> str | None:
    """"UTF-16" / "UTF-32" when the file starts with that encoding's byte order mark (PowerShell's ``>``
    writes UTF-16), else None."""
    if head in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        return "UTF-32"
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "UTF-16"
    return None


def _opens_an_array(raw: bytes) -> bool:
    """The first line of a file that is one JSON array of records (``json.dump`` of a list), not JSONL: a
    lone ``[``, a ``[{...`` that does not parse on its own (more lines follow), or a whole array holding
    objects. A line such as ``[1, 2]`` or ``[]`` is an ordinary bad record."""
    line = raw.strip()
    if not line.startswith(b"["):
        return False
    try:
        value = json.loads(line)
    except ValueError:           # JSONDecodeError, UnicodeDecodeError, too many digits
        return line == b"[" or line[1:].lstrip().startswith(b"{")
    except RecursionError:
        return False
    return isinstance(value, list) and any(isinstance(v, dict) for v in value)


def _beside(path: Path) -> Path:
    """Where a converted copy of the data file ``path`` goes in the command an error suggests: the .jsonl
    of the same name, never ``path`` itself (``jq ... d.jsonl > d.jsonl`` empties the file before jq reads it)."""
    jsonl = path.with_suffix(".jsonl")
    return jsonl if jsonl != path else path.with_name(f"{path.stem}.lines.jsonl")


def load_dataset(path, *, vocab_size: int, seq_len: int, budget: BudgetSpec, min_len: int = 0,
                 tokenizer_path=None, family: str = "qwen2", loss_on: str = "assistant") -> Dataset:
    """Read and check every record of the JSONL file ``path``. Raises AhnError (one line) when the file is
    missing, empty, has no usable record, or every sequence is shorter than the window."""
    path = Path(os.fspath(path))
    if not path.exists():
        raise AhnError(f"data file not found: {path}")
    if path.is_dir():
        raise AhnError(f"--data {path} is a folder; give a .jsonl file")
    encoder = _Encoder(tokenizer_path, family, loss_on, vocab_size)
    stats = DataStats()
    ids_buf, mask_buf, offsets = array("i"), array("b"), [0]
    weight_buf = None   # array("f") from the first record with loss_weights on (earlier tokens: 1)
    longest = 0
    try:
        with open(path, "rb") as f:
            # peek, not read + seek: --data may be a pipe (<(zcat d.jsonl.gz), /dev/stdin), which cannot seek
            head = f.peek(4)[:4]
            if head[:2] == b"\x1f\x8b":
                # gunzip -k refuses a file whose name does not end in .gz ("unknown suffix -- ignored")
                how = (f"gunzip -k {shlex.quote(str(path))}" if path.suffix == ".gz"
                       else f"gunzip -c {shlex.quote(str(path))} > {shlex.quote(str(_beside(path)))}")
                raise AhnError(f"--data {path} is gzip-compressed; decompress it first ({how}) and "
                               "give the .jsonl file")
            if (name := _wide_text(head)) is not None:
                raise AhnError(f"--data {path} is {name} text; save it as UTF-8 (one JSON object per line) and "
                               "give that file")
            for i, raw in enumerate(f):
                if i == 0:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")   # a UTF-8 byte order mark (Windows editors)
                if not raw.strip():
                    continue
                if stats.lines == 0 and _opens_an_array(raw):
                    raise AhnError(f"--data {path} is one JSON array, not JSONL (one JSON object per line); "
                                   f"convert it first (jq -c '.[]' {shlex.quote(str(path))} > "
                                   f"{shlex.quote(str(_beside(path)))}) and give the .jsonl file")
                stats.lines += 1
                try:
                    ids, mask, weights = parse_record(raw.decode("utf-8"), vocab_size, encoder)
                except UnicodeDecodeError:
                    stats.skipped["not UTF-8"] += 1
                    continue
                except _Bad as e:
                    stats.skipped[str(e)] += 1
                    continue
                if len(ids) < min_len:
                    stats.skipped["shorter than --min-len"] += 1
                    continue
                if len(ids) > seq_len:
                    ids, mask = ids[:seq_len], mask[:seq_len]
                    weights = None if weights is None else weights[:seq_len]
                    stats.truncated += 1
                L = len(ids)
                longest = max(longest, L)
                # a loss position t needs t >= S + W and token t + 1 a target
                wt = budget.smallest(L)
                last_target = next((t for t in range(L - 1, 0, -1) if mask[t]), -1)
                if last_target < 1:
                    stats.skipped["no loss target" + (" within --seq-len" if L == seq_len else "")] += 1
                    continue
                if wt is None or last_target - 1 < wt:
                    stats.skipped["shorter than the window"] += 1
                    continue
                if weights is not None and weight_buf is None:
                    weight_buf = array("f", [1.0]) * len(ids_buf)
                if weight_buf is not None:
                    weight_buf.extend(weights if weights is not None else [1.0] * len(ids))
                ids_buf.extend(ids)
                mask_buf.extend(mask)
                offsets.append(len(ids_buf))
                stats.used += 1
    except OSError as e:
        raise AhnError(f"cannot read data file {path}: {e.strerror or e}") from None
    if stats.lines == 0:
        raise AhnError(f"data file {path} is empty")
    if stats.used == 0:
        if stats.skipped["shorter than the window"]:
            raise AhnError(f"sequence shorter than the window: none of the {stats.lines} records of {path} "
                           f"has a loss position past the window (longest {longest} tokens; window "
                           f"{budget.describe()}); lower the window or raise --seq-len")
        raise AhnError(f"data file {path} has no usable record ({DataStats.line(stats)})")
    # The fingerprint covers what training sees (tokens, loss mask, boundaries), so a resume notices a
    # changed file, tokenizer, --seq-len or --min-len alike.
    h = hashlib.sha256()
    for buf in (ids_buf, mask_buf, array("q", offsets)) + ((weight_buf,) if weight_buf is not None else ()):
        h.update(buf)
    ids_t = torch.frombuffer(ids_buf, dtype=torch.int32).clone() if len(ids_buf) else torch.zeros(0, dtype=torch.int32)
    mask_t = torch.frombuffer(mask_buf, dtype=torch.int8).clone().bool()
    weights_t = torch.frombuffer(weight_buf, dtype=torch.float32).clone() if weight_buf is not None else None
    return Dataset(ids_t, mask_t, torch.tensor(offsets, dtype=torch.int64), stats, h.hexdigest(), weights_t)


# ----------------------------------------------------------------------------------------------
# Order and batches
# ----------------------------------------------------------------------------------------------
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the n sequences in ``epoch``: a shuffle seeded by (seed, epoch) alone, so it is the
    same on every rank and after a resume."""
    order = list(range(n))
    random.Random(f"ahn_rt.train:{seed}:{epoch}").shuffle(order)
    return order


@dataclasses.dataclass
class Cursor:
    """The data position: the next sequence is ``epoch_order(n, seed, epoch)[pos]``."""
    epoch: int = 0
    pos: int = 0
    _cache: tuple | None = dataclasses.field(default=None, repr=False, compare=False)

    def _order(self, n_seqs: int, seed: int) -> list[int]:
        key = (n_seqs, seed, self.epoch)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, epoch_order(n_seqs, seed, self.epoch))
        return self._cache[1]

    def take(self, n_seqs: int, count: int, seed: int) -> list[int]:
        """The next ``count`` sequence indices (crossing into the next epoch when needed); advances."""
        out: list[int] = []
        order = self._order(n_seqs, seed)
        while len(out) < count:
            if self.pos >= n_seqs:
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order(n_seqs, seed)
            k = min(count - len(out), n_seqs - self.pos)
            out += order[self.pos:self.pos + k]
            self.pos += k
        return out


@dataclasses.dataclass
class MicroBatch:
    ids: torch.Tensor       # int64 [B, L], right-padded with PAD_ID
    window: torch.Tensor    # int64 [B]
    sinks: torch.Tensor     # int64 [B]
    valid: torch.Tensor     # bool [B, L]: loss positions (t >= S + W and token t + 1 a target)
    labels: torch.Tensor    # int64 [B, L], Hugging Face convention (unshifted): token t where it is a
                            # target, else -100 (padding included); position t predicts labels[t + 1]
    tokens: int             # real (non-padding) tokens
    weight: torch.Tensor | None = None   # float32 [B, L]: position t's loss weight (token t + 1's); None: all 1

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    @property
    def loss_mass(self) -> float:
        """The sum of the loss positions' weights (their count when unweighted): what the step's weighted
        mean divides by."""
        if self.weight is None:
            return float(self.n_valid)
        return float((self.weight * self.valid).sum(dtype=torch.float64))

    def to(self, device) -> "MicroBatch":
        return dataclasses.replace(self, ids=self.ids.to(device), window=self.window.to(device),
                                   sinks=self.sinks.to(device), valid=self.valid.to(device),
                                   labels=self.labels.to(device),
                                   weight=None if self.weight is None else self.weight.to(device))


PAD_ID = 0


def collate(seqs: list[tuple[torch.Tensor, torch.Tensor]], budgets: list[tuple[int, int]],
            weights: list[torch.Tensor | None] | None = None) -> MicroBatch:
    """Right-pad ``seqs`` ((ids, mask) pairs) to the longest; ``budgets`` the (W, S) of each; ``weights``
    the per-token loss weights of each (None, or None entries: all 1)."""
    B = len(seqs)
    L = max(ids.numel() for ids, _ in seqs)
    ids = torch.full((B, L), PAD_ID, dtype=torch.int64)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.int64)
    valid = torch.zeros(B, L, dtype=torch.bool)
    pos = torch.arange(L - 1)
    for b, ((x, m), (w, s)) in enumerate(zip(seqs, budgets)):
        n = x.numel()
        ids[b, :n] = x
        labels[b, :n] = torch.where(m, x, torch.full_like(x, IGNORE_INDEX))
        valid[b, :L - 1] = (labels[b, 1:] != IGNORE_INDEX) & (pos >= w + s)
    weight = None
    if weights is not None and any(wt is not None for wt in weights):
        weight = torch.zeros(B, L, dtype=torch.float32)
        for b, ((x, _), wt) in enumerate(zip(seqs, weights)):
            n = x.numel()
            weight[b, :n - 1] = 1.0 if wt is None else wt[1:n].float()   # position t weighs token t + 1
    window = torch.tensor([w for w, _ in budgets], dtype=torch.int64)
    sinks = torch.tensor([s for _, s in budgets], dtype=torch.int64)
    return MicroBatch(ids, window, sinks, valid, labels, sum(x.numel() for x, _ in seqs), weight)
