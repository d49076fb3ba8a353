"""What every bench script's command line shares, so that a user's mistake ends the run at once with one
line on stderr, "error: <problem and what to do>", exit status 2, no traceback:

* ``ArgParser`` (ahn_rt.cli): usage errors in one line; ``positive_int`` / ``nonneg_int`` /
  ``positive_float`` / ``nonneg_float`` / ``tokens_arg`` / ``seed_arg`` as argparse types;
* ``add_mode_argument`` (ahn_rt.cli) / ``check_model_args``: ``--mode`` as the commands spell it, and
  what ``python -m ahn_rt.generate`` refuses in --mode / --window / --sinks (a window for a checkpoint
  without AHN weights, which runs full attention), checked before the model loads;
* ``parse_tokens`` / ``token_list``: token counts and depths such as ``2k``, ``32k``, ``1.5k`` or ``4096``
  (``k`` = 1024), at least 1 and at most ``MAX_TOKENS`` (the one parser of that format in bench/); a list
  (``token_list``, ``int_list``) names each value once;
* ``check_settings``: the AHN_RT_* switches that ahn_rt reads at import, checked before that import;
* ``check_device``: a device torch has and the bench runs on, checked before any work;
  ``require_cuda_ops``: a CUDA GPU and ahn_rt's CUDA kernels, for the benches of the kernels alone;
* ``check_fits``: a run whose sizes need more memory than the device has at all, refused before any work;
  ``out_of_memory``: whether an exception is a failed allocation (a GPU's or the CPU allocator's);
* ``output_arg``: the argparse type of ``--json`` (a path, not empty); ``check_output``: that file checked
  for writability before the run, and
  ``write_json``, which writes it atomically at the end;
* ``fail``: any other user mistake.

Standard library only at import (torch is imported where a device is checked).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:   # an installed ahn_rt comes first; else the one of this checkout
    sys.path.append(str(ROOT))

# ArgParser re-exported: every bench's parser; interrupted: serve_load's Ctrl-C after its own cleanup
from ahn_rt.cli import ArgParser, exit_on_interrupt, interrupted, refuse_empty  # noqa: E402,F401
# --mode as the commands spell it, and their check of --mode / --window / --sinks (``check_model_args`` below)
from ahn_rt.cli import add_mode_argument, check_model_options  # noqa: E402,F401
# the argparse types of a number (shared with scripts/demo): re-exported for the benches
from ahn_rt.cli import int_list, nonneg_float, nonneg_int, once_each, positive_float, positive_int  # noqa: E402,F401
from ahn_rt.errors import AhnError, out_of_memory  # noqa: E402,F401
from ahn_rt import settings  # noqa: E402

RUNTIME_SWITCHES = ("AHN_RT_BACKEND", "AHN_RT_GRAPH", "AHN_RT_PREFILL_CUDNN", "AHN_RT_PREFILL_BAND",
                    "AHN_RT_DECODE_FORK", *settings.KERNEL_SWITCHES)


def fail(msg: str, code: int = 2):
    """One line, "error: <msg>", on stderr, and exit (2: the user's mistake)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def check_model_args(args):
    """What ``python -m ahn_rt.generate`` refuses in --mode / --window / --sinks (``ahn_rt.cli.check_model_options``:
    a window for a checkpoint without AHN weights, which runs full attention): one line, exit 2, before the
    model loads or a server starts."""
    try:
        check_model_options(args)
    except AhnError as e:
        fail(str(e))


# ---- start-up ------------------------------------------------------------------------------------------
def script_start(names=RUNTIME_SWITCHES):
    """What a bench script does first, before torch and ahn_rt load: Ctrl-C from now on exits with one line
    (exit 130; the --json file is written atomically, at the end, so nothing is half-written), and the switches
    are checked (``check_settings``). Without the handler a Ctrl-C while torch imported NumPy was swallowed,
    and one mid-run printed a traceback."""
    exit_on_interrupt()
    check_settings(names)


# ---- the AHN_RT_* switches ---------------------------------------------------------------------------
def check_settings(names=RUNTIME_SWITCHES):
    """Exit with one line when one of these switches has a value it does not take (ahn_rt reads some of
    them at import, where the error would be a traceback)."""
    try:
        settings.check(*names)
    except settings.SettingsError as e:
        fail(f"{e}: set it to one of those or unset it")


# ---- numbers -----------------------------------------------------------------------------------------
# A depth or count past this is no size a run can have: a position is an int64 (a depth of 2**64 was a
# failed row "int too big to convert" and exit 0; a prefix_ttft --chunk-size of 2**64 a struct.error
# traceback). 2**62 leaves the steps after the depth room.
MAX_TOKENS = 2 ** 62


def parse_tokens(text: str) -> int:
    """A token count or depth: '2k' -> 2048, '32k' -> 32768, '1.5k' -> 1536, '4096' -> 4096. ValueError
    (one line, naming the text) for anything else, a count below 1 or above MAX_TOKENS."""
    s = str(text).strip().lower()
    try:
        n = int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)
    except (ValueError, OverflowError):
        raise ValueError(f"{str(text).strip()!r} is not a token count such as 2k, 32k or 4096") from None
    if n < 1:
        raise ValueError(f"{str(text).strip()!r}: a token count must be >= 1")
    if n > MAX_TOKENS:
        raise ValueError(f"{str(text).strip()!r}: a token count must be at most 2**62 = {MAX_TOKENS} "
                         "(a position is a 64-bit integer)")
    return n


def token_list(text: str, flag: str) -> list[int]:
    """A comma list of token counts ('1k,32k'), each once; ValueError naming `flag` when empty or bad."""
    items = [x for x in str(text).split(",") if x.strip()]
    if not items:
        raise ValueError(f"{flag} needs at least one token count, e.g. 1k,32k")
    try:
        values = [parse_tokens(x) for x in items]
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    return once_each(values, items, flag)


