"""A session's state as a value: save -> restore and fork continue bit-exactly like the uninterrupted
session (across the fill point, in every mode); only the occupied slots are written before the window is
full; a state restored into another model or configuration, a truncated or corrupt file, or a file that
is not a state file each give one line; nothing is unpickled."""
import hashlib
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ahn_rt
from ahn_rt.init_weights import preset_config, random_state_dict
from ahn_rt.runtime import from_state_dict

# Exact comparisons only (torch.equal on logits and state): no tolerances in this file.

W, S = 6, 2


def _model(mode="ahn", seed=0, dtype="float32", window=W, sinks=S, changed=None):
    """``changed``: the name of one tensor to perturb (the same model otherwise: another AHN checkpoint on the
    same base, or the same AHN on another base)."""
    cfg = preset_config("tiny", True, torch.float32)
    cfg["vocab_size"] = 101
    sd = random_state_dict(cfg, ahn=True, dtype=torch.float32, seed=seed)
    if changed is not None:
        sd[changed] = sd[changed] + 0.5
    return from_state_dict(cfg, sd, window=window, sinks=sinks, mode=mode, dtype=dtype, device="cpu")


IDS = list(range(3, 60))


@pytest.mark.parametrize("mode", ["ahn", "swa", "full"])
@pytest.mark.parametrize("cut", [1, 5, S + W, S + W + 1, 40])
def test_save_restore_and_fork_continue_exactly(tmp_path, mode, cut):
    model = _model(mode)
    ref = model.new_session()
    ref_logits = [ref.forward(IDS[:cut])] + [ref.forward([t]) for t in IDS[cut:]]
    a = model.new_session()
    a.forward(IDS[:cut])
    a.save(tmp_path / "s.safetensors")
    b = model.restore(tmp_path / "s.safetensors")
    c = a.fork()
    assert b.position == c.position == cut
    for t, want in zip(IDS[cut:], ref_logits[1:]):
        for s in (a, b, c):
            assert torch.equal(s.forward([t]), want)
    for s in (b, c):
        for name, t in ref.state.tensors().items():
            assert torch.equal(s.state.tensors()[name], t), name


def test_fork_is_independent():
    model = _model()
    a = model.new_session()
    a.forward(IDS[:20])
    b = a.fork()
    la = a.forward([7])
    lb = b.forward([8])
    assert not torch.equal(la, lb) and a.position == b.position == 21
    assert torch.equal(b.fork().forward([9]), b.fork().forward([9]))


