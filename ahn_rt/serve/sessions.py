"""Conversations kept server-side: the ``session_id`` extension of the HTTP API.

A conversation is the state after its last request (prompt and generated tokens) plus the last sampled
token, which a generation never feeds into its state (the next request feeds it first, or closes the
assistant turn with it). Conversations live on the model's device in an LRU bounded by bytes. With a
state directory every finished request also writes the conversation to ``DIR/<id>.safetensors`` through
``Session.save`` (and ``DIR/<id>.json`` for the token bookkeeping), in a background thread, so a restarted
server continues it through ``Model.restore``; without one, a conversation evicted from memory is gone
and a request naming it gets 404.

One request at a time per conversation: ``checkout`` marks it busy (a second request gets
``SessionBusy``, 409) until ``checkin`` (the request finished: the new state) or ``release`` (it failed
or was cancelled: the conversation stays as it was). A request whose client went away is ``closing``
until its run stops at its next token and releases the conversation: a request in that moment (a client
that dropped a stream and asks again) waits for the release instead of getting 409.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue
import re
import sys
import threading
import traceback
from pathlib import Path

from ..errors import AhnError

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")   # fullmatch: with match and $, "abc\n" passed
META_VERSION = 1


class SessionBusy(AhnError):
    """Another request is using this conversation."""


class SessionLost(AhnError):
    """The conversation was evicted from memory and there is no state directory."""


@dataclasses.dataclass
class Conversation:
    tensors: dict            # State.export() of the state, cloned
    position: int
    last_token: int | None   # sampled but not in the state
    chat_open: bool          # the state ends inside an assistant turn (a chat request's reply)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def check_session_id(sid) -> str:
    if not isinstance(sid, str) or not SESSION_ID.fullmatch(sid):
        raise AhnError("session_id must be 1-128 characters of letters, digits, '_' or '-'")
    return sid


class SessionStore:
    def __init__(self, model, max_bytes: int, state_dir=None):
        self.model = model
        self.max_bytes = max_bytes
        self.state_dir = Path(state_dir) if state_dir else None
        if self.state_dir is not None:
            if self.state_dir.exists() and not self.state_dir.is_dir():   # mkdir's error: "File exists"
                raise AhnError(f"--state-dir {self.state_dir} is a file; give a folder (it is made when missing)")
            try:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                probe = self.state_dir / f".probe.{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise AhnError(f"cannot use --state-dir {self.state_dir}: {e.strerror or e}; choose another "
                               "folder") from None
        self._mem: "collections.OrderedDict[str, Conversation]" = collections.OrderedDict()
        self._busy: set[str] = set()
        self._lost: set[str] = set()
        self._pending: dict[str, Conversation] = {}   # written to disk soon
        self._closing: set[str] = set()   # busy, but its client is gone: released at the run's next token
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._writes: queue.Queue = queue.Queue()
        self._writer = None
        self._io_session = None
        self.nbytes = 0

    @property
    def in_memory(self) -> int:
        return len(self._mem)

    # ---- a request's view ------------------------------------------------------------------------
    def checkout(self, sid: str, closing_wait: float = 5.0) -> Conversation | None:
        """The conversation ``sid`` for one request (None: a new one). May read the disk and wait up to
        ``closing_wait`` seconds for a cancelled request's release: call it off the event loop. Raises
        SessionBusy, SessionLost, or AhnError when a saved state cannot be restored."""
        with self._lock:
            if sid in self._closing:
                self._freed.wait_for(lambda: sid not in self._busy, timeout=closing_wait)
            if sid in self._busy:
                raise SessionBusy(f"session_id {sid!r} is in use by another request; send one request "
                                  "at a time per session")
            self._busy.add(sid)
            conv = self._mem.get(sid) or self._pending.get(sid)
            if conv is not None:
                if sid in self._mem:
                    self._mem.move_to_end(sid)
                return conv
        try:
            # either file: a state without its .json (a write cut off, a file removed) is refused by _read, not
            # taken for a new conversation that would answer without the context and write over the state
            if self.state_dir is not None and any(p.exists() for p in self._paths(sid)):
                return self._read(sid)
            if sid in self._lost:
                raise SessionLost(f"session_id {sid!r} has expired (evicted from memory); start a new "
                                  "session, or run the server with --state-dir to keep sessions")
            return None
        except BaseException:
            self.release(sid)
            raise

    def release(self, sid: str):
        with self._lock:
            self._free(sid)

    def closing(self, sid: str):
        """The request holding ``sid`` was cancelled (its client went away): the next checkout waits for its
        release."""
        with self._lock:
            if sid in self._busy:
                self._closing.add(sid)

    def _free(self, sid: str):   # under the lock
        self._busy.discard(sid)
        self._closing.discard(sid)
        self._freed.notify_all()

    def checkin(self, sid: str, conv: Conversation):
        """Keep the conversation's new state (in memory, and on disk with a state directory)."""
        with self._lock:
            old = self._mem.pop(sid, None)
            if old is not None:
                self.nbytes -= old.nbytes
            size = conv.nbytes
            if size <= self.max_bytes:
                while self._mem and self.nbytes + size > self.max_bytes:
                    victim, v = next(iter(self._mem.items()))
                    del self._mem[victim]
                    self.nbytes -= v.nbytes
                    if self.state_dir is None:
                        self._lost.add(victim)
                self._mem[sid] = conv
                self.nbytes += size
                self._lost.discard(sid)
            elif self.state_dir is None:
                self._lost.add(sid)
            if self.state_dir is not None:
                self._pending[sid] = conv
                self._start_writer()
                self._writes.put((sid, conv))
            self._free(sid)

    def delete(self, sid: str) -> bool:
        with self._lock:
            if sid in self._busy:
                raise SessionBusy(f"session_id {sid!r} is in use by another request")
            conv = self._mem.pop(sid, None)
            if conv is not None:
                self.nbytes -= conv.nbytes
            found = conv is not None or self._pending.pop(sid, None) is not None
            self._lost.discard(sid)
        if self.state_dir is not None:
            self.flush()
            for p in self._paths(sid):
                if p.exists():
                    p.unlink()
                    found = True
        return found

    def flush(self):
        """Wait until every conversation checked in so far is on disk."""
        if self._writer is not None:
            self._writes.join()

    # ---- disk --------------------------------------------------------------------------------------
    def _paths(self, sid: str):
        return self.state_dir / f"{sid}.safetensors", self.state_dir / f"{sid}.json"

    def _start_writer(self):
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="ahn_rt-session-writer", daemon=True)
            self._writer.start()

    def _write_loop(self):
        from ..weights import atomic_write_text
        while True:
            sid, conv = self._writes.get()
            try:
                state_path, meta_path = self._paths(sid)
                if self._io_session is None:
                    self._io_session = self.model.new_session()
                s = self._io_session
                s.state.load(conv.tensors, conv.position)
                s.save(state_path)
                atomic_write_text(meta_path, json.dumps(dict(
                    version=META_VERSION, position=conv.position, last_token=conv.last_token,
                    chat_open=conv.chat_open)))
            except Exception as e:  # noqa: BLE001 - a failed write must not stop the writer
                if isinstance(e, (AhnError, OSError)):   # disk full, folder not writable: one line
                    print(f"[ahn_rt.serve] could not save session {sid}: {e}", file=sys.stderr)
                else:
                    print(f"[ahn_rt.serve] could not save session {sid}:", file=sys.stderr)
                    traceback.print_exc(file=sys.stderr)
                self._discard_stale(sid)
            finally:
                with self._lock:
                    if self._pending.get(sid) is conv:
                        del self._pending[sid]
                self._writes.task_done()

    def _discard_stale(self, sid: str):
        """After a failed write the files on disk hold an older turn: remove the state file, so that a
        restarted server refuses the conversation (its .json is left) instead of going on from that turn."""
        state_path, meta_path = self._paths(sid)
        for p in (state_path, meta_path):   # the .json only when the state file cannot be removed
            try:
                p.unlink(missing_ok=True)
                return
            except OSError:
                continue
        print(f"[ahn_rt.serve] session {sid}: the files in {self.state_dir} hold an older turn and could not be "
              f"removed; delete {state_path.name} before restarting", file=sys.stderr)

    def _read(self, sid: str) -> Conversation:
        state_path, meta_path = self._paths(sid)
        for p in (state_path, meta_path):
            if not p.exists():
                raise AhnError(f"the saved session {sid!r} is incomplete ({p.name} is missing: a write failed or "
                               f"was cut off); delete it (DELETE /v1/sessions/{sid}) and start the conversation again")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):   # (a list read "list indices must be integers or slices, not str")
                raise ValueError("not a JSON object")
            position, last, chat_open = meta["position"], meta["last_token"], meta["chat_open"]
            if meta.get("version") != META_VERSION:
                raise ValueError(f"unknown version {meta.get('version')!r}")
            # as written (the string "false" read as an open chat turn, which the next request then closed)
            if type(position) is not int or position < 0:
                raise ValueError(f"position {position!r} is not a token count")
            if type(chat_open) is not bool:
                raise ValueError(f"chat_open {chat_open!r} is not true or false")
            # fed to the model as the next request's first token: one outside the vocabulary was a 400 that
            # blamed the request's messages
            if last is not None and (type(last) is not int or not 0 <= last < self.model.config.vocab_size):
                raise ValueError(f"last_token {last!r} is not a token id of this model")
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = f"no {e.args[0]!r} field" if isinstance(e, KeyError) else str(e)   # (a KeyError reads "'position'")
            raise AhnError(f"the saved session {sid!r} is damaged ({meta_path.name}: {why}); delete it") from None
        sess = self.model.restore(state_path)
        if sess.position != position:
            raise AhnError(f"the saved session {sid!r} is inconsistent: state at position {sess.position}, "
                           f"{meta_path.name} says {position}; delete it")
        st = sess.state
        conv = Conversation({k: v.clone() for k, v in st.export().items()}, st.position, last, chat_open)
        with self._lock:
            if conv.nbytes <= self.max_bytes:
                while self._mem and self.nbytes + conv.nbytes > self.max_bytes:
                    _, v = self._mem.popitem(last=False)
                    self.nbytes -= v.nbytes
                self._mem[sid] = conv
                self.nbytes += conv.nbytes
        return conv