def seed_arg(text: str) -> int:
    """argparse type of --seed: an integer torch's generators take (``ahn_rt.sampling.check_seed``; beyond
    it torch.manual_seed raised "Overflow when unpacking long long" mid-run)."""
    from ahn_rt.sampling import check_seed
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    try:
        check_seed(v)
    except AhnError as e:   # (a ValueError too: apart, or an integer out of range read "is not an integer")
        raise argparse.ArgumentTypeError(str(e)) from None
    return v


def tokens_arg(text: str) -> int:
    """argparse type of one token count (e.g. --max-context 256k)."""
    try:
        return parse_tokens(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---- paths, devices ----------------------------------------------------------------------------------
def output_arg(text: str) -> str:
    """argparse type of --json: a path. An empty one was taken as no --json at all: the run went on and
    wrote nothing, silently."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("is empty; give a file path such as results.json (or leave --json out)")
    return text


def check_exists(path: str | None, flag: str):
    """Exit with one line when an input path (--weights, --ahn) is empty (pathlib's current folder) or does
    not exist."""
    try:
        refuse_empty(path, flag, "a .safetensors file or a checkpoint folder")
    except AhnError as e:
        fail(str(e))
    if path is not None and not Path(path).exists():
        fail(f"{flag} {path}: no such file or folder; give a .safetensors file or a checkpoint folder")


def check_device(name: str, kinds=("cuda", "cpu"), cpu_hint: str = ""):
    """The torch.device for `name`, or exit with one line: a name torch does not know, a device type
    this bench does not run on, CUDA that torch does not see, a device this machine does not have (a GPU
    index past the last one, a CPU index other than 0: ahn_rt.devices.parse_device, as every command)."""
    import torch

    from ahn_rt.devices import parse_device
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        fail(f"--device {name!r} is not a device; use {' or '.join(kinds)}")
    if dev.type not in kinds:
        fail(f"--device {name}: this benchmark runs on {' or '.join(kinds)} only")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name} needs a CUDA GPU (torch {torch.__version__} sees none){cpu_hint}")
    try:
        return parse_device(name)
    except AhnError as e:
        fail(str(e))


def require_cuda_ops(script: str, names=()):
    """Exit with one line unless a CUDA GPU is there and ahn_rt._C imports with a CUDA kernel for each op
    in `names` (a CPU-only build imports fine and fails at the first call)."""
    import torch
    from ahn_rt.ops import BUILD_COMMAND as BUILD
    if not torch.cuda.is_available():
        fail(f"{script} needs a CUDA GPU (torch {torch.__version__} sees none) and the CUDA build of ahn_rt")
    try:
        import ahn_rt._C  # noqa: F401
    except ImportError as e:
        fail(f"{script} needs ahn_rt's compiled kernels, which do not import ({str(e).strip().splitlines()[0]}); "
             f"build them with `{BUILD}`")
    for name in names:
        try:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"ahn_rt::{name}", "CUDA")
        except Exception:  # noqa: BLE001 - no such op in this build, or a torch without the query
            has = False
        if not has:
            fail(f"{script}: ahn_rt._C has no CUDA kernel for {name} (a CPU-only or older build); rebuild it on "
                 f"this machine with `AHN_RT_CUDA=1 {BUILD}`")


def check_fits(need: int, dev, what: str, hint: str):
    """Exit with one line when ``need`` bytes, a lower bound of what the run holds at once, are more than
    ``dev`` has at all (the GPU's memory; on the CPU the machine's RAM): sizes that can never run there
    (``--seq-len 10000000000`` was a failed allocation's traceback; ``--batch 100000`` on the CPU filled the
    memory until the kernel killed the process). Less than that is left to the run (``out_of_memory``).
    ``dev`` None: this process's own memory (no torch import)."""
    import os
    if dev is not None and dev.type == "cuda":
        import torch
        total, where = torch.cuda.get_device_properties(dev).total_memory, f"{dev}"
    else:
        total, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine (RAM)"
    if need > total:
        from ahn_rt.runtime import human_bytes
        fail(f"{what} needs at least {human_bytes(need)}, more than the {human_bytes(total)} of {where}; {hint}")


def check_output(path: str, flag: str = "--json") -> str:
    """Exit with one line unless `path` can be written, before a long run rather than after it: missing
    folders are made (the writer would make them anyway), the file is opened for appending (an existing
    one is left as it is; a new one is removed again)."""
    p = Path(path)
    for up in [p, *p.parents]:
        if up == p and up.is_dir():
            fail(f"{flag} {path} is a folder; give a file path such as {p / 'results.json'}")
        if up != p and up.exists() and not up.is_dir():
            fail(f"{flag} {path}: {up} is a file, not a folder; choose another path")
    existed = p.exists()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a"):
            pass
    except OSError as e:
        fail(f"{flag} {path} cannot be written ({e.strerror or e}); choose another path")
    if not existed:
        p.unlink(missing_ok=True)
    return str(p)


def write_json(obj, path: str, flag: str = "--json", **dump_kw) -> bool:
    """Write obj as JSON to path atomically (weights.atomic_write_text). When that fails
    (the disk filled up during the run, the folder went away): one line on stderr and False: the caller
    has printed its table already, so nothing measured is lost."""
    from ahn_rt.weights import atomic_write_text
    dump_kw.setdefault("indent", 1)
    dump_kw.setdefault("default", str)
    try:
        atomic_write_text(path, json.dumps(obj, **dump_kw) + "\n")
    except AhnError as e:
        print(f"error: {flag}: {e}; the results are in the table above", file=sys.stderr, flush=True)
        return False
    return True
