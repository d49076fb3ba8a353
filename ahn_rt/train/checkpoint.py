"""What the trainer writes: the resume state (OUT/resume/) and the trained model (OUT/model.safetensors +
config.json, optionally OUT/merged/). Every tensor file goes through ``ahn_rt.weights.write_checkpoint`` and
every text file through ``atomic_write_text`` (temporary file + rename), under the one key map of
``ahn_rt.weights``. Nothing is pickled.

Resume state, OUT/resume/:

* ``ahn.safetensors``: the float32 master AHN weights under the official names (with the model config in
  its metadata, so it also loads as ``--ahn`` for inference);
* ``state.safetensors``: the AdamW moments and step counts (``optim.<official name>.<exp_avg|exp_avg_sq|
  step>``) and the torch RNG states (``rng.torch``, ``rng.cuda.<i>``);
* ``state.json``: format tag, optimizer step, data position (epoch, index), tokens seen, the Python RNG
  state, the optimizer's hyperparameters, the schedule, the run's settings, the data file's sha256, and
  the sha256 of the two tensor files. It is written last: a folder without it is not a resume state.

A new state is written to a temporary folder OUT/.resume.tmp-<pid>; only when it is complete is the old
OUT/resume renamed to OUT/resume.old, the new one renamed into place, and the old one removed. At every
moment OUT/resume or (for an instant) OUT/resume.old is complete; ``find_resume`` takes whichever is.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import AhnError
from ..weights import ahn_shapes, atomic_write_text, write_checkpoint

RESUME = "resume"
RESUME_OLD = "resume.old"
FORMAT = "ahn_rt.train.resume/1"
LAYER_IMPL = {"qwen2": "Qwen2MemDecoderLayer", "qwen3": "Qwen3MemDecoderLayer"}
# Files copied next to a merged model so that it runs on its own (when the base folder has them).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "vocab.json", "merges.txt")


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _on_stop_signals(handler):
    """``handler`` for Ctrl-C (SIGINT) and SIGTERM inside the block, the previous handlers restored after.
    Yields whether it applies: signal handlers are the main thread's alone (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {s: signal.signal(s, handler) for s in _STOP_SIGNALS}
    try:
        yield True
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred_interrupt():
    """Hold a Ctrl-C (SIGINT) or SIGTERM that arrives inside the block until the block is done, then
    raise KeyboardInterrupt: a resume state being written is finished first. A no-op outside the main
    thread."""
    got = []
    with _on_stop_signals(lambda signum, frame: got.append(signum)):
        yield
    if got:
        raise KeyboardInterrupt


@contextlib.contextmanager
def stop_between_steps(enabled: bool = True):
    """Yields ``stopping()``: whether a Ctrl-C (SIGINT) or SIGTERM arrived inside the block. The first one only
    asks the loop to stop after the step it is in (so that a resume state of that step can be written); a
    second one raises KeyboardInterrupt at once, as without this block. A no-op (``stopping()`` stays False)
    when not ``enabled`` (ranks of a process group, which could disagree on the step to stop at) or outside
    the main thread."""
    got = []

    def at_once(signum, frame):
        raise KeyboardInterrupt

    def first(signum, frame):
        got.append(signum)
        for s in _STOP_SIGNALS:
            signal.signal(s, at_once)
        print("\nstopping after this step, with a resume state (Ctrl-C again stops at once)", file=sys.stderr,
              flush=True)
    if not enabled:
        yield lambda: False
        return
    with _on_stop_signals(first):
        yield lambda: bool(got)


def _write_failed(e: Exception, out: Path) -> OSError:
    """A resume state that could not be written mid-run (disk full, OUT removed): an OSError, so that the
    command line reports it as the run's other file errors are (one line, exit 1, advice by resume state)."""
    what = getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    err = OSError(getattr(e, "errno", None) or 0, f"cannot write the resume state ({what})")
    err.filename = str(Path(out) / RESUME)
    return err


