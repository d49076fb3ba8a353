"""The scheduler: one worker thread steps every active generation of a Model.

Each loop of the worker (1) admits queued generations while fewer than ``max_active`` hold a session,
(2) prefills: the generations still prefilling get their next chunk, oldest first, until the loop's
prefill budget (``prefill_tokens``, default one chunk) is spent — at least one chunk per loop — so a
burst of long prompts delays the running streams by about one chunk per token, not by whole prompts,
(3) takes one decode step for every generation that is decoding (``_step``), and (4) hands out the text,
ends finished, cancelled and timed-out generations and returns their sessions. Generations join and
leave between loops (continuous batching).

The sessions it lends live in one ``StatePool`` of ``max_active`` slots, allocated on the first
admission (ahn and swa modes; a full-mode cache grows per session and is borrowed from the model), so
the memory of every admitted generation is fixed up front. ``_step`` steps the decoding generations
together — one ``model.step(sessions, tokens)``, each generation sampling its own row with its own
sampler — where the sessions share that pool (each weight is read once for the whole batch, window
attention and the memory step run over all rows in one kernel each, on CUDA from a captured graph), and
reads every sampled id with one host sync. Sessions that do not share it (a caller's own session) step
one by one, interleaved: it launches every generation's step (``_Run.launch``: a graph replay, queued
without a host sync) and then reads every sampled id (``_Run.land``). Either way a
row of ``model.step`` equals the session's step alone bit for bit, so every generation gets exactly the
text it gets alone (tests/test_serve.py checks this under load).

``AsyncGeneration`` is what ``Model.agenerate`` returns: the worker hands events to the event loop
with ``call_soon_threadsafe``.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import numbers
import sys
import threading
import time
import traceback
import weakref

import torch

from ..cache import shared_pool
from ..errors import AhnError, int_arg


# Every scheduler made in this process (weakly): at interpreter exit each one cancels its generations and its
# worker ends before the interpreter finalizes. A daemon worker still stepping then is stopped inside a
# torch call, and the process aborts ("terminate called without an active exception", exit code 134).
_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()
_EXITING = False
_EXIT_WAIT_S = 10.0    # per worker: it finishes the loop it is in (one prefill chunk or decode step)


@atexit.register
def _stop_all_at_exit():
    global _EXITING
    _EXITING = True
    scheds = list(_LIVE)
    for s in scheds:
        s._stop()
    for s in scheds:
        s._thread.join(_EXIT_WAIT_S)


class QueueFull(AhnError):
    """Every session is busy and the queue is full (the server answers 503 with Retry-After)."""


class Ticket:
    """One submitted generation and what the worker knows about it."""

    def __init__(self, scheduler, run, sink, session, deadline, start_state, keep_state, on_end=None):
        self.scheduler = scheduler
        self.run = run
        self.sink = sink                 # called with ("text", str, logprobs) and finally ("end", reason, exc)
        self.session = session           # the caller's session, or None: borrow one from the model
        self.sess = None                 # the session in use
        self.deadline = deadline         # time.monotonic() limit, or None
        self.start_state = start_state   # (State.export() tensors, position) copied in before the prompt
        self.keep_state = keep_state     # keep a copy of the final state in ``final_state``
        self.final_state = None
        self.on_end = on_end             # called in the worker with the ticket once it has ended
        self.cancelled = False
        self.claimed = False             # the caller's session is held (Session._claim) until the end
        self.submitted = time.perf_counter()
        self.first_token_at = None
        self.last_token_at = None
        self._seen = 0
        self.ended = threading.Event()

    def cancel(self):
        self.scheduler.cancel(self)


def _wake(cv: threading.Condition):
    with cv:
        cv.notify_all()


def _work(ref, cv: threading.Condition):
    """The worker thread: one ``Scheduler._iterate`` per loop, waiting on ``cv`` while there is nothing to
    do. It ends after ``shutdown`` or once the scheduler is gone (its model was dropped)."""
    sched = ref()
    if sched is None:
        return
    sched._setup_thread()
    del sched
    while True:
        with cv:
            sched = ref()
            if sched is None:
                return
            work = sched._admit()
            if work == "exit":
                return
            if work == "wait":
                del sched, work
                cv.wait()
                continue
        sched._iterate(*work)
        del sched, work


class Scheduler:
    def __init__(self, model, max_active: int = 8, max_queue: int | None = None, metrics=None,
                 prefill_tokens: int | None = None):
        # any integer type (numpy's too), as the API's other integer arguments: errors.int_arg
        max_active = int_arg(max_active, "max_active")
        max_queue = int_arg(max_queue, "max_queue", minimum=0, optional=True)
        prefill_tokens = int_arg(prefill_tokens, "prefill_tokens", optional=True)
        self._model = weakref.ref(model)  # the model holds its scheduler; this way round, a weak reference
        self.max_active = max_active
        self.max_queue = max_queue
        self.metrics = metrics
        self.prefill_tokens = prefill_tokens or model.chunk_size
        self._cv = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._active: list[Ticket] = []
        self._closing = _EXITING         # made during interpreter exit: takes nothing, its worker ends at once
        self.closed = False
        self.pool = None                 # the StatePool of the lent sessions (made on the first admission)
        self._idle = []                  # lent sessions not in use (they keep their captured graphs)
        self._lent = 0
        # The worker holds the scheduler (and so the model) only while it works: idle, it waits on the
        # condition alone, so a model that is dropped is freed, and the worker then ends.
        self._thread = threading.Thread(target=_work, args=(weakref.ref(self), self._cv), name="ahn_rt-scheduler",
                                        daemon=True)
        weakref.finalize(self, _wake, self._cv)
        self._thread.start()
        _LIVE.add(self)

    # ---- the caller's side ----------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def sessions_in_use(self) -> int:
        """Sessions lent to generations and not yet given back (a generation with its own session does
        not count)."""
        return self._lent

    @property
    def queued(self) -> int:
        """Generations waiting for a session (not counting those about to be admitted)."""
        return max(0, len(self._waiting) - max(0, self.max_active - len(self._active)))

    def submit(self, run, sink, session=None, deadline=None, start_state=None, keep_state=False,
               on_end=None) -> Ticket:
        """Queue ``run``. ``sink`` gets ("text", piece, logprobs) events (``_Run.take``) and one ("end",
        finish_reason, exception);
        ``start_state`` (exported tensors, position) is copied into the session before the prompt;
        with ``keep_state`` a finished run leaves a copy of its final state in ``ticket.final_state``;
        ``on_end(ticket)`` runs in the worker when it ends, before the sink hears of it."""
        t = Ticket(self, run, sink, session, deadline, start_state, keep_state, on_end)
        with self._cv:
            if self._closing:
                raise AhnError("the scheduler is shutting down")
            # submissions the worker has not admitted yet wait too: only those beyond the free sessions queue
            queued = len(self._waiting) - max(0, self.max_active - len(self._active))
            if self.max_queue is not None and queued >= self.max_queue:
                raise QueueFull(f"all {self.max_active} sessions are busy and {queued} requests are queued; "
                                "retry later")
            self._waiting.append(t)
            self._cv.notify()
        return t

    def cancel(self, t: Ticket):
        """Stop ``t`` at its next step (at once if it is still queued) and release its session."""
        with self._cv:
            t.cancelled = True
            queued = t in self._waiting
            if queued:
                self._waiting.remove(t)
            self._cv.notify()
        if queued:
            self._end(t, "cancelled")

    def _drop(self, t: Ticket):
        """A generation collected unread (``AsyncGeneration.__del__``): mark it cancelled and wake the worker,
        which ends it. Nothing else is touched here: the collection may run inside the worker itself, in
        the middle of its own bookkeeping of the queue (``cancel`` there removed a ticket that ``_admit``
        was about to remove: ValueError, and the worker died)."""
        t.cancelled = True
        _wake(self._cv)

    def shutdown(self, wait: bool = True, timeout: float | None = None):
        """Finish every active and queued generation, then stop the worker; no new submissions."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if wait:
            self._thread.join(timeout)

    def _stop(self):
        """Interpreter exit: no new submissions, every queued and active generation ends "cancelled" (the
        active ones at the worker's next loop), then the worker ends."""
        with self._cv:
            self._closing = True
            queued = list(self._waiting)
            self._waiting.clear()
            for t in (*queued, *self._active):
                t.cancelled = True
            self._cv.notify_all()
        for t in queued:
            self._end(t, "cancelled")

    # ---- the worker -----------------------------------------------------------------------------
    @property
    def model(self):
        return self._model()

    def _setup_thread(self):
        model = self.model
        if model is not None and model.device.type == "cuda":
            torch.cuda.set_device(model.device)   # graph capture uses the thread's current device
            model.decoder.warm_attention(model.chunk_size)   # cuDNN's plans are per thread

    def _admit(self):
        """Under ``_cv``: "exit", "wait", or the work of one loop (the batch, and the queued that timed out or were
        dropped unread)."""
        expired = []
        now = time.monotonic()
        for t in list(self._waiting):
            if t.cancelled or (t.deadline is not None and now > t.deadline):
                self._waiting.remove(t)
                expired.append(t)
        while self._waiting and len(self._active) < self.max_active:
            self._active.append(self._waiting.popleft())
        if not self._active and not expired:
            if self._closing:
                self.closed = True
                return "exit"
            return "wait"
        return list(self._active), expired

    def _iterate(self, batch: list[Ticket], expired: list[Ticket]):
        for t in expired:
            self._end(t, "cancelled" if t.cancelled else "timeout")
        try:
            self._loop_once(batch)
        except Exception as e:  # noqa: BLE001 - a bug here must not hang every client
            traceback.print_exc(file=sys.stderr)
            for t in batch:
                if not t.ended.is_set():
                    self._end(t, "error", e)

    def _loop_once(self, batch: list[Ticket]):
        now = time.monotonic()
        decoding, budget = [], self.prefill_tokens
        for t in batch:                          # oldest first
            if t.cancelled:
                self._end(t, "cancelled")
                continue
            if t.deadline is not None and now > t.deadline:
                self._end(t, "timeout")
                continue
            run = t.run
            try:
                if t.sess is None:
                    self._begin(t)
                    if not run.prefilling:       # a whole-prompt cache hit: the first token is out already
                        self._deliver(t)
                        continue
                if run.prefilling:
                    n = run.next_prefill_tokens
                    if n > budget and budget < self.prefill_tokens:
                        continue                 # this loop's prefill budget is spent: next loop
                    budget -= n
                    run.prefill_chunk()
                elif not run.done:
                    decoding.append(t)
                    continue
            except Exception as e:  # noqa: BLE001 - the error goes to this generation's caller
                self._end(t, "error", e)
                continue
            self._deliver(t)
        for t, e in self._step(decoding):
            self._end(t, "error", e)
        for t in decoding:
            if not t.ended.is_set():
                self._deliver(t)

    def _step(self, tickets: list[Ticket]) -> list:
        """One decode token for each of ``tickets``: together in one ``model.step`` where that pays,
        otherwise interleaved. Returns the (ticket, exception) pairs that failed."""
        sessions = [t.sess for t in tickets]
        if (len(tickets) < 2 or shared_pool([s.state for s in sessions]) is None
                or len({id(s) for s in sessions}) < len(sessions)):     # a caller's session in two runs
            return self._step_each(tickets)
        try:
            # model._step: the runs own these sessions (a caller's session= is claimed for its run)
            logits = self.model._step(sessions, torch.cat([t.run.next_input for t in tickets]))
        except Exception as e:  # noqa: BLE001
            return [(t, e) for t in tickets]
        failed, sampled = [], []
        for b, t in enumerate(tickets):
            try:
                sampled.append((t, t.run.sample(logits[b]).view(1)))
            except Exception as e:  # noqa: BLE001
                failed.append((t, e))
        ids = torch.cat([tok for _, tok in sampled]).tolist() if sampled else []   # one host sync
        for (t, _), tok in zip(sampled, ids):
            try:
                t.run.land(tok)
            except Exception as e:  # noqa: BLE001
                failed.append((t, e))
        return failed

    def _step_each(self, tickets: list[Ticket]) -> list:
        """Every ticket's own step, launched back to back, then every sampled id read."""
        failed, launched = [], []
        for t in tickets:
            try:
                launched.append((t, t.run.launch()))
            except Exception as e:  # noqa: BLE001
                failed.append((t, e))
        for t, tok in launched:
            try:
                t.run.land(int(tok))    # the host sync; the launches before it are already queued
            except Exception as e:  # noqa: BLE001
                failed.append((t, e))
        return failed

    def _lend(self):
        """A session for a generation that brings none: an idle one, reset, or a new one in the pool."""
        model = self.model
        if model.config.mode == "full":
            sess = model._borrow_session()
        elif self._idle:
            sess = self._idle.pop()
            sess.reset()
        else:
            if self.pool is None:
                self.pool = model.new_pool(self.max_active)
            sess = model.new_session(pool=self.pool)
        self._lent += 1
        return sess

    def _take_back(self, sess):
        self._lent -= 1
        if sess.pool is not None and sess.pool is self.pool:
            self._idle.append(sess)
        else:
            self.model._return_session(sess)

    def _begin(self, t: Ticket):
        if t.session is not None:
            t.session._claim("generation")   # the caller's session is this generation's until it ends
            t.claimed = True
        t.sess = t.session or self._lend()
        if t.start_state is not None:
            tensors, position = t.start_state
            t.sess.state.load(tensors, position)
        t.run.start(t.sess)

    def _deliver(self, t: Ticket):
        run, m = t.run, self.metrics
        if run.sampled > t._seen:
            now = time.perf_counter()
            if t.first_token_at is None:
                t.first_token_at = now
                if m is not None:
                    self._observe("first_token", now - t.submitted, run.stats.cached_tokens)
            elif m is not None:
                self._observe("next_token", now - t.last_token_at)
            t.last_token_at = now
            t._seen = run.sampled
        for piece, entries in run.take():
            t.sink(("text", piece, entries))
        if run.done:
            self._end(t, run.finish_reason)

    def _observe(self, hook: str, *args):
        """A metrics hook. One that fails is printed, not raised: raised in ``_end``, after the session
        was given back, it ended the generation again (its session lent twice) and killed the worker."""
        try:
            getattr(self.metrics, hook)(*args)
        except Exception:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)

    def _end(self, t: Ticket, reason: str, exc: BaseException | None = None):
        run = t.run
        run.abort(reason)
        if t.sess is not None:
            if t.keep_state and exc is None and run.finish_reason in ("stop", "length"):
                try:
                    st = t.sess.state
                    t.final_state = ({k: v.clone() for k, v in st.export().items()}, st.position)
                except Exception as e:  # noqa: BLE001 - out of memory, say: this generation fails, not the step
                    t.final_state = None
                    run.finish_reason = "error"
                    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                    exc = AhnError(f"the generation's final state could not be kept ({type(e).__name__}: {msg}); "
                                   "its conversation stays as it was before this request")
            if t.session is None:
                self._take_back(t.sess)
        if t.claimed:
            t.claimed = False
            t.session._unclaim()
        with self._cv:
            if t in self._active:
                self._active.remove(t)
        if self.metrics is not None:
            self._observe("finished", run, run.finish_reason, time.perf_counter() - t.submitted)
        t.ended.set()
        if t.on_end is not None:
            try:
                t.on_end(t)
            except Exception:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
        t.sink(("end", run.finish_reason, exc))


