"""What the demo scripts' command lines share (as bench/bench_args.py for the benches), so that a user's
mistake ends the script before any work with one line on stderr, "error: <problem and what to do>", exit
status 2, no traceback:

* ``ArgParser`` and the number types (ahn_rt.cli): usage errors and bad numbers in one line; ``seed_arg``;
* ``int_list``: a comma list of integers (distances, edges, layers);
* ``need_file`` / ``need_data`` / ``need_model``: inputs checked before any work;
* ``check_out_file`` / ``check_out_dir``: an output checked for writability before a long run;
  ``write_text`` writes a file atomically at the end;
* ``run``: a script's body, its ``AhnError`` (every check above raises one) printed as one line, exit 2;
* ``quiet_startup``: Ctrl-C while a script still imports torch, one line and exit 130 as well.

Standard library only at import.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

from ahn_rt import cli
from ahn_rt.cli import (ArgParser, fraction, nonneg_float, nonneg_int, positive_float, positive_int,  # noqa: F401
                        typed_number)
from ahn_rt.errors import AhnError

SEED_MAX = 2 ** 64 - 1   # numpy's generators take no negative seed, torch.manual_seed nothing past 2**64 - 1


def quiet_startup(module_name: str):
    """Called by a script that imports torch at the top, before that import: when it runs as a script, Ctrl-C
    during the seconds of the import exits with one line and 130 (it printed torch's import traceback)."""
    if module_name == "__main__":
        cli.exit_on_interrupt()


def run(body, args) -> int:
    """``body(args)``; an AhnError is one line on stderr, exit 2 for a user's mistake (1 for a runtime failure
    that says so in ``exit_code``: NonFiniteLogits); Ctrl-C one line, exit 130."""
    if signal.getsignal(signal.SIGINT) is cli.interrupted:   # quiet_startup's: from here Ctrl-C is a
        signal.signal(signal.SIGINT, signal.default_int_handler)   # KeyboardInterrupt, so the body cleans up
    try:
        return body(args)
    except AhnError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:   # Ctrl-C mid-run: one line, as every ahn_rt command (was a traceback)
        print("\ninterrupted", file=sys.stderr, flush=True)
        return 130


def seed_arg(text: str) -> int:
    """argparse type of --seed: an integer in [0, 2**64 - 1] (numpy refused a negative one mid-run)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64 - 1], got {text!r}")
    return v


def int_list(text: str, flag: str, minimum: int = 0, maximum: int | None = None, ascending: bool = False,
             hint: str = "1,2") -> list[int]:
    """``ahn_rt.cli.int_list`` (a comma list of integers in [minimum, maximum], each once), its error an
    AhnError naming ``flag``."""
    try:
        return cli.int_list(text, flag, minimum, maximum, ascending, example=hint)
    except ValueError as e:
        raise AhnError(str(e)) from None


def need_file(path, flag: str, what: str) -> Path:
    """``path`` as a Path, when it is an existing file; else AhnError naming ``flag`` and ``what`` it is."""
    if path is None or not str(path).strip():
        raise AhnError(f"{flag} is empty; give {what}")
    p = Path(path)
    if not p.is_file():
        why = "is a folder" if p.is_dir() else "does not exist"
        raise AhnError(f"{flag} {path} {why}; give {what}")
    return p


def need_folder(path, flag: str, what: str, files=()) -> Path:
    """``path`` as a Path, when it is a folder holding ``files``; else AhnError."""
    if path is None or not str(path).strip():
        raise AhnError(f"{flag} is empty; give {what}")
    p = Path(path)
    if not p.is_dir():
        raise AhnError(f"{flag} {path} {'is a file' if p.exists() else 'does not exist'}; give {what}")
    missing = [f for f in files if not (p / f).is_file()]
    if missing:
        raise AhnError(f"{flag} {path} has no {', '.join(missing)}; give {what}")
    return p


def read_json(path: Path, flag: str, what: str):
    """The JSON in ``path``, or AhnError naming ``flag`` (a damaged or empty file)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AhnError(f"{flag}: {path} is not readable JSON ({str(e).splitlines()[0] if str(e) else e}); "
                       f"give {what}") from None


def need_data(path, splits=("heldout",), flag: str = "--data") -> Path:
    """A folder of build_corpus.py holding manifest.json and ``splits`` (.bin), else AhnError."""
    what = "a folder written by scripts/demo/build_corpus.py"
    p = need_folder(path, flag, what, ["manifest.json"] + [f"{s}.bin" for s in splits])
    m = read_json(p / "manifest.json", flag, what)
    if not isinstance(m, dict) or "templates" not in m and not (p / "tokenizer.json").is_file():
        raise AhnError(f"{flag} {path}: manifest.json has no passkey templates and there is no tokenizer.json; "
                       f"give {what}")
    return p


def need_model(path, flag: str = "--model") -> dict:
    """The config.json of a checkpoint folder, else AhnError."""
    what = "a checkpoint folder (config.json, model.safetensors)"
    p = need_folder(path, flag, what, ["config.json"])
    cfg = read_json(p / "config.json", flag, what)
    if not isinstance(cfg, dict):
        raise AhnError(f"{flag} {path}: config.json is not a JSON object; give {what}")
    return cfg


def _probe(folder: Path, flag: str, path, choose: str):
    """Create a file in ``folder`` and remove it: what os.access cannot tell (root on a read-only mount or
    /proc), worth it only before a long run."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ahn_rt-probe-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise AhnError(f"{flag} {path} cannot be written ({e.strerror or e}); choose another {choose}") from None


def check_out_file(path, flag: str):
    """AhnError unless a file can be written at ``path`` (``ahn_rt.weights.check_writable``, then a probe),
    checked before a long run rather than after it."""
    if path is None:
        return
    if not str(path).strip():
        raise AhnError(f"{flag} is empty; give a file path (or leave {flag} out)")
    if Path(path).is_dir():   # (check_writable's own line asked for "a file name ending in .safetensors")
        raise AhnError(f"{flag} {path} is a folder; give a file path (a new file's name in it, say)")
    from ahn_rt.weights import check_writable   # torch: not at import
    try:
        folder = check_writable(Path(path))
    except AhnError as e:
        raise AhnError(f"{flag}: {e}; choose another path") from None
    _probe(folder, flag, path, "path")


def check_apart(*outputs):
    """AhnError when two of ``outputs`` ((flag, path or None) pairs) name the same file: the one written last
    replaced the other (exit 0, one output gone)."""
    seen = {}
    for flag, path in outputs:
        if path is None:
            continue
        key = Path(path).expanduser().resolve()
        if key in seen:
            raise AhnError(f"{flag} {path} is the {seen[key]} file; give each output its own file name")
        seen[key] = flag


def check_not_corpus(data: Path, *outputs):
    """AhnError when an output ((flag, path or None) pairs) is the corpus folder ``data`` or one of its files:
    the script read the corpus and then wrote over it (make_distill_data.py --out data/demo/heldout.bin
    replaced the split; train_teacher.py --out data/demo copied tokenizer.json onto itself after training)."""
    corpus = {data.resolve()} | {(data / n).resolve() for n in ("manifest.json", "tokenizer.json")}
    corpus |= {f.resolve() for f in data.glob("*.bin")}
    for flag, path in outputs:
        if path is not None and Path(path).expanduser().resolve() in corpus:
            raise AhnError(f"{flag} {path} is the corpus of --data {data} or one of its files, which this run "
                           "reads; write the output elsewhere")


def check_out_dir(path, flag: str = "--out"):
    """AhnError unless ``path`` is a folder, or can be made one, that files can be written in."""
    if not str(path).strip():
        raise AhnError(f"{flag} is empty; give a folder")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise AhnError(f"{flag} {path} is a file; give a folder")
    from ahn_rt.weights import check_writable   # torch: not at import
    try:
        folder = p if p.is_dir() else check_writable(p)
    except AhnError as e:
        raise AhnError(f"{flag}: {e}; choose another folder") from None
    _probe(folder, flag, path, "folder")


def check_distance(d: int, L: int, t, flag: str = "--distances"):
    """AhnError unless a passkey at distance ``d`` fits a sequence of ``L`` tokens (templates ``t``)."""
    lo, hi = t.min_distance(), t.max_distance(L)
    if hi < lo:
        raise AhnError(f"no passkey fits a sequence of {L} tokens (it needs {lo - hi + L} or more); "
                       "give a longer --seq-len")
    if not lo <= d <= hi:
        raise AhnError(f"{flag}: distance {d} does not fit a sequence of {L} tokens; give one between {lo} and {hi} "
                       "(or a longer --seq-len)")


def check_tokens(tokens, L: int, split: str, flag: str = "--seq-len"):
    """AhnError unless the ``split`` token array holds more than one sequence of ``L`` tokens."""
    if len(tokens) == 0:   # (a shorter --seq-len does not help)
        raise AhnError(f"the {split} split of --data is empty (no source file fell in it); build the corpus "
                       "again from more files, or with a larger share for that split")
    if len(tokens) <= L:
        raise AhnError(f"{flag} {L}: the {split} split has only {len(tokens):,} tokens, too few for a sequence "
                       f"of {L}; give a shorter {flag}")


def write_text(path, text: str):
    """Write ``path`` atomically (its folder made); AhnError with one line on failure."""
    from ahn_rt.weights import atomic_write_text
    atomic_write_text(path, text)