# ----------------------------------------------------------------------------------------------
# Resume state
# ----------------------------------------------------------------------------------------------
def save_resume(out: Path, *, ahn: dict, tensors: dict, state: dict, config: dict):
    """Write a complete resume state to OUT/resume atomically (see the module docstring)."""
    out = Path(out)
    tmp = out / f".resume.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        write_checkpoint(tmp / "ahn.safetensors", {k: v.detach().float().cpu() for k, v in ahn.items()}, config)
        write_checkpoint(tmp / "state.safetensors", {k: v.detach().cpu() for k, v in tensors.items()})
        state = dict(state, format=FORMAT,
                     files={n: sha256(tmp / n) for n in ("ahn.safetensors", "state.safetensors")})
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1) + "\n")
        final, old = out / RESUME, out / RESUME_OLD
        if final.exists():
            if old.exists():
                shutil.rmtree(old)        # final is complete, so old is stale
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    except (OSError, AhnError) as e:   # AhnError: write_checkpoint's one line for an OSError beneath
        raise _write_failed(e, out) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(out: Path):
    """Temporary resume folders a killed process left behind (never a complete state)."""
    for p in Path(out).glob(".resume.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def base_fingerprint(base: dict) -> str:
    """The frozen base's weights, sampled (``weights.hash_samples``), as a resume state records them: a
    resume (and ``scripts/demo/merge_resume.py``) refuses another base of the same config."""
    from ..weights import hash_samples
    h = hashlib.sha256()
    for k in sorted(base):
        h.update(k.encode())
        hash_samples(h, base[k])
    return h.hexdigest()[:32]


def find_resume(out: Path) -> Path | None:
    """The complete resume state in ``out`` (resume/, else resume.old/), or None."""
    for name in (RESUME, RESUME_OLD):
        p = Path(out) / name
        if (p / "state.json").is_file():
            return p
    return None


# What a resume reads from state.json (save_resume writes all of it): name -> type.
STATE_FIELDS = {"step": int, "epoch": int, "pos": int, "tokens_seen": int, "python_rng": list, "schedule": dict,
                "optimizer": dict, "run": dict, "files": dict}


def _check_state(state: dict, folder: Path):
    """AhnError (one line) unless state.json has every field a resume reads, of the right type: the tensor
    files are checked by their hashes, this file (edited by hand, or damaged) by its shape."""
    def ok(value, kind):
        return isinstance(value, kind) and not (kind is int and (isinstance(value, bool) or value < 0))
    bad = [k for k, kind in STATE_FIELDS.items() if not ok(state.get(k), kind)]
    if not bad:
        sched, groups = state["schedule"], state["optimizer"].get("param_groups")
        bad += [f"schedule.{k}" for k in ("total_steps", "warmup_steps") if not ok(sched.get(k), int)]
        if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                 and isinstance(g.get("betas"), list) for g in groups)):
            bad.append("optimizer.param_groups")
        rng = state["python_rng"]
        if not (len(rng) == 3 and ok(rng[0], int) and isinstance(rng[1], list) and len(rng[1]) == 625
                and all(ok(x, int) for x in rng[1])):     # random.getstate(): version, 625 words, gauss
            bad.append("python_rng")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in state["files"].items()):
            bad.append("files")
    if bad:
        raise AhnError(f"resume state {folder} is damaged: state.json has no valid {', '.join(bad)}; "
                       "remove the folder to start over")


