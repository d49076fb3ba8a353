"""A session's state as a file: ``Session.save(path)`` / ``Model.restore(path)``.

The file is safetensors (never pickle): the occupied part of every State field (``State.export``) under
its field name, and a header (the safetensors metadata) with the format version, the position, and the
fingerprint of what the state is only meaningful with: the model (architecture and a digest of its
weights), window, sinks, dtype and mode, and a CRC-32 of the rest of the header and every tensor's bytes
(``checksum``). Restoring checks the format version, every part of the fingerprint (naming the first
that differs), then the checksum; a truncated or corrupt file gives one line. Files written before the
checksum existed (same format version) restore unchecked. Writes are atomic.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import zlib
from pathlib import Path

import torch

from .cache import refuse_torn
from .errors import AhnError
from .weights import hash_samples

FORMAT = "ahn_rt.state"
VERSION = 1


def model_digest(model) -> str:
    """A stable digest of a model's architecture and weights: every tensor's shape and dtype and
    64 evenly spaced values (``weights.hash_samples``; cheap even at 3B, unlike hashing 6 GB). Cached on the model."""
    cached = getattr(model, "_digest", None)
    if cached is not None:
        return cached
    c = model.config
    h = hashlib.sha256()
    arch = dict(family=c.family, vocab=c.vocab_size, hidden=c.hidden_size, inter=c.intermediate_size,
                layers=c.num_layers, heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                theta=c.rope_theta, eps=c.rms_norm_eps, tied=c.tie_word_embeddings, ahn=c.ahn_implementation)
    h.update(json.dumps(arch, sort_keys=True).encode())
    w = model.decoder.w
    tensors = [w.embed, w.norm, w.lm_head]
    for lw in w.layers:
        tensors += [t for t in vars(lw).values() if isinstance(t, torch.Tensor)]
        tensors += list((lw.mem or {}).values())     # the memory's own tensors, in its load order
    for t in tensors:
        hash_samples(h, t)
    model._digest = h.hexdigest()[:32]
    return model._digest


def fingerprint(model) -> dict[str, str]:
    c = model.config
    # The settings first, so that a restore names the setting that differs before the (dtype-dependent)
    # model digest does.
    return {"window": str(c.window), "sinks": str(c.sinks), "dtype": str(c.dtype).replace("torch.", ""),
            "mode": c.mode, "model": model_digest(model)}


def checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of the header entries (but ``checksum``) and of every tensor's name, dtype, shape and bytes
    (contiguous CPU tensors; read in place, no copy): catches a damaged data region or header value,
    which safetensors itself does not."""
    crc = zlib.crc32(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()   # (a no-op for what save writes and safetensors reads)
        if t.device.type != "cpu":
            raise ValueError("checksum: tensors must be on the CPU")
        crc = zlib.crc32(f"|{name}|{t.dtype}|{list(t.shape)}|".encode(), crc)
        nbytes = t.numel() * t.element_size()
        if nbytes:
            crc = zlib.crc32((ctypes.c_char * nbytes).from_address(t.data_ptr()), crc)
    return f"crc32:{crc:08x}"


def _path(path, what: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise AhnError(f"{what} needs a file path (str or pathlib.Path), got {type(path).__name__}")
    if isinstance(path, str) and not path.strip():   # pathlib's current folder: "cannot write .: it is a folder"
        raise AhnError(f"{what} needs a file path, got an empty string")
    return Path(os.fspath(path)).expanduser()      # as ahn_rt.load reads its paths


def save(session, path):
    """Write the session's state to ``path`` (safetensors, atomic)."""
    from .weights import check_writable, write_checkpoint
    out = _path(path, "save")
    check_writable(out)          # before the state is copied to the host
    st = session.state
    refuse_torn([st])            # a half-written state is no value to keep
    tensors = {name: t.contiguous().cpu() for name, t in st.export().items()}
    meta = {"format": FORMAT, "version": str(VERSION), "position": str(st.position), **fingerprint(session.model)}
    meta["checksum"] = checksum(meta, tensors)
    write_checkpoint(out, tensors, None, metadata=meta)


def _check_version(path: Path, version):
    """AhnError (one line, saying what to do) unless ``version`` (the header's string) is ``VERSION``."""
    if version == str(VERSION):
        return
    if not (isinstance(version, str) and version.isascii() and version.isdigit()):
        raise AhnError(f"{path} has no valid state format version in its header ({version!r}): it is damaged "
                       "or was not written by Session.save; save the session again")
    if int(version) < VERSION:
        raise AhnError(f"{path} was written by an older ahn_rt (state format version {version}; this one reads "
                       f"version {VERSION}): restore it with the ahn_rt that saved it, or feed the conversation "
                       "into a new session again")
    raise AhnError(f"{path} was written by a newer ahn_rt (state format version {version}; this one reads "
                   f"version {VERSION}): upgrade ahn_rt to restore it")


def restore(model, path, chunk_size: int | None = None, pool=None):
    """A new Session (in a slot of ``pool`` when given) holding the state saved in ``path``; AhnError (one
    line) when the file is not a state file, is damaged, or belongs to another model or configuration."""
    from safetensors import safe_open
    from .weights import check_safetensors, path_exists
    path = _path(path, "restore")
    exists = path_exists(path, "state file")
    if not exists or not path.is_file():
        if not exists:
            raise AhnError(f"state file not found: {path}")
        raise AhnError(f"{path} is {'a folder' if path.is_dir() else 'not a regular file'}: give the path of "
                       "a state file that Session.save wrote")
    check_safetensors(path, "it is damaged or truncated: save the session again")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise AhnError(f"{path} is not an ahn_rt state file (no '{FORMAT}' header); "
                               "write one with Session.save")
            _check_version(path, meta.get("version"))
            want = fingerprint(model)
            if model.config.mode == "full" and meta.get("mode") == "full":
                # full attention keeps every token: window and sinks do nothing there (the logits are the
                # same whatever they are set to), so a full-mode state restores whatever they were
                del want["window"], want["sinks"]
            for key, value in want.items():
                if meta.get(key) != value:
                    what = "model (architecture or weights)" if key == "model" else key
                    raise AhnError(f"{path} was saved with a different {what}: {meta.get(key)!r} there, "
                                   f"{value!r} here; restore it into the model and settings it was saved with")
            position = meta.get("position", "")
            # a non-negative integer in decimal that the state's int64 position holds (a larger one, in a file
            # without a checksum, failed in the restore with a raw OverflowError)
            if not (position.isascii() and position.isdigit() and len(position) <= 19 and int(position) < 2 ** 63):
                raise AhnError(f"{path}: the header's position ({position!r}) is missing or invalid: the file "
                               "is damaged; save the session again")
            position = int(position)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            if "checksum" in meta and checksum(meta, tensors) != meta["checksum"]:
                raise AhnError(f"{path} is damaged: its contents do not match the checksum in its header; "
                               "save the session again")
    except AhnError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own errors for a damaged data region
        raise AhnError(f"{path} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                       "save the session again") from None
    sess = model.new_session(chunk_size=chunk_size, pool=pool)
    try:
        sess.state.load({k: v.to(sess.state.device) for k, v in tensors.items()}, position)
    except ValueError as e:
        sess.close()   # a pool's slot goes back
        raise AhnError(f"{path} does not fit this model's state: {e}") from None
    except BaseException:
        sess.close()
        raise
    return sess
