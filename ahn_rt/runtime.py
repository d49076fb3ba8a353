"""The Python API: ``ahn_rt.load`` -> ``Model`` -> ``Session``; ``Model.generate`` streams text."""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

from . import ops
from . import weights as weights_mod
from .cache import State, StatePool, refuse_torn, shared_pool
from .cli import refuse_empty
from .config import Config, resolve_runtime
from .devices import parse_device
from .errors import AhnError, NonFiniteLogits, as_int, int_arg, unordered
from .graph import Stepper, batch_step
from .model import Decoder
from .sampling import (MAX_LOGPROBS, NON_FINITE, LogprobTaker, PromptScorer, Sampler, SamplingParams,
                       TokenLogprob)
# for the type hints (light modules: the standard library and torch)
from .serve.prefix_cache import PrefixCache
from .serve.prompt import Prompt
from .serve.scheduler import AsyncGeneration, Scheduler
from .tokenizer import Tokenizer, check_text

# Prompt tokens per prefill chunk (chunk_size=None): on CUDA 4096, measured at the 3B shape on an H100
# (bench/README.md, twenty-first session: pp131072 4.24-4.29 s at 4096 against 4.27-4.36 s at 8192, 4.36 s at
# 2048 and 4.54 s at 16384; peak above the weights 1.60 GiB against 1.93, 1.45 and 2.60): as fast as 8192
# with a third of a GiB less; on the CPU 2048, which bounds the reference attention's score blocks.
DEFAULT_CHUNK = {"cuda": 4096, "cpu": 2048}

# What the API takes as token ids (Session.forward, Model.step) and as a prompt (generate, agenerate, prefill).
TokenIds = Union[Sequence[int], torch.Tensor]
PromptLike = Union[str, Sequence[int], Sequence[dict], torch.Tensor, "Prompt"]


def _device(device) -> torch.device:
    """The model's device (``devices.parse_device``), always with an index on CUDA ("cuda" ->
    "cuda:<current>"), so that worker threads (the scheduler) can make it their current device."""
    dev = parse_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _outside_vocabulary(token: int, vocab_size: int) -> AhnError:
    return AhnError(f"token id {token} is outside the vocabulary [0, {vocab_size})")


def _logprobs_arg(k, name: str) -> int | None:
    """``logprobs`` / ``prompt_logprobs``: None (off) or an integer 0..MAX_LOGPROBS (AhnError naming it)."""
    k = int_arg(k, name, minimum=0, optional=True)
    if k is not None and k > MAX_LOGPROBS:
        raise AhnError(f"{name} must be at most {MAX_LOGPROBS} (the most likely tokens listed per step), got {k}")
    return k


def _check_chunk(chunk_size, device: torch.device) -> int:
    if chunk_size is None:
        return DEFAULT_CHUNK[device.type]
    return int_arg(chunk_size, "chunk_size")


class _ChunkSize:
    """``chunk_size`` of a Model or Session, checked when set (``s.chunk_size = 0`` failed later, in the
    next prefill, with range()'s ValueError); None sets the default (a session's: its model's)."""

    def __set_name__(self, owner, name):
        self.attr = "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.attr)

    def __set__(self, obj, value):
        if isinstance(obj, Model):
            value = _check_chunk(value, torch.device(obj.device))
        else:
            value = obj.model.chunk_size if value is None else _check_chunk(value, obj.model.device)
        setattr(obj, self.attr, value)


def load(weights: str | os.PathLike, ahn: str | os.PathLike | None = None, window: int | None = None,
         sinks: int | None = None, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
         mode: str | None = None, chunk_size: int | None = None,
         tokenizer: str | os.PathLike | None = None) -> "Model":
    """Load a Qwen2/Qwen2.5/Qwen3 checkpoint (with or without AHN weights) for inference.

    weights: a .safetensors file or a Hugging Face checkpoint folder; ahn: a separate AHN checkpoint;
    window / sinks: override the config (defaults: config's sliding_window / num_attn_sinks, else
    32640 / 128); dtype: torch dtype or name (default: the checkpoint's); mode: 'ahn' (default with AHN
    weights), 'swa' (sinks + window only) or 'full' (base model, growing cache); tokenizer: a
    tokenizer.json or a folder holding one (default: the one beside the weights, needed only for text in/out).
    """
    for name, value in (("weights", weights), ("ahn", ahn), ("tokenizer", tokenizer)):
        if (value is not None or name == "weights") and not isinstance(value, (str, os.PathLike)):
            raise AhnError(f"{name} must be a path (str or pathlib.Path), got {type(value).__name__}"
                           + ("; the demo model is in weights/demo of the repository" if value is None else ""))
        # '' was the current folder ("no model.safetensors ... in .") or, as tokenizer, no tokenizer at all
        refuse_empty(value if isinstance(value, str) else None, name,
                     "a tokenizer.json file (or None)" if name == "tokenizer" else
                     "a .safetensors file or a checkpoint folder" + (" (or None)" if name == "ahn" else ""))
    tok = Path(os.fspath(tokenizer)).expanduser() if tokenizer is not None else None
    # a folder holding a tokenizer.json is taken, as the train command and Tokenizer.from_file take it (a folder
    # here was "tokenizer not found", though it was there)
    if tok is not None and not (weights_mod.path_exists(tok, "tokenizer")
                                and (tok.is_file() or (tok / "tokenizer.json").is_file())):
        # the same words for the API's tokenizer= and the CLI's --tokenizer; /dev/null or a fifo exists, unlike
        # a typo, so it is not "not found"
        where = (f"no tokenizer.json in the folder {tokenizer}" if tok.is_dir() else
                 f"tokenizer is not a regular file: {tokenizer}" if os.path.exists(tok) else
                 f"tokenizer not found: {tokenizer}")
        raise AhnError(f"{where} (give the path of a tokenizer.json file, "
                       "or leave the tokenizer out to use the one beside the weights)")
    ckpt = weights_mod.open_checkpoint(weights, ahn)
    model = _build(ckpt, window=window, sinks=sinks, dtype=dtype, device=device, mode=mode, chunk_size=chunk_size)
    model.folder = ckpt.folder
    model._tokenizer_path = Path(os.fspath(tokenizer)).expanduser() if tokenizer else ckpt.folder / "tokenizer.json"
    model.eos_ids()   # read (and checked) now, not on every request
    return model


def from_state_dict(cfg: dict, tensors: dict, window=None, sinks=None, dtype=None, device=None, mode=None,
                    chunk_size: int | None = None) -> "Model":
    """A Model from a config dict and tensors under checkpoint key names (no file)."""
    return _build(weights_mod.Checkpoint.from_tensors(cfg, tensors), window=window, sinks=sinks, dtype=dtype,
                  device=device, mode=mode, chunk_size=chunk_size)


