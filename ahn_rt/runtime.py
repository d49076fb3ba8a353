"""The Python API: ``ahn_rt.load`` -> ``Model`` -> ``Session``; ``Model.generate`` streams text."""
from __future__ import annotations

import dataclasses
import numbers
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch

from . import ops
from . import weights as weights_mod
from .cache import State
from .config import Config, resolve_runtime
from .errors import AhnError
from .model import Decoder
from .sampling import Sampler, SamplingParams

DEFAULT_CHUNK = 2048


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AhnError(f"unknown device {device!r}; use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AhnError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise AhnError(f"device {device!r} is not supported; use cpu or cuda[:N]")
    return dev


def _check_chunk(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise AhnError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size


def load(weights, ahn=None, window=None, sinks=None, dtype=None, device=None, mode=None,
         chunk_size: int = DEFAULT_CHUNK, tokenizer=None) -> "Model":
    """Load a Qwen2/Qwen2.5/Qwen3 checkpoint (with or without AHN weights) for inference.

    weights: a .safetensors file or a Hugging Face checkpoint folder; ahn: a separate AHN checkpoint;
    window / sinks: override the config (defaults: config's sliding_window / num_attn_sinks, else
    32640 / 128); dtype: torch dtype or name (default: the checkpoint's); mode: 'ahn' (default with AHN
    weights), 'swa' (sinks + window only) or 'full' (base model, growing cache); tokenizer: a
    tokenizer.json (default: the one beside the weights, needed only for text in/out).
    """
    ckpt = weights_mod.open_checkpoint(weights, ahn)
    model = _build(ckpt, window=window, sinks=sinks, dtype=dtype, device=device, mode=mode, chunk_size=chunk_size)
    model.folder = ckpt.folder
    model._tokenizer_path = Path(tokenizer) if tokenizer else ckpt.folder / "tokenizer.json"
    return model


def from_state_dict(cfg: dict, tensors: dict, window=None, sinks=None, dtype=None, device=None, mode=None,
                    chunk_size: int = DEFAULT_CHUNK) -> "Model":
    """A Model from a config dict and tensors under checkpoint key names (no file)."""
    return _build(weights_mod.Checkpoint.from_tensors(cfg, tensors), window=window, sinks=sinks, dtype=dtype,
                  device=device, mode=mode, chunk_size=chunk_size)


def _build(ckpt, *, window, sinks, dtype, device, mode, chunk_size) -> "Model":
    """Resolve the runtime configuration once, then load the tensors it needs."""
    dev = _device(device)
    chunk_size = _check_chunk(chunk_size)
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

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        # the first new token comes out of the prefill; the rest are decode steps
        steps = max(0, self.new_tokens - 1)
        return steps / self.decode_s if self.decode_s else 0.0

    def line(self) -> str:
        line = (f"[ahn_rt] prompt {self.prompt_tokens} tok, prefill {self.prefill_tps:.1f} tok/s, "
                f"decode {self.new_tokens} tok at {self.decode_tps:.1f} tok/s, "
                f"state {human_bytes(self.state_bytes)}")
        if self.backend != "ext":
            line += f" [{ops.backend_note()}]"
        return line


class Generation:
    """The iterator ``Model.generate`` returns: text pieces as they are produced. ``stats`` belongs to
    this call alone. Closing it (or dropping it) stops at the next token and frees its session."""

    def __init__(self, pieces: Iterator[str], stats: GenerationStats):
        self._pieces = pieces
        self.stats = stats

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self):
        self._pieces.close()


class Model:
    def __init__(self, config: Config, w, device: torch.device, *, chunk_size=DEFAULT_CHUNK,
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

    @property
    def last_stats(self) -> GenerationStats:
        """The statistics of this thread's last finished ``generate`` call."""
        return getattr(self._local, "stats", None) or GenerationStats()

    # ---- text side ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from .tokenizer import Tokenizer
                if self._tokenizer_path is None or not self._tokenizer_path.exists():
                    raise AhnError(f"no tokenizer: {self._tokenizer_path} not found; pass --tokenizer PATH "
                                   "(tokenizer=...) or put tokenizer.json beside the weights")
                self._tokenizer = Tokenizer.from_file(self._tokenizer_path)
        return self._tokenizer

    def eos_ids(self) -> set[int]:
        from .tokenizer import eos_ids_from
        ids = set(eos_ids_from(self.folder)) if self.folder else set()
        return ids or set(self.config.eos_token_ids)

    def _borrow_session(self) -> "Session":
        with self._idle_lock:
            sess = self._idle.pop() if self._idle else None
        if sess is None:
            return self.new_session()
        sess.reset()
        return sess

    def _return_session(self, sess: "Session"):
        with self._idle_lock:
            self._idle.append(sess)

    def new_session(self, chunk_size: int | None = None, capacity: int | None = None) -> "Session":
        """A fresh sequence. ``capacity``: full mode only, the cache slots allocated up front (it still
        grows when needed); ahn/swa states are always sinks + window."""
        return Session(self, _check_chunk(chunk_size) if chunk_size is not None else self.chunk_size, capacity)

    def restore(self, path, chunk_size: int | None = None) -> "Session":
        """A new session holding the state ``Session.save`` wrote to ``path``. A file saved with another
        model, window, sinks, dtype or mode, or a damaged file, raises AhnError naming the problem."""
        from . import state_io
        return state_io.restore(self, path, chunk_size)

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.7, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed=None,
                 stop: Sequence[str] = (), chat: bool = False, system: str | None = None,
                 session: "Session | None" = None) -> Generation:
        """Stream the generated text piece by piece. ``prompt`` is a string (or a list of token ids).
        Arguments are checked here, before anything runs. The returned iterator's ``stats`` (and, once
        it is exhausted, this thread's ``last_stats``) hold the statistics of this call. Safe to call
        from several threads at once: each call without ``session`` runs on its own session."""
        from .tokenizer import StopMatcher, StreamDecoder, apply_chat_template
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise AhnError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop)
        if any(not isinstance(s, str) or s == "" for s in stop):
            raise AhnError("stop strings must be non-empty text")
        tok = self.tokenizer
        if isinstance(prompt, str):
            ids = tok.encode(apply_chat_template(prompt, system) if chat else prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise AhnError("the prompt is empty: give some text")
        stats = GenerationStats(prompt_tokens=len(ids), backend=ops.backend())
        eos = self.eos_ids()

        def pieces() -> Iterator[str]:
            sess = session or self._borrow_session()
            try:
                sampler = Sampler(params, self.config.vocab_size, self.device)
                sampler.observe(torch.tensor(ids, device=self.device))
                dec, stopper = StreamDecoder(tok), StopMatcher(stop)
                t0 = time.perf_counter()
                logits = sess.forward(ids, last_only=True)
                next_tok = sampler.sample(logits[-1])
                tid = int(next_tok)
                stats.prefill_s = time.perf_counter() - t0
                t1 = time.perf_counter()
                stepper = sess.stepper(sampler)
                stopped = False
                for i in range(max_new_tokens):
                    if tid in eos:
                        break
                    stats.new_tokens += 1
                    emit, stopped = stopper.push(dec.push(tid))
                    if emit:
                        yield emit
                    if stopped or i + 1 == max_new_tokens:
                        break
                    next_tok = stepper(next_tok)
                    tid = int(next_tok)   # the one host sync per token: the id is needed to stream text
                if not stopped:
                    tail, _ = stopper.push(dec.flush())
                    tail += stopper.flush()
                    if tail:
                        yield tail
                stats.decode_s = time.perf_counter() - t1
                stats.state_bytes = sess.state_nbytes
                self._local.stats = stats
            finally:
                if session is None:
                    self._return_session(sess)

        return Generation(pieces(), stats)


class Session:
    """One sequence: its State (sinks + ring K/V, per-slot gates, memories, position) and the CUDA
    graphs captured for it."""

    def __init__(self, model: Model, chunk_size: int, capacity: int | None = None):
        self.model = model
        self.chunk_size = chunk_size
        self.state: State = model.decoder.new_state(capacity)
        self.graphs: dict = {}   # sampling setup -> captured decode step (ahn_rt.graph)

    @property
    def position(self) -> int:
        return self.state.position

    @property
    def state_nbytes(self) -> int:
        return self.state.nbytes

    def reset(self):
        """Back to position 0 (the captured graphs stay valid: the buffers do not move)."""
        self.state.reset()

    def save(self, path):
        """Write this session's state to ``path`` (safetensors; only the occupied slots; a header with
        the format version and the fingerprint of model, window, sinks, dtype and mode). Restore it with
        ``Model.restore``; continuing from there is exactly continuing this session."""
        from . import state_io
        state_io.save(self, path)

    def fork(self) -> "Session":
        """An independent copy of this session (one device copy of the fixed-size state): for branching
        a conversation or reusing a prefilled prefix."""
        other = Session(self.model, self.chunk_size, self.state.capacity if self.state.full else None)
        other.state.copy_from(self.state)
        return other

    def _ids(self, token_ids) -> torch.Tensor:
        if isinstance(token_ids, torch.Tensor):
            if token_ids.dim() != 1 or token_ids.dtype not in (torch.int64, torch.int32):
                raise AhnError("token_ids must be a 1-D integer tensor or a list of ints")
            ids = token_ids.to(torch.int64)
        else:
            try:
                items = list(token_ids)
                if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in items):
                    raise TypeError
                ids = torch.tensor(items, dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError):
                raise AhnError("token_ids must be a list of ints or a 1-D integer tensor") from None
            if ids.dim() != 1:
                raise AhnError("token_ids must be a flat list of ints")
        if ids.numel() == 0:
            raise AhnError("token_ids is empty")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.model.config.vocab_size:
            raise AhnError(f"token id {lo if lo < 0 else hi} is outside the vocabulary "
                           f"[0, {self.model.config.vocab_size})")
        return ids.to(self.model.device)

    @torch.inference_mode()
    def forward(self, token_ids, last_only: bool = False) -> torch.Tensor:
        """Feed tokens (in chunks of chunk_size); returns float32 logits [len, vocab] for every
        position (or [1, vocab] for the last one with ``last_only``) and advances the state."""
        ids = self._ids(token_ids)
        dec = self.model.decoder
        out = []
        for s in range(0, ids.numel(), self.chunk_size):
            chunk = ids[s: s + self.chunk_size]
            logits = dec.forward(self.state, chunk, last_only=last_only)
            final = s + self.chunk_size >= ids.numel()
            if final or not last_only:
                out.append(logits)
        return out[0] if len(out) == 1 else torch.cat(out)

    def stepper(self, sampler: Sampler):
        """A ``Stepper``: token -> next token (both int64 [1] on the device), one decode step and a
        sample; its ``logits`` are those of the last step. On CUDA it replays a captured graph
        (ahn_rt.graph); elsewhere it runs eagerly."""
        from .graph import Stepper
        return Stepper(self, sampler)
