"""SessionStore (the session_id extension), without HTTP: one request at a time per conversation, an LRU
by bytes in memory, a conversation evicted without --state-dir is reported lost (404), with a state
directory it comes back from disk through Model.restore, bit-exact; damaged files give one line."""
import pytest
import torch

from ahn_rt import AhnError
from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict
from ahn_rt.serve.sessions import Conversation, SessionBusy, SessionLost, SessionStore, check_session_id


@pytest.fixture(scope="module")
def model():
    cfg = preset_config("tiny", True, torch.float32)
    cfg["vocab_size"] = 97
    return from_state_dict(cfg, random_state_dict(cfg, dtype=torch.float32, seed=1), window=6, sinks=2,
                           dtype="float32", device="cpu")


def _conv(model, n, last=5):
    s = model.new_session()
    s.forward(list(range(1, n + 1)))
    st = s.state
    return Conversation({k: v.clone() for k, v in st.export().items()}, st.position, last, True)


def test_one_request_at_a_time_and_lru_by_bytes(model):
    one = _conv(model, 20).nbytes
    store = SessionStore(model, max_bytes=2 * one)
    assert store.checkout("a") is None                       # new
    with pytest.raises(SessionBusy):
        store.checkout("a")
    store.checkin("a", _conv(model, 20))
    assert store.checkout("a").position == 20
    store.release("a")
    for sid in ("b", "c"):
        store.checkout(sid)
        store.checkin(sid, _conv(model, 20))
    assert store.in_memory == 2 and store.nbytes == 2 * one
    with pytest.raises(SessionLost, match="expired"):       # "a" was the least recently used
        store.checkout("a")
    assert "a" not in store._busy                             # a failed checkout leaves it free
    assert store.delete("b") and not store.delete("zzz") and store.in_memory == 1


def test_a_closing_request_is_waited_for_not_refused(model):
    """A request whose client went away (``closing``) holds its conversation until its run stops: a checkout in
    that moment waits for the release and gets the conversation; a busy one that is not closing is refused at
    once, and a closing one that never releases is refused after the wait."""
    import threading
    import time
    store = SessionStore(model, max_bytes=1 << 30)
    store.checkout("a")
    store.checkin("a", _conv(model, 20))
    store.checkout("a")
    t0 = time.perf_counter()
    with pytest.raises(SessionBusy):                          # still running, client there: 409 at once
        store.checkout("a", closing_wait=5.0)
    assert time.perf_counter() - t0 < 1.0
    store.closing("a")
    threading.Timer(0.2, store.release, ("a",)).start()       # the cancelled run stops at its next token
    assert store.checkout("a", closing_wait=5.0).position == 20
    store.closing("a")                                        # never released
    t0 = time.perf_counter()
    with pytest.raises(SessionBusy):
        store.checkout("a", closing_wait=0.3)
    assert 0.25 < time.perf_counter() - t0 < 3.0
    store.release("a")
    store.closing("a")                                        # not busy: nothing to wait for
    assert store.checkout("a", closing_wait=5.0).position == 20 and not store._closing


def test_state_dir_keeps_conversations_across_restarts(model, tmp_path):
    store = SessionStore(model, max_bytes=1, state_dir=tmp_path)   # nothing fits in memory: disk only
    conv = _conv(model, 23, last=7)
    store.checkout("s1")
    store.checkin("s1", conv)
    store.flush()
    assert (tmp_path / "s1.safetensors").exists() and (tmp_path / "s1.json").exists()
    again = SessionStore(model, max_bytes=1 << 30, state_dir=tmp_path).checkout("s1")   # a new server
    assert again.position == 23 and again.last_token == 7 and again.chat_open
    for k, v in conv.tensors.items():
        assert torch.equal(again.tensors[k], v), k
    meta = (tmp_path / "s1.json").read_text()
    (tmp_path / "s1.json").write_text("{not json")
    with pytest.raises(AhnError) as e:
        SessionStore(model, max_bytes=1 << 30, state_dir=tmp_path).checkout("s1")
    assert "damaged" in str(e.value) and "\n" not in str(e.value)
    import json   # a field missing: named as one (a KeyError's own text was only "'position'")
    (tmp_path / "s1.json").write_text(json.dumps({k: v for k, v in json.loads(meta).items() if k != "position"}))
    with pytest.raises(AhnError, match=r"damaged \(s1.json: no 'position' field\); delete it"):
        SessionStore(model, max_bytes=1 << 30, state_dir=tmp_path).checkout("s1")


def test_a_state_dir_that_cannot_be_used_is_one_line_saying_what_to_do(model, tmp_path):
    # a file given as --state-dir said "cannot use --state-dir PATH: File exists" (mkdir's words)
    (tmp_path / "afile").write_text("x")
    for bad, want in ((tmp_path / "afile", "is a file; give a folder"),
                      (tmp_path / "afile" / "sub", "choose another folder")):
        with pytest.raises(AhnError) as e:
            SessionStore(model, max_bytes=1 << 20, state_dir=bad)
        assert want in str(e.value) and "\n" not in str(e.value) and "--state-dir" in str(e.value)
    assert (tmp_path / "afile").read_text() == "x"