def _build(ckpt, *, window, sinks, dtype, device, mode, chunk_size) -> "Model":
    """Resolve the runtime configuration once, then load the tensors it needs."""
    dev = _device(device)
    chunk_size = _check_chunk(chunk_size, dev)
    config = resolve_runtime(ckpt.config, window=window, sinks=sinks, mode=mode, dtype=dtype, has_ahn=ckpt.has_ahn)
    ops.note_backend()
    return Model(config, weights_mod.load_weights(config, ckpt, dev), dev, chunk_size=chunk_size)


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB': three significant digits in the largest unit that keeps the number >= 1."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    if i == 0:
        return f"{int(n)} B"
    return f"{n:.{0 if n >= 100 else 1 if n >= 10 else 2}f} {units[i]}"


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    state_bytes: int = 0
    backend: str = "ext"
    cached_tokens: int = 0      # prompt tokens taken from the prefix cache instead of prefilled

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        # the first new token comes out of the prefill; the rest are decode steps
        steps = max(0, self.new_tokens - 1)
        return steps / self.decode_s if self.decode_s else 0.0

    def line(self) -> str:
        # with at most one new token there was no decode step: no rate to give (it read "at 0.0 tok/s")
        rate = f" at {self.decode_tps:.1f} tok/s" if self.new_tokens > 1 and self.decode_s else " (no decode step)"
        line = (f"[ahn_rt] prompt {self.prompt_tokens} tok, prefill {self.prefill_tps:.1f} tok/s, "
                f"decode {self.new_tokens} tok{rate}, state {human_bytes(self.state_bytes)}")
        if self.cached_tokens:
            line += f", {self.cached_tokens} prompt tok from the prefix cache"
        if self.backend != "ext":
            line += f" [{ops.backend_note()}]"
        return line