def test_only_occupied_slots_are_written(tmp_path):
    model = _model()
    s = model.new_session()
    s.forward(IDS[:3])
    s.save(tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.get_slice("k").get_shape()[2] == 3 and f.get_slice("beta").get_shape()[1] == 3
        meta = f.metadata()
    assert meta["format"] == "ahn_rt.state" and meta["position"] == "3" and meta["window"] == str(W)
    s.forward(IDS[3:30])
    s.save(tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.get_slice("k").get_shape()[2] == S + W


@pytest.mark.parametrize("other,needle", [
    (dict(seed=1), "model (architecture or weights)"), (dict(window=7), "window"), (dict(sinks=3), "sinks"),
    (dict(dtype="bf16"), "dtype"), (dict(mode="swa"), "mode"),
    (dict(changed="model.layers.1.ahn.fn.A_log"), "model (architecture or weights)"),
    (dict(changed="model.layers.1.ahn.fn.o_proj.weight"), "model (architecture or weights)"),
    (dict(changed="model.layers.1.mlp.down_proj.weight"), "model (architecture or weights)")],
    ids=["seed", "window", "sinks", "dtype", "mode", "other-ahn-A_log", "other-ahn-o_proj", "other-base"])
def test_restore_into_another_model_or_config_names_the_mismatch(tmp_path, other, needle):
    """Another seed changes every tensor; the ``changed`` cases change one: a state saved under one AHN
    checkpoint was restored into the same base with another AHN (the memory's tensors were left out of the
    model digest) and would continue silently with the wrong memory."""
    s = _model().new_session()
    s.forward(IDS[:20])
    s.save(tmp_path / "s.safetensors")
    with pytest.raises(ahn_rt.AhnError) as e:
        _model(**other).restore(tmp_path / "s.safetensors")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_damaged_or_foreign_files(tmp_path):
    model = _model()
    s = model.new_session()
    s.forward(IDS[:20])
    good = tmp_path / "s.safetensors"
    s.save(good)
    data = good.read_bytes()
    cases = {"truncated": data[: len(data) - 50], "garbage": b"\x00" * 5 + b"nope", "empty": b""}
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "pt"})
    for name, blob in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(blob)
    for name in [*cases, "foreign"]:
        with pytest.raises(ahn_rt.AhnError) as e:
            model.restore(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(e.value), name
    with pytest.raises(ahn_rt.AhnError, match="not found"):
        model.restore(tmp_path / "missing.safetensors")
    evil = tmp_path / "state.pt"
    torch.save({"k": torch.zeros(1)}, evil)
    with pytest.raises(ahn_rt.AhnError):
        model.restore(evil)


def test_save_is_atomic_and_refuses_bad_paths(tmp_path):
    s = _model().new_session()
    s.forward(IDS[:4])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ahn_rt.AhnError, match="cannot write"):
        s.save(tmp_path / "afile" / "s.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_file_name_near_the_length_limit_is_saved(tmp_path):
    """A state file name of 252 characters (the limit is 255): the atomic write's temporary, the name plus
    ".<pid>.<thread>.tmp", was too long, and the save refused a valid path ("File name too long")."""
    if os.pathconf(tmp_path, "PC_NAME_MAX") < 252:
        pytest.skip("a file system with shorter names")
    s = _model().new_session()
    s.forward(IDS[:4])
    path = tmp_path / ("s" * 240 + ".safetensors")
    s.save(path)
    assert s.model.restore(path).position == 4
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_save_onto_a_pipe_or_device_is_refused_not_replaced(tmp_path):
    """save's atomic write renames its temporary file over the path: a pipe (or, as root, /dev/null itself)
    was replaced by a regular file holding the state. Such a path is refused, and left as it was."""
    s = _model().new_session()
    s.forward(IDS[:4])
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for write in (lambda: s.save(fifo), lambda: ahn_rt.weights.write_checkpoint(fifo, {"a": torch.zeros(2)})):
        with pytest.raises(ahn_rt.AhnError, match="pipe: it is not a regular file"):
            write()
        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and [p.name for p in tmp_path.iterdir()] == ["pipe"]

@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys")
def test_save_where_the_file_system_refuses_names_the_given_path():
    """A place the permission check lets through (as root) but the file system refuses: the line named
    safetensors' own temporary file ('... at path "/sys/.tmpXyZ12"'), not the path given; it now names the
    given path with the OS's reason (as non-root the permission check says it first)."""
    s = _model().new_session()
    s.forward(IDS[:4])
    with pytest.raises(ahn_rt.AhnError) as e:
        s.save("/sys/ahn_rt_test.safetensors")
    msg = str(e.value)
    assert msg.startswith("cannot write /sys/ahn_rt_test.safetensors: ") and ".tmp" not in msg, msg
    assert "\n" not in msg and "os error" not in msg, msg
    with pytest.raises(ahn_rt.AhnError) as e:
        ahn_rt.weights.write_checkpoint("/sys/ahn_rt_test.safetensors", {"a": torch.zeros(2)})
    assert str(e.value) == msg


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors keeps the metadata in a hash map: the same checkpoint or session state came out with its
    header keys in another order on each write (another sha256). A deterministic run writes the same file."""
    meta = {k: "\u00e9" + k for k in "abcdefgh"}     # eight keys: the chance of one order five times is ~1e-18
    tensors = {"x": torch.arange(6.0).view(2, 3).bfloat16(), "b": torch.ones(3)}
    digests = set()
    for i in range(5):
        ahn_rt.weights.write_checkpoint(tmp_path / f"m{i}.safetensors", tensors, {"q": 1}, metadata=meta)
        digests.add(hashlib.sha256((tmp_path / f"m{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(tmp_path / "m0.safetensors"), "pt") as f:
        assert f.metadata() == {**meta, "format": "pt", "config": '{"q": 1}'}
        assert torch.equal(f.get_tensor("x"), tensors["x"]) and torch.equal(f.get_tensor("b"), tensors["b"])
    s = _model().new_session()
    s.forward(IDS[:4])
    s.save(tmp_path / "s1.safetensors")
    s.save(tmp_path / "s2.safetensors")
    assert (tmp_path / "s1.safetensors").read_bytes() == (tmp_path / "s2.safetensors").read_bytes()


def _rewrite(src, dst, meta=None, drop=()):
    """A copy of the state file ``src`` with header entries changed (``meta``) or removed (``drop``)."""
    with safe_open(str(src), "pt") as f:
        m, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    m.update(meta or {})
    for k in drop:
        m.pop(k, None)
    save_file(tensors, str(dst), metadata=m)
    return dst


def test_a_damaged_data_region_or_header_value_is_refused(tmp_path):
    """safetensors checks neither the bytes of a tensor nor the header's values: a flipped byte in the
    data, or a position changed past the fill point (the tensors' shapes stay the same), restored
    silently into a wrong state. The header's checksum refuses both; a file without one (written before
    it existed) still restores exactly."""
    model = _model()
    s = model.new_session()
    s.forward(IDS[:30])
    good = tmp_path / "s.safetensors"
    s.save(good)
    data = bytearray(good.read_bytes())
    data[-3] ^= 0x40
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    _rewrite(good, tmp_path / "moved.safetensors", {"position": "31"})
    for name in ("flipped", "moved"):
        with pytest.raises(ahn_rt.AhnError, match="is damaged: its contents do not match the checksum") as e:
            model.restore(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(e.value)
    old = model.restore(_rewrite(good, tmp_path / "old.safetensors", drop=["checksum"]))
    assert old.position == 30 and torch.equal(old.forward([7]), s.forward([7]))


def test_a_full_mode_header_position_is_checked_before_the_cache_grows(tmp_path):
    """A full-mode state whose header position does not match its tensors is refused by the shape check,
    before the cache is grown to that position (it tried to allocate a cache of 10**12 slots and said
    'cannot allocate ... use a shorter prompt')."""
    model = _model("full")
    s = model.new_session()
    s.forward(IDS[:20])
    s.save(tmp_path / "s.safetensors")
    bad = _rewrite(tmp_path / "s.safetensors", tmp_path / "b.safetensors", {"position": str(10 ** 12)},
                   drop=["checksum"])
    with pytest.raises(ahn_rt.AhnError, match=r"does not fit this model's state: field k has shape") as e:
        model.restore(bad)
    assert "allocate" not in str(e.value)


def test_a_header_position_past_int64_is_one_line(tmp_path):
    """A position no int64 holds, in a file without a checksum (one written before it existed), failed in
    the restore with a raw OverflowError ('int too big to convert')."""
    model = _model()
    s = model.new_session()
    s.forward(IDS[:20])
    s.save(tmp_path / "s.safetensors")
    for pos in (str(2 ** 63), "9" * 30):
        bad = _rewrite(tmp_path / "s.safetensors", tmp_path / "b.safetensors", {"position": pos}, drop=["checksum"])
        with pytest.raises(ahn_rt.AhnError, match=r"the header's position .* is missing or invalid"):
            model.restore(bad)


@pytest.mark.parametrize("version,needle", [
    ("0", "written by an older ahn_rt .* feed the conversation into a new session again"),
    ("2", "written by a newer ahn_rt .* upgrade ahn_rt"),
    ("x", "no valid state format version"), (None, "no valid state format version")])
def test_a_file_of_another_format_version_says_what_to_do(tmp_path, version, needle):
    s = _model().new_session()
    s.forward(IDS[:5])
    s.save(tmp_path / "s.safetensors")
    f = _rewrite(tmp_path / "s.safetensors", tmp_path / "v.safetensors", {"version": version} if version else {},
                 drop=[] if version else ["version"])
    with pytest.raises(ahn_rt.AhnError, match=needle):
        _model().restore(f)


def test_a_path_the_os_refuses_to_look_at_is_one_line(tmp_path):
    """A file name too long for the file system (or, for a non-root user, a folder on the way they may not
    enter): pathlib's exists() / is_dir() raised it, an OSError traceback out of save and restore."""
    s = _model().new_session()
    s.forward(IDS[:4])
    path = tmp_path / ("x" * 300)
    with pytest.raises(ahn_rt.AhnError, match="cannot write .*: File name too long"):
        s.save(path)
    with pytest.raises(ahn_rt.AhnError, match="cannot read state file .*: File name too long"):
        _model().restore(path)
    assert not list(tmp_path.iterdir())


def test_restoring_a_folder_says_it_is_a_folder(tmp_path):
    with pytest.raises(ahn_rt.AhnError, match="is a folder: give the path of a state file"):
        _model().restore(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc (Linux)")
def test_save_flushes_the_file_to_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """Atomic across a power loss too: the temporary file is fsync'ed before the rename (without it the
    rename may reach the disk first and leave a truncated state file where the good one was)."""
    import os
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    s = _model().new_session()
    s.forward(IDS[:4])
    s.save(tmp_path / "s.safetensors")
    (_, tmp), = [e for e in events if e[0] == "replace"]
    assert ("fsync", tmp) in events and events.index(("fsync", tmp)) < events.index(("replace", tmp))


def test_an_atomic_write_goes_on_where_the_file_system_has_no_fsync(tmp_path, monkeypatch):
    """fsync failing with EINVAL (a file system without it: some network / FUSE mounts) must not fail every
    save; a real failure (ENOSPC) still does, and leaves the old file and no temporary."""
    import errno
    import os as _os
    from ahn_rt import weights as W
    path = tmp_path / "f.txt"
    W.atomic_write_text(path, "old")
    for code, ok in ((errno.EINVAL, True), (errno.ENOSPC, False)):
        def no_fsync(fd, code=code):
            raise OSError(code, _os.strerror(code))
        monkeypatch.setattr(W.os, "fsync", no_fsync)
        if ok:
            W.atomic_write_text(path, "new")
            assert path.read_text() == "new"
        else:
            with pytest.raises(ahn_rt.AhnError, match="No space left"):
                W.atomic_write_text(path, "lost")
            assert path.read_text() == "new"
        assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_path_under_home_is_expanded_as_load_expands_it(tmp_path, monkeypatch):
    """``sess.save("~/conv.safetensors")`` made a folder named "~" in the current directory and wrote
    there (restore read it back from there), while ``ahn_rt.load("~/...")`` and its tokenizer= expand the
    home folder. Save and restore now expand it too."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    model = _model()
    a = model.new_session()
    a.forward(IDS[:9])
    a.save("~/conv.safetensors")
    assert (home / "conv.safetensors").is_file() and not list(cwd.iterdir())
    b = model.restore("~/conv.safetensors")
    assert b.position == 9 and torch.equal(b.forward([5]), a.forward([5]))


def test_restore_into_a_pool_continues_exactly_and_a_refused_file_takes_no_slot(tmp_path):
    """``restore(path, pool=)`` puts the saved state in a slot of a service's pool (it could only make a
    private session), steps with the pool's other sessions as the uninterrupted session does; a file whose
    tensors do not fit gives its slot back."""
    model = _model()
    ref = model.new_session()
    ref.forward(IDS[:30])
    ref.save(tmp_path / "s.safetensors")
    pool = model.new_pool(3)
    other = model.new_session(pool=pool)
    other.forward(IDS[:5])
    b = model.restore(tmp_path / "s.safetensors", pool=pool)
    assert b.pool is pool and pool.free == 1 and b.position == 30
    got = model.step([other, b], [7, 8])
    want_b, want_o = ref.forward([8]), model.new_session()
    want_o.forward(IDS[:5])
    assert torch.equal(got[1], want_b[-1]) and torch.equal(got[0], want_o.forward([7])[-1])
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        m, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    name = next(iter(tensors))
    tensors[name] = tensors[name][..., :1].contiguous()
    m.pop("checksum", None)
    save_file(tensors, str(tmp_path / "short.safetensors"), metadata=m)
    with pytest.raises(ahn_rt.AhnError, match="does not fit"):
        model.restore(tmp_path / "short.safetensors", pool=pool)
    assert pool.free == 1