def test_session_ids_are_safe_file_names():
    for good in ("a", "user-42_chat", "x" * 128):
        assert check_session_id(good) == good
    # "abc\n": a regex's $ matches before a final newline, which then went into the state file's name
    for bad in ("", "../etc", "a/b", "x" * 129, 5, None, "a b", "é", "abc\n", "x" * 128 + "\n"):
        with pytest.raises(AhnError):
            check_session_id(bad)


def _saved_c1(model, tmp_path):
    """A conversation "c1" of 23 tokens (last token 7) saved to tmp_path (evicted at once: max_bytes=1)."""
    store = SessionStore(model, max_bytes=1, state_dir=tmp_path)
    store.checkout("c1")
    store.checkin("c1", _conv(model, 23, last=7))
    store.flush()


def test_a_saved_last_token_outside_the_vocabulary_is_a_damaged_session(model, tmp_path):
    # was a 400 blaming the request's "messages" ("token id ... is outside the vocabulary")
    import json
    _saved_c1(model, tmp_path)
    meta = json.loads((tmp_path / "c1.json").read_text())
    for bad in (model.config.vocab_size, -1, True, 1.5):
        (tmp_path / "c1.json").write_text(json.dumps(dict(meta, last_token=bad)))
        with pytest.raises(AhnError) as e:
            SessionStore(model, max_bytes=1 << 30, state_dir=tmp_path).checkout("c1")
        assert "damaged" in str(e.value) and "c1.json" in str(e.value), bad


def test_a_saved_json_of_the_wrong_shape_is_a_damaged_session(model, tmp_path):
    # chat_open "false" (a string) was read as true, so the next request closed an assistant turn that was not
    # open; a position of 23.9 was read as 23; a list instead of an object said "list indices must be integers"
    import json
    _saved_c1(model, tmp_path)
    meta = json.loads((tmp_path / "c1.json").read_text())
    for bad, needle in ((dict(meta, chat_open="false"), "chat_open 'false'"), (dict(meta, chat_open=1), "chat_open 1"),
                        (dict(meta, position=23.9), "position 23.9"), (dict(meta, position="23"), "position '23'"),
                        ([1, 2], "not a JSON object")):
        (tmp_path / "c1.json").write_text(json.dumps(bad))
        with pytest.raises(AhnError) as e:
            SessionStore(model, max_bytes=1 << 30, state_dir=tmp_path).checkout("c1")
        assert "damaged" in str(e.value) and f"c1.json: {needle}" in str(e.value) and "\n" not in str(e.value), bad
    (tmp_path / "c1.json").write_text(json.dumps(meta))
    assert SessionStore(model, max_bytes=1 << 30, state_dir=tmp_path).checkout("c1").chat_open is meta["chat_open"]


def test_a_state_file_without_its_json_is_refused_not_started_anew(model, tmp_path):
    # With c1.json gone (a crash between the two writes of a first turn, or a file removed by hand) the
    # request found "no saved session", started a new conversation and wrote over the saved state: a reply
    # without the conversation's context, with status 200.
    _saved_c1(model, tmp_path)
    (tmp_path / "c1.json").unlink()
    again = SessionStore(model, max_bytes=1 << 30, state_dir=tmp_path)
    with pytest.raises(AhnError) as e:
        again.checkout("c1")
    assert "c1.json" in str(e.value) and "delete" in str(e.value) and "\n" not in str(e.value)
    assert "c1" not in again._busy and (tmp_path / "c1.safetensors").exists()
    assert again.delete("c1") and not (tmp_path / "c1.safetensors").exists()   # DELETE /v1/sessions/c1 clears it
    assert again.checkout("c1") is None                                          # then it is a new conversation


def test_a_failed_write_is_one_line_and_never_leaves_an_older_turn_to_restore(model, tmp_path, monkeypatch, capfd):
    # A turn whose write failed (disk full, folder made read-only) printed a traceback and left the previous
    # turn's files in place: after a restart the conversation went on from that older turn, silently.
    from ahn_rt import state_io
    store = SessionStore(model, max_bytes=1 << 30, state_dir=tmp_path)
    store.checkout("c1")
    store.checkin("c1", _conv(model, 20, last=7))
    store.flush()
    assert (tmp_path / "c1.safetensors").exists()

    def full(session, path):
        raise AhnError(f"cannot write {path}: No space left on device")
    monkeypatch.setattr(state_io, "save", full)
    store.checkout("c1")
    store.checkin("c1", _conv(model, 30, last=8))
    store.flush()
    err = capfd.readouterr().err
    assert "could not save session c1" in err and "No space left" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert store.checkout("c1").position == 30          # this server still holds the new turn
    store.release("c1")
    with pytest.raises(AhnError):                       # a restarted one refuses it, never restores turn 1
        SessionStore(model, max_bytes=1 << 30, state_dir=tmp_path).checkout("c1")
    monkeypatch.undo()
    store.checkout("c1")
    store.checkin("c1", _conv(model, 31, last=9))       # the next turn that is written makes it whole again
    store.flush()
    assert SessionStore(model, max_bytes=1 << 30, state_dir=tmp_path).checkout("c1").position == 31