class Generation:
    """The iterator ``Model.generate`` returns: text pieces as they are produced. ``stats`` belongs to
    this call alone. Closing it (``close()``, leaving ``with``, or dropping it) stops at the next token and
    frees its session.
    ``finish_reason``: None while running, then "stop" (end of sequence or a stop string), "length",
    "cancelled" (closed, or interrupted, before the end) or "error" (an exception ended it).
    ``logprobs``: None unless ``generate(..., logprobs=k)``; then a list of ``TokenLogprob``, one per generated
    token, filled as the pieces are produced: when a piece is handed out, the list holds the entries of every
    token whose text has been handed out so far (a token is listed with the piece that completes its text)."""

    def __init__(self, pieces: Iterator[str], stats: GenerationStats, run: "_Run | None" = None,
                 logprobs: "list[TokenLogprob] | None" = None):
        self._pieces = pieces
        self.stats = stats
        self._run = run
        self.logprobs = logprobs
        self._reading = threading.Lock()   # held by the thread inside next(): one reader at a time

    @property
    def finish_reason(self) -> str | None:
        return self._run.finish_reason if self._run is not None else None

    @property
    def prompt_logprobs(self) -> "list[TokenLogprob | None] | None":
        """With ``generate(..., prompt_logprobs=k)``, once the prefill has ended: one entry per prompt token (None
        for the first); else None."""
        return self._run.prompt_logprobs if self._run is not None else None

    @property
    def prompt_text(self) -> str | None:
        """With ``prompt_logprobs``, once the prefill has ended: the prompt's text, which their offsets count in."""
        return self._run.prompt_text if self._run is not None else None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if not self._reading.acquire(blocking=False):
            raise AhnError("this generation is being read by another thread; read it from one thread "
                           "(close() from any thread stops it)")
        try:
            return next(self._pieces)
        finally:
            self._reading.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stop at the next token and free the session. From the reading thread (or none) the generator
        closes at once; from another thread while one is inside ``next()`` the run is marked cancelled
        and the reader stops (and frees the session) as soon as its current token lands."""
        if self._run is not None:
            self._run.abort("cancelled")   # no-op once finished; also a generation closed before it started
        if self._reading.acquire(blocking=False):
            try:
                self._pieces.close()
            finally:
                self._reading.release()


class Model:
    chunk_size = _ChunkSize()   # prompt tokens per prefill chunk of new sessions

    def __init__(self, config: Config, w, device: torch.device, *, chunk_size: int | None = None,
                 folder: Path | None = None, tokenizer_path: Path | None = None):
        self.config = config
        self.device = device
        self.chunk_size = chunk_size
        self.decoder = Decoder(config, w, device)
        self.folder = folder
        self._tokenizer_path = tokenizer_path
        self._tokenizer = None
        self._tokenizer_lock = threading.Lock()
        # generate() without a session borrows an idle one: sequential calls reuse one session (and
        # its captured decode graphs); concurrent calls each get their own.
        self._idle: list[Session] = []
        self._idle_lock = threading.Lock()
        self._local = threading.local()
        # Optional prefix cache (enable_prefix_cache) and the scheduler behind agenerate (made on first use).
        self.prefix_cache = None
        self._scheduler = None
        self._scheduler_lock = threading.Lock()
        self.decoder.warm_up(self.chunk_size)   # CUDA: the first prompt pays no one-time setup
        if self.device.type == "cuda":           # nor the lazy load of the id check's reduction kernel
            _id_range(torch.zeros(2, dtype=torch.int64, device=self.device))

    @property
    def last_stats(self) -> GenerationStats:
        """The statistics of this thread's last finished ``generate`` call."""
        return getattr(self._local, "stats", None) or GenerationStats()

    # ---- text side ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> "Tokenizer":
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from .tokenizer import Tokenizer
                if self._tokenizer_path is None:   # (it said "no tokenizer: None not found")
                    raise AhnError("no tokenizer: this model was made from tensors (from_state_dict), with no folder "
                                   "to find a tokenizer.json in; give token ids to Session.forward / Model.step, or "
                                   "load a checkpoint with ahn_rt.load(..., tokenizer=PATH)")
                if not self._tokenizer_path.exists():
                    raise AhnError(f"no tokenizer: {self._tokenizer_path} not found; pass --tokenizer PATH "
                                   "(tokenizer=...) or put tokenizer.json beside the weights")
                tok = Tokenizer.from_file(self._tokenizer_path)
                tok.check_fits(self.config.vocab_size, self._tokenizer_path, "model",
                               "give the model's own tokenizer.json (--tokenizer PATH, tokenizer=...)")
                self._tokenizer = tok
        return self._tokenizer

    def eos_ids(self) -> set[int]:
        """The end-of-sequence ids (generation_config.json, else config.json, beside the weights), read
        once: a request reads no file, and a later edit of the file does not change a running model."""
        eos = self.__dict__.get("_eos_ids")
        if eos is None or eos[0] != self.folder:
            from .tokenizer import eos_ids_from
            ids = set(eos_ids_from(self.folder)) if self.folder else set()
            eos = self._eos_ids = (self.folder, frozenset(ids or self.config.eos_token_ids))
        return set(eos[1])

    def _borrow_session(self) -> "Session":
        with self._idle_lock:
            sess = self._idle.pop() if self._idle else None
        if sess is None:
            return self.new_session()
        sess.reset()
        return sess

    def _return_session(self, sess: "Session"):
        """Park a borrowed session for the next call, or close it: at most IDLE_SESSIONS stay parked (N
        concurrent calls once left N states held for the model's life, 1.2 GB each at the 3B shape's window),
        and a full-mode cache grown past IDLE_FULL_SLOTS gives its memory back."""
        st = sess._state
        if st is not None and not (st.full and st.capacity > IDLE_FULL_SLOTS):
            with self._idle_lock:
                if len(self._idle) < IDLE_SESSIONS:
                    self._idle.append(sess)
                    return
        with contextlib.suppress(AhnError):   # (unclaimed by now: close does not refuse it)
            sess.close()

    def new_session(self, chunk_size: int | None = None, capacity: int | None = None,
                    pool: "StatePool | None" = None) -> "Session":
        """A fresh sequence. ``capacity``: full mode only, the cache slots allocated up front (it still
        grows when needed); ahn/swa states are always sinks + window. ``pool`` (from ``new_pool``): the
        state takes a free slot of it instead of its own memory (AhnError when none is free); ``close()``
        gives the slot back."""
        chunk = _check_chunk(chunk_size, self.device) if chunk_size is not None else self.chunk_size
        capacity = int_arg(capacity, "capacity", optional=True)
        if capacity is not None and self.config.mode != "full":   # it was ignored
            c = self.config
            raise AhnError(f"capacity is for mode 'full' only: a mode '{c.mode}' state always holds sinks + window = "
                           f"{c.sinks + c.window} cache slots; drop capacity (or set window / sinks at load)")
        if pool is not None and not isinstance(pool, StatePool):
            raise AhnError(f"pool must be a StatePool from model.new_pool(n), got {type(pool).__name__}")
        return Session(self, chunk, capacity, pool)

    def new_pool(self, size: int) -> "StatePool":
        """Memory for the states of ``size`` sessions, allocated now as one set of tensors (modes ahn and
        swa; a full-mode cache grows per session and has no pool). Sessions made with ``pool=`` hold a
        slot of it until ``close()``; ``pool.free`` counts the free slots, ``pool.nbytes`` its size."""
        try:
            return StatePool(self.config, self.device, size)
        except ValueError as e:
            raise AhnError(str(e)) from None

    @torch.inference_mode()
    def step(self, sessions: Sequence["Session"], tokens: TokenIds) -> torch.Tensor:
        """One decode step for several sessions at once: ``tokens[b]`` (a list of ints or an integer
        tensor [B]) is fed to ``sessions[b]``; returns float32 logits [B, vocab] and advances every
        session by one. Row b equals ``sessions[b].forward([tokens[b]])`` bit for bit, whatever the batch
        and its neighbours (each GEMV row keeps its own reduction order). Sessions may stand at any
        positions; each may appear once. Sessions of one state pool (``new_pool``) step as one batch:
        each weight is read once per step for all of them, and window attention and the memory step
        run over all of them in one kernel each (on CUDA from a graph captured per batch size). Sessions
        with private states, or of several pools, and full mode (a growing cache) step one at a time,
        with the same results."""
        if unordered(sessions):   # row b of the logits is sessions[b]: a set gives the rows in no known order
            raise AhnError(f"step: sessions must be a list of Sessions, got {type(sessions).__name__}, which has no "
                           "order (row b of the logits is sessions[b]); give a list")
        try:
            if isinstance(sessions, Session):
                raise TypeError
            sessions = list(sessions)
        except TypeError:
            raise AhnError(f"step: sessions must be a list of Sessions, got {type(sessions).__name__}") from None
        if not sessions:
            raise AhnError("step: no sessions given")
        for s in sessions:
            if not isinstance(s, Session) or s.model is not self:
                raise AhnError("step: every session must be a Session of this model (model.new_session())")
        if len({id(s) for s in sessions}) != len(sessions):
            raise AhnError("step: a session appears twice; give each session once per step")
        n = len(sessions)
        if as_int(tokens) is not None:   # an int, a numpy int: one message for every scalar
            raise AhnError(f"step: tokens must be a list of {n} ints or an integer tensor [{n}] (one token per "
                           f"session), got the single {type(tokens).__name__} {tokens!r}")
        ids = sessions[0]._ids(tokens)
        if ids.numel() != n:
            raise AhnError(f"step: give one token per session: {ids.numel()} tokens for {n} sessions")
        with contextlib.ExitStack() as held:
            for s in sessions:
                held.enter_context(s._held())
            return self._step(sessions, ids)

    def _step(self, sessions: list, ids: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        states = [s.state for s in sessions]
        pool = shared_pool(states)
        if self.config.mode == "full" or (len(states) > 1 and pool is None):
            # every state before any steps (a batch's begin_writes checks them all at once): one by one, a
            # half-written one was met only in its turn, after the states before it had advanced
            refuse_torn(states)
            for st in states:   # full mode: every cache that must grow grows before any session steps
                st.ensure_capacity(st.position + 1)
            with _whole_or_refused(states):
                return torch.cat([dec.forward(st, ids[b:b + 1]) for b, st in enumerate(states)])
        # A pool's captured steps share their buffers: one step over its sessions at a time.
        with pool.step_lock if pool is not None else contextlib.nullcontext():
            logits, batch = batch_step(dec, states, ids, pool.graphs if pool is not None else sessions[0].graphs)
            batch.advance()
        return logits

    def restore(self, path: str | os.PathLike, chunk_size: int | None = None,
                pool: "StatePool | None" = None) -> "Session":
        """A new session holding the state ``Session.save`` wrote to ``path`` (in a slot of ``pool`` when
        given, as ``new_session(pool=)``). A file saved with another model, window, sinks, dtype or mode, or a
        damaged file, raises AhnError naming the problem, and takes no slot (window and sinks do nothing in
        mode 'full': a full-mode state restores whatever they were)."""
        from . import state_io
        return state_io.restore(self, path, chunk_size, pool)

    # ---- prefix cache, prefill, generation ---------------------------------------------------
    def enable_prefix_cache(self, max_bytes: int, boundary_snapshots: int = 2) -> "PrefixCache | None":
        """Keep prefilled states in an LRU of at most ``max_bytes`` (on this model's device); ``generate``,
        ``agenerate`` and ``prefill`` on a session at position 0 then reuse the longest cached prefix of
        a prompt and prefill only the rest, with logits identical to a cold prefill (see
        ``ahn_rt.serve.prefix_cache``). ``max_bytes=0`` turns it off. Returns the cache."""
        from .serve.prefix_cache import PrefixCache
        self.prefix_cache = PrefixCache(max_bytes, boundary_snapshots) if max_bytes else None
        return self.prefix_cache

    def prefill(self, prompt: PromptLike, session: "Session | None" = None, chat: bool = False,
                system: str | None = None) -> tuple["Session", torch.Tensor]:
        """Feed a prompt (text, token ids, chat messages or a ``Prompt``) into ``session`` (default: a
        new one) and return it with the float32 logits [vocab] of the last prompt position. This is the
        prefill ``generate`` runs: on a session at position 0 it uses the prefix cache when one is
        enabled, and it splits its chunks at the prompt's chunk-size multiples and chat marks."""
        self._check_session(session, "prefill")
        p = self._prompt(prompt, chat, system)
        sess = session or self.new_session()
        with sess._held():   # (a chunk that fails after the first marks the session: _Prefill.chunk)
            fill = _Prefill(self, sess, p, self.prefix_cache)
            while not fill.done:
                fill.chunk()
        return sess, fill.logits[-1].clone()

    def _prompt(self, prompt, chat=False, system=None):
        from .serve.prompt import as_prompt
        if unordered(prompt):   # a set of ids was a prompt in hash order, a dict the list of its keys
            raise AhnError("the prompt must be text, a list of token ids, a list of chat messages or a Prompt; got "
                           f"{type(prompt).__name__}, which has no order; give a list (one chat message as [message])")
        p = as_prompt(self, prompt, _bool_arg(chat, "chat"), system)
        if not p.ids:
            raise AhnError("the prompt is empty: give some text")
        lo, hi = min(p.ids), max(p.ids)
        if lo < 0 or hi >= self.config.vocab_size:
            raise _outside_vocabulary(lo if lo < 0 else hi, self.config.vocab_size)
        return p

    def _new_run(self, prompt, max_new_tokens=64, temperature=0.7, top_k=0, top_p=1.0, min_p=0.0,
                 repetition_penalty=1.0, seed=None, stop=(), chat=False, system=None, logprobs=None,
                 prompt_logprobs=None, skip_special_tokens=False) -> "_Run":
        """A generation, its arguments checked (AhnError), not started: ``generate`` runs it in the
        caller's thread, the scheduler in its worker."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        max_new_tokens = int_arg(max_new_tokens, "max_new_tokens", minimum=0)
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, (list, tuple)):   # not any iterable: a dict gave its keys, a set an arbitrary order
            stop = list(stop)
        else:
            raise AhnError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
        if any(not isinstance(s, str) or s == "" for s in stop):
            raise AhnError("stop strings must be non-empty text")
        for s in stop:      # a lone surrogate (a non-UTF-8 byte of a command line) never matches: it was ignored
            check_text(s, f"stop string {s!r}")
        logprobs, prompt_logprobs = (_logprobs_arg(v, name) for v, name in ((logprobs, "logprobs"),
                                                                            (prompt_logprobs, "prompt_logprobs")))
        if not isinstance(skip_special_tokens, bool):
            raise AhnError(f"skip_special_tokens must be true or false, got {skip_special_tokens!r:.40}")
        self.tokenizer   # needed to stream text; fail before anything runs
        return _Run(self, self._prompt(prompt, chat, system), params, max_new_tokens, stop, logprobs, prompt_logprobs,
                    skip_special_tokens)

    def _check_session(self, session, what: str):
        """AhnError unless ``session`` is None or an open Session of this model."""
        if session is None:
            return
        if not isinstance(session, Session) or session.model is not self:
            got = "a Session of another model" if isinstance(session, Session) else type(session).__name__
            raise AhnError(f"{what}: session must be a Session of this model (model.new_session()), got {got}")
        refuse_torn([session.state])   # closed or half-written: its one-line error now, not once it runs
        if session.pool is not None and not session.pool.holds(session.state):
            raise AhnError(_RELEASED)

    def generate(self, prompt: PromptLike, max_new_tokens: int = 64, temperature: float = 0.7, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed=None,
                 stop: Sequence[str] = (), chat: bool = False, system: str | None = None,
                 session: "Session | None" = None, logprobs: int | None = None,
                 prompt_logprobs: int | None = None, skip_special_tokens: bool = False) -> Generation:
        """Stream the generated text piece by piece. ``prompt`` is a string (wrapped in the ChatML
        template with ``chat``), a list of token ids, a list of chat messages ({role, content}) or a
        ``Prompt``. Arguments are checked here, before anything runs. The returned iterator's ``stats``
        (and, once it is exhausted, this thread's ``last_stats``) hold the statistics of this call. Safe
        to call from several threads at once: each call without ``session`` runs on its own session. A
        given ``session`` is held from the first piece until the generation ends or is closed (any other
        use of it meanwhile raises AhnError); ``with model.generate(...) as gen:`` closes it on leaving.
        With a prefix cache enabled, a call that starts at position 0 reuses the longest cached prefix.
        ``logprobs=k`` (0 to 20; default None: off) fills the generation's ``logprobs`` list with a
        ``TokenLogprob`` per generated token: its raw log-probability (the log-softmax of the model's float32
        logits, before repetition penalty, temperature and the top-k/p and min-p cuts) and the k most likely
        tokens of its step. The end-of-sequence token that ends a reply gets no entry, nor does a token whose
        text lies wholly in a stop string (or after it).
        ``prompt_logprobs=k`` (0 to 20; default None: off) scores the prompt itself during its prefill: once
        the first piece is out (or the iterator is exhausted), ``gen.prompt_logprobs`` is a list with one entry
        per prompt token, None for the first and then a ``TokenLogprob`` (the log-softmax of the logits at the
        previous position, at this token, and the k likeliest tokens there; ``offset`` counts characters of
        ``gen.prompt_text``). Every prompt token is prefilled (the prefix cache is bypassed); the generated
        tokens are those of the same call without it. ``max_new_tokens=0`` scores only. With both options
        the end-of-sequence token that ends the reply gets an entry in ``logprobs`` (OpenAI's and vLLM's echo).
        ``skip_special_tokens=True`` leaves special tokens the model samples (``<|im_start|>``) out of the text
        (as ``decode(..., skip_special_tokens=True)``; stop strings see the text without them); they still count
        as generated tokens and have their logprobs entries."""
        self._check_session(session, "generate")
        run = self._new_run(prompt, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                            seed, stop, chat, system, logprobs, prompt_logprobs, skip_special_tokens)
        lps = [] if logprobs is not None else None

        def pieces() -> Iterator[str]:
            sess = session or self._borrow_session()
            try:
                sess._claim("generation")
            except AhnError:
                run.abort("error")   # it ended with this error (as agenerate's does), not "still running"
                if session is None:
                    self._return_session(sess)
                raise
            try:
                run.start(sess)        # (a prompt chunk that fails after the first marks the session: _Prefill)
                while run.prefilling and not run.done:   # done: closed from another thread meanwhile
                    run.prefill_chunk()
                while True:
                    for piece, entries in run.take():
                        if entries:
                            lps.extend(entries)
                        if piece:
                            yield piece
                    if run.done:
                        break
                    run.land(int(run.launch()))   # the one host sync per token: the id is needed for text
                self._local.stats = run.stats
            except (GeneratorExit, KeyboardInterrupt):
                run.abort("cancelled")
                raise
            except BaseException:
                run.abort("error")
                raise
            finally:
                sess._unclaim()
                if session is None:
                    self._return_session(sess)

        return Generation(pieces(), run.stats, run, lps)

    @property
    def scheduler(self) -> "Scheduler":
        """The ``ahn_rt.serve.scheduler.Scheduler`` behind ``agenerate``: one worker thread that steps every
        active generation (made on first use with its defaults; ``start_scheduler`` sets it up)."""
        with self._scheduler_lock:
            if self._scheduler is None or self._scheduler.closed:
                from .serve.scheduler import Scheduler
                self._scheduler = Scheduler(self)
            return self._scheduler

    def start_scheduler(self, max_active: int = 8, max_queue: int | None = None, metrics=None,
                        prefill_tokens: int | None = None) -> "Scheduler":
        """(Re)make the scheduler with these limits: at most ``max_active`` generations hold a session at
        once, at most ``max_queue`` wait (None: no bound; a full queue raises ``QueueFull``); each loop
        of its worker prefills about ``prefill_tokens`` prompt tokens (default: one chunk)."""
        from .serve.scheduler import Scheduler
        with self._scheduler_lock:
            old = self._scheduler
            self._scheduler = Scheduler(self, max_active=max_active, max_queue=max_queue, metrics=metrics,
                                        prefill_tokens=prefill_tokens)
        if old is not None:
            old.shutdown(wait=False)
        return self._scheduler

    def agenerate(self, prompt: PromptLike, max_new_tokens: int = 64, temperature: float = 0.7, top_k: int = 0,
                  top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed=None,
                  stop: Sequence[str] = (), chat: bool = False, system: str | None = None,
                  session: "Session | None" = None, timeout: float | None = None,
                  logprobs: int | None = None, prompt_logprobs: int | None = None,
                  skip_special_tokens: bool = False) -> "AsyncGeneration":
        """``generate`` for asyncio: an async iterator of text pieces (``async for piece in ...``), run by
        the scheduler's worker, interleaved with every other active generation. Call it inside a running
        event loop; arguments are checked at once (AhnError). Closing the iterator (``await it.aclose()``,
        or leaving ``async with``) or cancelling the task that iterates stops it at the next token and
        releases its session; after ``timeout`` seconds (counted from this call, queueing included) it
        stops and raises TimeoutError. Same results as ``generate`` with the same arguments (``logprobs=k``
        too: the iterator's ``logprobs`` list is filled as its pieces are read; ``prompt_logprobs=k`` and
        ``skip_special_tokens`` too)."""
        from .serve.scheduler import AsyncGeneration
        self._check_session(session, "agenerate")
        run = self._new_run(prompt, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                            seed, stop, chat, system, logprobs, prompt_logprobs, skip_special_tokens)
        while True:
            sched = self.scheduler
            try:
                return AsyncGeneration(sched, run, session=session, timeout=timeout)
            except AhnError:
                # start_scheduler (another thread) replaced it between the two lines: the new one takes it
                if sched._closing and self._scheduler is not sched:
                    continue
                raise


def _bool_arg(value, what: str) -> bool:
    """A bool argument (numpy's too) as a Python bool; not any truthy value: chat="no" would have been True."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not (isinstance(value, bool) or numpy_bool):
        raise AhnError(f"{what} must be True or False, got {type(value).__name__} {value!r:.40}")
    return bool(value)


# generate() without a session: how many borrowed sessions stay parked between calls (the sequential caller's
# one, with its captured graphs, and one more), and the largest full-mode cache (slots) that is parked.
IDLE_SESSIONS = 2
IDLE_FULL_SLOTS = 8192


def _id_range(ids: torch.Tensor) -> tuple[int, int]:
    """(min, max) of an int64 tensor of token ids: one reduction and one host read, on its device."""
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()
    return lo, hi


@contextlib.contextmanager
def _whole_or_refused(states):
    """Around a call that moves ``states`` in several writes (a prompt's chunks, sessions stepped one after
    another): when it raises after one of them has moved (Ctrl-C or out of memory in a later chunk, or in a
    later session's step), each state that moved refuses every call until ``reset`` (``begin_writes``' mark).
    It stood past part of the tokens, whose logits the caller never got, so a retry fed them twice. (A
    generation's prompt: ``_Prefill.chunk``, which the scheduler calls too.)"""
    start = [st.position for st in states]
    try:
        yield
    except BaseException:
        for st, p in zip(states, start):
            if st.position != p:
                st.torn = True
        raise


_CLOSED = "this session is closed; make a new one with model.new_session()"
_RELEASED = ("this session's pool slot was given back with pool.release() and may hold another session now; "
             "close() it and make a new one (close() alone gives a slot back)")


def _give_back(pool: StatePool, held: list):
    """A pooled session's finalizer: its state's slot (the state in ``held`` once taken) goes back to
    ``pool``, unless ``pool.release`` freed it already (it may be another session's by now)."""
    if held:
        pool.give_back(held.pop())


class Session:
    """One sequence: its State (sinks + ring K/V, per-slot gates, memories, position) and the CUDA
    graphs captured for it."""
    chunk_size = _ChunkSize()   # prompt tokens per prefill chunk

    def __init__(self, model: Model, chunk_size: int, capacity: int | None = None, pool=None):
        self.model = model
        self.chunk_size = chunk_size
        # A pooled session that is dropped without close() still gives its slot back. The finalizer is made
        # before the slot is taken, and the slot goes into ``held`` as soon as it is: a Ctrl-C between
        # taking the slot and making the finalizer lost the slot for the pool's life.
        held: list[State] = []
        self._release = weakref.finalize(self, _give_back, pool, held) if pool is not None else None
        try:
            self._state: State | None = model.decoder.new_state(capacity, pool)
        except ValueError as e:
            raise AhnError(str(e)) from None
        if pool is not None:
            held.append(self._state)
        self.pool = pool
        # Held while the state is read or written (forward, step, a generation from its first token to its
        # end, save, fork, reset, close): a second user at the same time gets an AhnError, not a state
        # that two sequences wrote into.
        self._busy = threading.Lock()
        self._holder = "call"    # who holds _busy: "call" or "generation" (for the error's advice)
        self.graphs: dict = {}   # sampling setup -> captured decode step (ahn_rt.graph)

    @property
    def state(self) -> State:
        if self._state is None:
            raise AhnError(_CLOSED)
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is None

    def _claim(self, holder: str = "call") -> State:
        """Take the session for one use (AhnError when closed or in use elsewhere); ``_unclaim`` ends it.
        ``holder``: "call" (one forward / step / save ...) or "generation" (held until it ends)."""
        self.state   # a closed session says so (not "in use")
        if not self._busy.acquire(blocking=False):
            raise AhnError(self._busy_message())
        # Read under the lock: a close() in another thread since the check above gave the state back (a
        # pool slot may belong to another session by now), and a call must not write it.
        st = self._state
        if st is None:
            self._busy.release()
            raise AhnError(_CLOSED)
        if st.pool is not None and not st.pool.holds(st):   # its slot may be another session's by now
            self._busy.release()
            raise AhnError(_RELEASED)
        self._holder = holder
        return st

    def _busy_message(self) -> str:
        if self._holder == "generation":
            return ("this session is in use by a generation that has not finished: exhaust it or close() it "
                    "first (with model.generate(...) as gen: closes it), or fork() the session")
        return ("this session is in use by another thread's call: give each thread its own session "
                "(model.new_session() or fork())")

    def _unclaim(self):
        self._busy.release()

    @contextlib.contextmanager
    def _held(self):
        """``with s._held() as st:`` the session claimed for one call (``_claim``), released after."""
        st = self._claim()
        try:
            yield st
        finally:
            self._unclaim()

    def close(self):
        """Give the state's memory back (a pooled session's slot returns to its pool). Using the session
        afterwards raises AhnError; closing twice is harmless. A session in use (another thread's call,
        an unfinished generation) is not closed: AhnError (close the generation first)."""
        if self._state is None:
            return
        if not self._busy.acquire(blocking=False):
            raise AhnError("cannot close: " + self._busy_message())
        try:
            # The state is dropped before its slot is given back: a Ctrl-C between the two left an open
            # session on a free slot, which the next session of the pool took and both wrote.
            self._state = None
            self.graphs.clear()
            if self._release is not None:
                self._release()
        finally:
            self._busy.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def position(self) -> int:
        return self.state.position

    @property
    def state_nbytes(self) -> int:
        return self.state.nbytes

    def reset(self) -> None:
        """Back to position 0 (the captured graphs stay valid: reset moves no buffer; a full-mode cache keeps
        its grown size)."""
        with self._held() as st:
            st.reset()

    def save(self, path: str | os.PathLike) -> None:
        """Write this session's state to ``path`` (safetensors; only the occupied slots; a header with
        the format version and the fingerprint of model, window, sinks, dtype and mode). Restore it with
        ``Model.restore``; continuing from there is exactly continuing this session."""
        from . import state_io
        with self._held():
            state_io.save(self, path)

    def fork(self) -> "Session":
        """An independent copy of this session (one device copy of the fixed-size state): for branching
        a conversation or reusing a prefilled prefix. A pooled session's fork takes a slot of the same
        pool."""
        with self._held() as st:
            refuse_torn([st])   # before a pool slot is taken for the copy
            other = Session(self.model, self.chunk_size, st.capacity if st.full else None, self.pool)
            other.state.copy_from(st)
        return other

    def _ids(self, token_ids) -> torch.Tensor:
        if isinstance(token_ids, torch.Tensor):
            # any integer dtype (int64, int32, int16, uint8 ...): not bool, float or complex
            if (token_ids.dim() != 1 or token_ids.dtype == torch.bool or token_ids.is_floating_point()
                    or token_ids.is_complex()):
                raise AhnError(f"token_ids must be a 1-D integer tensor or a list of ints, got a "
                               f"{token_ids.dim()}-D {str(token_ids.dtype).replace('torch.', '')} tensor")
            if token_ids.device.type == "meta":   # no values to read: NotImplementedError in the range check
                raise AhnError("token_ids is a tensor on the meta device, which holds no values; give the ids "
                               "on the CPU or the model's device")
            ids = token_ids.to(torch.int64)
        elif isinstance(token_ids, (str, bytes, bytearray, memoryview)):
            # bytes iterate as ints: b"hi" would be fed as the ids [104, 105]
            raise AhnError(f"token_ids must be a list of ints or a 1-D integer tensor, got "
                           f"{type(token_ids).__name__}: encode text with model.tokenizer.encode first")
        elif unordered(token_ids):
            # a set was fed in hash order, a dict as its keys: a sequence the caller never wrote
            raise AhnError(f"token_ids must be a list of ints or a 1-D integer tensor, got "
                           f"{type(token_ids).__name__}, which has no order; give a list")
        else:
            try:
                items = list(token_ids)
                if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in items):
                    raise TypeError
            except TypeError:
                raise AhnError("token_ids must be a list of ints or a 1-D integer tensor") from None
            try:
                ids = torch.tensor(items, dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                # an id that int64 cannot hold (torch's "Overflow when unpacking long"): past any vocabulary,
                # and named as generate names it, not as a list that is not of ints
                bad = next((int(t) for t in items if not -2**63 <= int(t) < 2**63), None)
                if bad is None:
                    raise AhnError("token_ids must be a list of ints or a 1-D integer tensor") from None
                raise _outside_vocabulary(bad, self.model.config.vocab_size) from None
            if ids.dim() != 1:
                raise AhnError("token_ids must be a flat list of ints")
        if ids.numel() == 0:
            raise AhnError("token_ids is empty")
        lo, hi = _id_range(ids)
        if lo < 0 or hi >= self.model.config.vocab_size:
            bad = lo if lo < 0 else hi
            if bad < 0 and isinstance(token_ids, torch.Tensor) and token_ids.dtype == torch.uint64:
                bad += 2 ** 64   # the id as given (2**64 - 1 read as int64 is -1, named as "token id -1")
            raise _outside_vocabulary(bad, self.model.config.vocab_size)
        return ids.to(self.model.device)

    @torch.inference_mode()
    def forward(self, token_ids: TokenIds, last_only: bool = False) -> torch.Tensor:
        """Feed tokens (in chunks of chunk_size); returns float32 logits [len, vocab] for every
        position (or [1, vocab] for the last one with ``last_only``) and advances the state."""
        last_only = _bool_arg(last_only, "last_only")
        ids = self._ids(token_ids)
        with self._held():
            return self._forward(ids, last_only)

    def _forward(self, ids: torch.Tensor, last_only: bool = False, scorer: PromptScorer | None = None) -> torch.Tensor:
        """``forward`` of checked ids on a session the caller has claimed (``scorer``: the prompt's
        log-probabilities are taken chunk by chunk, ``Decoder.prefill``)."""
        dec = self.model.decoder
        st = self.state
        if ids.numel() > self.chunk_size:   # full mode: the cache grows once, before any chunk is written
            st.ensure_capacity(st.position + ids.numel())
        out = []
        with _whole_or_refused([st]):
            for s in range(0, ids.numel(), self.chunk_size):
                chunk = ids[s: s + self.chunk_size]
                logits = dec.forward(st, chunk, last_only=last_only, scorer=scorer)
                final = s + self.chunk_size >= ids.numel()
                if final or not last_only:
                    out.append(logits)
        return out[0] if len(out) == 1 else torch.cat(out)

    def stepper(self, sampler: Sampler):
        """A ``Stepper``: token -> next token (both int64 [1] on the device), one decode step and a
        sample; its ``logits`` are those of the last step. On CUDA it replays a captured graph
        (ahn_rt.graph); elsewhere it runs eagerly. Logits holding NaN/inf give -1 (``sampling.NON_FINITE``),
        never a token: check the id before feeding it back."""
        return Stepper(self, sampler)


class _Prefill:
    """A prompt's prefill into a session, one chunk per ``chunk()``.

    On a session at position 0 the chunks end at every multiple of the chunk size and at every mark of
    the prompt (``ahn_rt.serve.prefix_cache.schedule``); with a prefix cache, the longest cached prefix
    on that schedule is copied in first and snapshots are stored on the way. On a session that already
    holds tokens the chunks are counted from the call's first token, as ``Session.forward`` does.

    With a ``scorer`` (prompt log-probabilities) every prompt token is prefilled: the prefix cache is neither
    looked up (a cached prefix has no logits) nor stored to."""

    def __init__(self, model: Model, sess: "Session", prompt, cache=None, scorer: PromptScorer | None = None):
        from .serve.prefix_cache import make_plan, schedule
        self.sess = sess
        self.scorer = scorer
        n, C = len(prompt.ids), sess.chunk_size
        self._p0 = sess.position   # where the session stood before this prompt (see chunk)
        self.cache = cache if sess.position == 0 and scorer is None else None
        self.plan = None
        self.hit = 0
        self.logits = None
        self._snaps: set = set()
        if sess.position == 0:
            if self.cache is not None:
                self.plan = make_plan(prompt, C)
                ends = self.plan.ends
                entry = self.cache.lookup(self.plan)
                if entry is not None:
                    sess.state.load(entry.tensors, entry.position)
                    self.hit = entry.position
                    if entry.position == n:
                        self.logits = entry.logits[None]
                self._snaps = set(self.cache.snapshot_points(self.plan, self.hit))
            else:
                ends = schedule(n, C, prompt.marks)
        else:
            ends = [*range(C, n, C), n]
        self._todo = [e for e in ends if e > self.hit]
        self._at = self.hit
        # The ids still to prefill, on the host (each chunk is checked and copied): not the cached prefix.
        self.ids = torch.tensor(prompt.ids[self.hit:], dtype=torch.int64)

    @property
    def done(self) -> bool:
        return not self._todo

    @property
    def next_tokens(self) -> int:
        """Tokens in the next chunk (0 when done)."""
        return self._todo[0] - self._at if self._todo else 0

    @torch.inference_mode()
    def chunk(self):
        end = self._todo.pop(0)
        st = self.sess.state
        try:
            logits = self.sess._forward(self.sess._ids(self.ids[self._at - self.hit: end - self.hit]),
                                        last_only=True, scorer=self.scorer)
        except BaseException:
            if st.position != self._p0:   # part of the prompt is in (as ``_whole_or_refused`` marks it)
                st.torn = True
            raise
        self._at = end
        if end in self._snaps:
            self.cache.store(self.plan, end, self.sess.state, logits[-1])
        if not self._todo:
            self.logits = logits


class _Run:
    """One generation as steps: ``start(session)``, ``prefill_chunk()`` while ``prefilling``, then
    ``land(int(launch()))`` per token until ``done`` — or, stepped together with others,
    ``land(int(sample(row)))`` with the row of ``Model.step`` that fed ``next_input``; ``take()`` hands out
    the text produced so far, as (piece, logprobs) pairs. ``generate`` drives one in the caller's thread; the
    scheduler drives many, so both give the same text.

    With ``logprobs`` (k, not None) each step's raw log-probabilities are taken on the device right after the
    step (``LogprobTaker``) and read on the host in ``land``. A token's entry is handed out with the piece that
    completes its text: text held back (part of a UTF-8 character in the decoder, a possible stop string in the
    stop matcher) holds its tokens' entries back too, so the entries of all pieces, in order, are one per
    generated token. A stop string cuts the tokens whose text starts at or after the cut; one that ends the
    sequence gets no entry (except with ``prompt_logprobs``: see below). A piece may then be "" with entries (the
    last ones, their text already out).

    With ``prompt_logprobs`` (k, not None) the prefill also scores the prompt's own tokens (``PromptScorer``,
    the prefix cache bypassed): once it ends, ``prompt_logprobs`` holds one entry per prompt token (None for the
    first) and ``prompt_text`` the prompt's text, which the entries' offsets count in. The end-of-sequence token
    that ends the reply then gets an entry too (with ``logprobs``), as OpenAI and vLLM list it with ``echo``: a
    scoring client that asks for one token and drops the last entry drops that one, not a prompt token."""

    def __init__(self, model: Model, prompt, params: SamplingParams, max_new_tokens: int, stop: list,
                 logprobs: int | None = None, prompt_logprobs: int | None = None, skip_special_tokens: bool = False):
        self.model = model
        self.skip_special_tokens = skip_special_tokens
        self.prompt = prompt
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        self.stats = GenerationStats(prompt_tokens=len(prompt.ids), backend=ops.backend())
        self.session: Session | None = None
        self.done = False
        self.finish_reason: str | None = None
        self.last_token: int | None = None   # the last sampled token: never fed into the state
        self.sampled = 0                     # tokens sampled so far (the first comes from the prefill)
        self._fill: _Prefill | None = None
        self._pieces: list[tuple[str, list | None]] = []
        self._eos = model.eos_ids()
        self.logprobs = logprobs
        self._lp: LogprobTaker | None = None
        self._decoded = self._emitted = 0   # characters out of the decoder / handed out (logprobs only)
        self._held_lp: list[TokenLogprob] = []          # their text still held in the decoder
        self._wait_lp: list[tuple[TokenLogprob, int]] = []   # (entry, where its text ends): in the stop matcher
        self.prompt_logprobs_k = prompt_logprobs
        self._scorer: PromptScorer | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None   # with prompt_logprobs, once prefilled
        self.prompt_text: str | None = None

    @property
    def prefilling(self) -> bool:
        return self._fill is not None and not self._fill.done

    @property
    def next_prefill_tokens(self) -> int:
        return self._fill.next_tokens if self._fill is not None else 0

    def start(self, sess: "Session"):
        from .tokenizer import StopMatcher, StreamDecoder
        self.session = sess
        self._t0 = time.perf_counter()
        self.sampler = Sampler(self.params, self.model.config.vocab_size, self.model.device)
        self._ids_dev = torch.tensor(self.prompt.ids, device=self.model.device)
        self.sampler.observe(self._ids_dev)
        self._dec = StreamDecoder(self.model.tokenizer, skip_special=self.skip_special_tokens)
        self._stopper = StopMatcher(self.stop)
        if self.logprobs is not None:
            self._lp = LogprobTaker(self.logprobs, self.model.config.vocab_size, self.model.device)
        if self.prompt_logprobs_k is not None:
            self._scorer = PromptScorer(self._ids_dev, self.prompt_logprobs_k, self.model.config.vocab_size)
        self._fill = _Prefill(self.model, sess, self.prompt, self.model.prefix_cache, self._scorer)
        self.stats.cached_tokens = self._fill.hit
        if self._fill.done:
            self._first()

    def prefill_chunk(self):
        self._fill.chunk()
        if self._fill.done:
            self._first()

    @torch.inference_mode()
    def _first(self):
        if self.done:   # stopped from outside during the prefill (Generation.close from another thread): no text
            return
        if self._scorer is not None:
            from .tokenizer import text_offsets
            self.prompt_text, offsets = text_offsets(self.model.tokenizer, self.prompt.ids)
            self.prompt_logprobs = self._scorer.read(self.prompt.ids, offsets)
        self._tok = self.sampler.sample(self._fill.logits[-1])
        if self._lp is not None:
            self._lp.take(self._fill.logits[-1], self._tok)
        self._stepper = self.session.stepper(self.sampler)
        self.stats.prefill_s = time.perf_counter() - self._t0
        self._t1 = time.perf_counter()
        self.sampled = 1
        if self.max_new_tokens == 0:
            self._finish("length", flush=True)
        else:
            self._accept(int(self._tok))

    def launch(self) -> torch.Tensor:
        """One decode step of the last token; the next token, int64 [1] on the device (no host sync)."""
        self._tok = self._stepper(self._tok)
        if self._lp is not None:   # before the next step: a graph's logits are a buffer it overwrites
            self._lp.take(self._stepper.logits, self._tok)
        return self._tok

    @property
    def next_input(self) -> torch.Tensor:
        """The token the next decode step feeds: int64 [1] on the device."""
        return self._tok

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """A step taken outside (one row of ``Model.step``): sample the next token from its float32 logits
        [vocab], as ``launch`` does after its own step."""
        self._tok = self.sampler.sample(logits)
        if self._lp is not None:
            self._lp.take(logits, self._tok)
        return self._tok

    def land(self, tid: int):
        """The host side of a step: the sampled id, turned into text, stop strings and the end (nothing
        once the run was stopped from outside: the token is dropped)."""
        if self.done:
            return
        self.sampled += 1
        self._accept(tid)

    def take(self) -> list[tuple[str, list | None]]:
        """The (piece, logprobs) pairs produced since the last call: logprobs is None without ``logprobs``,
        else the ``TokenLogprob`` entries this piece completes (a piece is "" only when it carries entries)."""
        out, self._pieces = self._pieces, []
        return out

    def _accept(self, tid: int):
        if tid == NON_FINITE:   # the sampler's mark for logits holding NaN/inf, read with the id (no sync of its own)
            raise NonFiniteLogits(
                f"the model produced non-finite logits (NaN or inf) at generated token {self.sampled}, so no token "
                "can be sampled: the weights may hold NaN/inf (re-download or re-export the checkpoint), or the "
                "activations overflowed (with dtype fp16, try bf16)")
        self.last_token = tid
        if tid in self._eos:   # with prompt_logprobs (echo) listed, as OpenAI and vLLM: after the flushed text
            self._finish("stop", flush=True, eos=tid if self._lp is not None and self._scorer is not None else None)
            return
        self.stats.new_tokens += 1
        text = self._dec.push(tid)
        if self._lp is not None:
            self._held_lp.append(self._lp.read(tid, self._decoded))
            self._decoded_out(text)
        emit, stopped = self._stopper.push(text)
        self._emit(emit, stopped)
        if stopped:
            self._finish("stop", flush=False)
        elif self.stats.new_tokens == self.max_new_tokens:
            self._finish("length", flush=True)

    def _decoded_out(self, text: str, flushed: bool = False):
        """(logprobs) The decoder gave ``text`` (``flushed``: its last): the tokens it held are complete, their
        text ends here."""
        if text or flushed:
            self._decoded += len(text)
            self._wait_lp += [(e, self._decoded) for e in self._held_lp]
            self._held_lp = []

    def _emit(self, text: str, stopped: bool):
        """Hand out ``text``, the stop matcher's output, with the entries of the tokens whose text it completes
        (after a stop: of every token whose text starts before the cut)."""
        if self._lp is None:
            if text:
                self._pieces.append((text, None))
            return
        self._emitted += len(text)
        wait = self._wait_lp
        if stopped:
            done = [e for e, _ in wait if e.offset < self._emitted]
            wait.clear()
            self._held_lp = []
        else:
            n = 0
            while n < len(wait) and wait[n][1] <= self._emitted:
                n += 1
            done = [e for e, _ in wait[:n]]
            del wait[:n]
        if text or done:
            self._pieces.append((text, done))

    def _finish(self, reason: str, flush: bool, eos: int | None = None):
        if flush:
            rest = self._dec.flush()
            if self._lp is not None:
                self._decoded_out(rest, flushed=True)
                if eos is not None:   # the end of sequence's entry: its offset is the end of the text
                    self._wait_lp.append((self._lp.read(eos, self._decoded), self._decoded))
            tail, stopped = self._stopper.push(rest)
            tail += self._stopper.flush()
            self._emit(tail, stopped)
        self.stats.decode_s = time.perf_counter() - self._t1
        self.stats.state_bytes = self.session.state_nbytes
        self.finish_reason = reason
        self.done = True

    def abort(self, reason: str):
        """Stop here (cancelled, timed out, failed): no more text."""
        if not self.done:
            self.finish_reason = reason
            self.done = True
            if self.session is not None:
                self.stats.state_bytes = self.session.state_nbytes