def load_resume(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state.json, AHN weights, state tensors) of a resume folder, checked against the recorded hashes."""
    from ..config import load_json
    state = load_json(folder / "state.json", "resume state")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise AhnError(f"{folder / 'state.json'} is not an ahn_rt.train resume state "
                       f"(format {state.get('format') if isinstance(state, dict) else None!r})")
    _check_state(state, folder)
    for name, digest in state["files"].items():
        p = folder / name
        if not p.is_file() or sha256(p) != digest:
            raise AhnError(f"resume state {folder} is damaged: {name} is missing or changed; "
                           "remove the folder to start over")

    def read(name):
        with safe_open(str(folder / name), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    return state, read("ahn.safetensors"), read("state.safetensors")


# ----------------------------------------------------------------------------------------------
# The trained model
# ----------------------------------------------------------------------------------------------
def output_config(base_cfg: dict, family: str, window: int, sinks: int, implementation: str | None = None) -> dict:
    """The base config plus the AHN fields the runtime (and the official code) read (docs/semantics.md §8);
    ``implementation``: the memory variant (official or short name; default GatedDeltaNet)."""
    from ..memory import resolve
    cfg = {k: v for k, v in base_cfg.items()}
    cfg.update(sliding_window=int(window), num_attn_sinks=int(sinks), _ahn_implementation=resolve(implementation),
               _layer_implementation=LAYER_IMPL[family], use_sliding_window=False, use_q_proj=False,
               use_ahn_router=False, fa_layer_ids="")
    return cfg


def write_model(out: Path, ahn: dict, config, cfg: dict, dtype: torch.dtype) -> Path:
    """OUT/model.safetensors (AHN only, official names and shapes of the memory variant that ``cfg`` names,
    stored in ``dtype``) + OUT/config.json."""
    shapes = ahn_shapes(config, cfg.get("_ahn_implementation") or "GatedDeltaNet")
    if set(shapes) != set(ahn):
        raise AhnError("internal: the trained AHN tensors do not match the checkpoint key map")
    tensors = {k: ahn[k].detach().to(device="cpu", dtype=dtype) for k in shapes}
    for k, shape in shapes.items():
        if tuple(tensors[k].shape) != shape:
            raise AhnError(f"internal: AHN tensor {k} has shape {list(tensors[k].shape)}, expected {list(shape)}")
    cfg = dict(cfg, torch_dtype=str(dtype).replace("torch.", ""))
    path = Path(out) / "model.safetensors"
    write_checkpoint(path, tensors, cfg, config_json=True)
    return path


def write_merged(out: Path, ckpt, ahn: dict, cfg: dict, dtype: torch.dtype, base_dtype: torch.dtype | None = None):
    """OUT/merged/: the base tensors (as stored, AHN tensors of a merged base replaced) + the trained AHN
    tensors in ``dtype``, config.json, and the tokenizer/generation files of the base folder."""
    from ..weights import is_ahn_key
    folder = Path(out) / "merged"
    tensors = {k: ckpt.src.get(k) for k in ckpt.src.where if not is_ahn_key(k)}
    if base_dtype is not None:
        tensors = {k: v.to(base_dtype) for k, v in tensors.items()}
    tensors.update({k: v.detach().to(device="cpu", dtype=dtype) for k, v in ahn.items()})
    write_checkpoint(folder / "model.safetensors", tensors, cfg, config_json=True)
    if ckpt.folder is not None:
        for name in SIDE_FILES:
            src = Path(ckpt.folder) / name
            if src.is_file() and not (folder / name).exists():
                try:
                    atomic_write_text(folder / name, src.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):
                    pass   # a side file is a convenience; the model itself is complete
    return folder


def plot_loss(out: Path, records: list[dict]) -> str:
    """OUT/loss.png from the log records (matplotlib's figure when it is installed, else ``plot.loss_png``'s
    plain raster); returns a one-line note."""
    records = [r for r in records if r.get("loss") is not None and math.isfinite(r["loss"])]   # (a diverged step's)
    if not records:
        return "loss curve not drawn: no step had a finite loss"
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    k = max(2, len(losses) // 20)
    mean = ([sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
            if len(losses) >= 10 else None)
    path = Path(out) / "loss.png"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ..weights import atomic_write
        from .plot import loss_png
        png = loss_png(steps, losses, mean)
        atomic_write(path, lambda tmp: tmp.write_bytes(png))
        return f"loss curve: {path} (plain: install matplotlib for a labelled figure)"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if mean is not None:
        ax.plot(steps, mean, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (KL(teacher || student) per position)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".loss.{os.getpid()}.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return f"loss curve: {path}"