class AsyncGeneration:
    """``async for piece in model.agenerate(...)``: text pieces from the scheduler's worker. ``stats``,
    ``logprobs``, ``prompt_logprobs``, ``prompt_text`` and ``finish_reason`` ("stop", "length", "cancelled",
    "timeout", "error") as for ``Generation``.
    ``aclose()`` (or leaving ``async with``) stops it and returns once its session is released;
    cancelling the iterating task stops it at the next token."""

    @property
    def prompt_logprobs(self):
        """With ``prompt_logprobs=k``: the prompt's entries, set by the worker before it sends the first piece
        or the end (so any piece or end read here finds them); else None."""
        return self.run.prompt_logprobs

    @property
    def prompt_text(self):
        return self.run.prompt_text

    def __init__(self, scheduler: Scheduler, run, session=None, timeout: float | None = None,
                 start_state=None, keep_state: bool = False, on_end=None):
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise AhnError("agenerate needs a running event loop: call it from async code "
                           "(use generate in plain threads)") from None
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                    or not timeout > 0):
            raise AhnError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.run = run
        self.stats = run.stats
        self.timeout = timeout
        # with logprobs=k: the TokenLogprob entries of the pieces read so far (as Generation.logprobs)
        self.logprobs = [] if run.logprobs is not None else None
        self.finish_reason: str | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ended = False
        # Set (in the event loop) once the end event has arrived, whoever reads the queue: aclose() waits on
        # this, not on the queue, where a task iterating meanwhile may take the end event first.
        self._released = asyncio.Event()
        self._end_event = None
        try:
            deadline = time.monotonic() + float(timeout) if timeout is not None else None
        except OverflowError:   # an int past every float (10**400): no limit, as float("inf")
            deadline = float("inf")
        # The worker reaches this object only through a weak reference: one that its caller drops unread
        # is collected, and __del__ cancels its generation (else it ran to max_new_tokens, holding a session).
        ref = weakref.ref(self)

        def sink(event):
            gen = ref()
            if gen is not None:
                gen._sink(event)
        self.ticket = scheduler.submit(run, sink, session=session, deadline=deadline,
                                       start_state=start_state, keep_state=keep_state, on_end=on_end)

    def _sink(self, event):
        try:
            self._loop.call_soon_threadsafe(self._on_event, event)
        except RuntimeError:   # the event loop is gone: nobody reads this generation any more
            self.ticket.cancelled = True

    def _on_event(self, event):   # in the event loop
        self._queue.put_nowait(event)
        if event[0] == "end":          # finish_reason is known now, read or not (a cancelled task reads no more)
            self._end_event = event
            self.finish_reason = event[1]
            self._released.set()

    def __aiter__(self):
        return self

    def _check_loop(self):
        # its events are delivered to the loop that called agenerate: read from another, it waited forever
        if asyncio.get_running_loop() is not self._loop:
            raise AhnError("this generation belongs to the event loop that called agenerate; read (or aclose) it "
                           "there, or call agenerate in this loop")

    async def __anext__(self) -> str:
        if self._ended:
            raise StopAsyncIteration
        self._check_loop()
        while True:
            try:
                event = await self._queue.get()
            except asyncio.CancelledError:
                self.ticket.cancel()
                raise
            if event[0] != "text":
                break
            if event[2]:
                self.logprobs.extend(event[2])
            if event[1]:   # "" only when it carries the last entries (their text is out already)
                return event[1]
        self._ended = True
        _, self.finish_reason, exc = event
        if exc is not None:
            raise exc
        if self.finish_reason == "timeout":
            raise TimeoutError(f"the generation ran past its timeout of {self.timeout} s")
        raise StopAsyncIteration

    async def aclose(self):
        """Stop now (at the worker's next step) and wait until the session is released."""
        if self._ended:
            return
        self._check_loop()
        self.ticket.cancel()
        await self._released.wait()
        self._ended = True
        self.finish_reason = self._end_event[1]

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    @property
    def final_state(self):
        return self.ticket.final_state

    def __del__(self):
        if not getattr(self, "_ended", True) and hasattr(self, "ticket"):
            try:
                self.ticket.scheduler._drop(self.ticket)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass
