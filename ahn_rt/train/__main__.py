"""Command line: train the AHN memory of a frozen Qwen base by self-distillation (docs/semantics.md §10).

    python -m ahn_rt.train --base Qwen2.5-3B-Instruct/ --data sft.jsonl --out runs/ahn3b \\
        --seq-len 24576 --grad-accum 128 --dtype bf16

writes OUT/model.safetensors (AHN only, official names, loadable with ``ahn_rt.load(BASE, ahn=...)``) and
OUT/config.json, OUT/log.jsonl (one record per optimizer step), OUT/loss.png (matplotlib's figure when it is
installed, else a plain one), OUT/resume/ (continue a stopped or killed run with --resume) and, with --merge,
OUT/merged/ (base + AHN in one folder).

Several GPUs: the same command under torchrun (``torchrun --nproc_per_node N -m ahn_rt.train ...``); data
parallel by default (--ddp), --fsdp shards the frozen base and the AHN over the ranks (ahn_rt/train/dist.py).
The global batch (--batch x --grad-accum x ranks) defines the run; only rank 0 prints and writes OUT.

A user's mistake (missing or unusable base/data, bad option or environment switch, unwritable --out, an --out
another run is writing) prints one line and exits 2 before anything is written; Ctrl-C prints one line and
exits 130, leaving the last complete resume state. Messages and progress go to stderr; if it stops taking
them (``2>&1 | head -1``), the run goes on without them. A run whose loss, gradient norm or AHN weights stop
being finite prints one line and exits 1 without writing model.safetensors (resume states from before stay).
"""
from __future__ import annotations

import os
import signal
import sys


from ..cli import interrupted as _interrupted
from ..cli import ArgParser, one_line_warnings, refuse_empty, stderr_or_nowhere

if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupted)   # Ctrl-C while torch is being imported: one line, exit 130

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from ..devices import prefer_expandable_segments  # noqa: E402
from ..errors import AhnError, oom_message, out_of_memory  # noqa: E402

PROG = "python -m ahn_rt.train"
# Settings that define a run: a resumed run takes them from its saved state, and a flag that contradicts
# the saved value is an error (it would silently change the losses the resume is meant to reproduce).
RUN_DEFAULTS = {
    "steps": None, "seq_len": 24576, "min_len": 0, "batch": 1, "grad_accum": 1, "lr": 1e-4,
    "warmup_ratio": 0.1, "weight_decay": 0.1, "max_grad_norm": 1.0, "window_min": None, "window_max": None,
    "window": None, "sinks": None, "ce_weight": 0.0, "seed": 0, "dtype": None, "loss_on": "assistant",
    "activation_checkpointing": "layer", "ahn": None, "decay_init": "official", "train_layers": None,
}
BATCH_KEYS = ("batch", "grad_accum")      # resolved through the global batch (_resolve_batch)
# Recorded with the run but chosen anew by every invocation, a resume included: they change how a step is
# computed (memory, speed), not its numbers.
PER_INVOCATION = ("activation_checkpointing",)
# What the run writes at the end: recorded with the run, so that a resume ("continue with --resume") writes
# the outputs the uninterrupted run would have; a flag given again on the resume replaces the saved value.
OUTPUT_DEFAULTS = {"save_dtype": "bf16", "infer_window": None, "infer_sinks": None, "merge": False}
OUTPUT_FILES = ("model.safetensors", "config.json", "log.jsonl", "loss.png", "run.json")
MAX_LAYERS = 100_000                       # --train-layers: numbers below this (then checked against the base)
SEED_MAX = 2**63 - 1                       # --seed: 0..SEED_MAX (torch.manual_seed overflows beyond 2**64 - 1)


def _env_rank() -> int:
    """The rank torchrun gave this process (0 without torchrun); read before torch is imported."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _Parser(ArgParser):
    """The one-line usage errors of every ahn_rt command, printed by rank 0 only under torchrun (every rank
    parses the same command line)."""

    def error(self, message):
        if _env_rank() == 0:
            super().error(message)
        _grace()
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Train the AHN memory (GatedDeltaNet, DeltaNet or Mamba2) of a frozen Qwen "
                                        "model by self-distillation from the same model with full attention.")
    io = ap.add_argument_group("inputs and outputs")
    io.add_argument("--base", required=True, help="base model: .safetensors file or checkpoint folder")
    io.add_argument("--data", required=True, help="JSONL: {\"text\"}, {\"messages\"} (ChatML) or {\"input_ids\"}")
    io.add_argument("--out", required=True, help="output folder")
    io.add_argument("--tokenizer", help="tokenizer.json for text/messages data (default: the base's)")
    io.add_argument("--resume", action="store_true", help="continue the run saved in OUT/resume")
    io.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds a run")
    io.add_argument("--init-from-base", action="store_true",
                    help="start from the AHN weights the base checkpoint holds (default: a fresh memory)")
    io.add_argument("--init-ahn", metavar="PATH", help="start from this AHN-only checkpoint")
    io.add_argument("--ahn", choices=["gdn", "dn", "mamba2"], help="the memory variant: GatedDeltaNet, DeltaNet or "
                    "Mamba2 (default: the --init-ahn / --init-from-base checkpoint's, else gdn)")
    io.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                    help="also write OUT/merged/ (base + AHN); a resume keeps the run's choice unless given "
                         "(--no-merge turns it off)")
    io.add_argument("--save-dtype", choices=["bf16", "float32"],
                    help="dtype of the saved AHN tensors (default bf16, like the official release)")
    io.add_argument("--infer-window", type=int, help="sliding_window written to config.json (default: "
                    "--window of a fixed-window run, else the runtime default 32640)")
    io.add_argument("--infer-sinks", type=int, help="num_attn_sinks written to config.json (default: "
                    "--sinks of a fixed-window run, else 128)")
    d = ap.add_argument_group("data")
    d.add_argument("--seq-len", type=int, help="cut sequences at this many tokens (default 24576)")
    d.add_argument("--min-len", type=int, help="drop sequences shorter than this (default 0; the released "
                                               "recipe used 288)")
    d.add_argument("--loss-on", choices=["assistant", "all"], help="messages records: loss on assistant "
                                                                    "turns (default) or on every token")
    w = ap.add_argument_group("window (default: S+W drawn per sequence, see docs/semantics.md §10)")
    w.add_argument("--window-min", type=int, help="smallest total budget S+W to draw")
    w.add_argument("--window-max", type=int, help="largest total budget S+W to draw")
    w.add_argument("--window", type=int, help="fixed window W (with --sinks)")
    w.add_argument("--sinks", type=int, help="fixed number of sink tokens S (with --window)")
    o = ap.add_argument_group("optimization")
    o.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    o.add_argument("--batch", type=int, help="sequences per micro-batch (default 1)")
    o.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    o.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    o.add_argument("--warmup-ratio", type=float, help="linear warmup share of the steps (default 0.1)")
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay of the projections (default 0.1)")
    o.add_argument("--max-grad-norm", type=float, help="gradient clipping norm, 0 = off (default 1.0)")
    o.add_argument("--ce-weight", type=float, help="add this times the student's cross-entropy (default 0)")
    o.add_argument("--seed", type=int, help="data order, windows and AHN init (default 0)")
    o.add_argument("--decay-init", choices=["official", "long"],
                   help="a fresh memory's decay gates: the official initialization (default; most heads forget "
                        "within tens of tokens), or long: half-lives log-spaced from 64 to 4096 tokens "
                        "(GatedDeltaNet and Mamba2)")
    o.add_argument("--train-layers", type=_layer_list, metavar="LIST",
                   help="train only these layers' memory, e.g. 5 or 0,3-5 (default: every layer); the others keep "
                        "their starting weights (a fresh memory: o_proj = 0, so they add nothing)")
    o.add_argument("--dtype", choices=["bf16", "float32"],
                   help="bf16: base in bf16, bf16 autocast, fp32 master AHN weights (default on cuda); "
                        "float32 (default on cpu)")
    ck = o.add_mutually_exclusive_group()   # (both given: the last won, silently)
    ck.add_argument("--activation-checkpointing", choices=["layer", "memory", "none"],
                   help="what the backward pass recomputes: layer (default): each decoder layer, the least "
                        "memory; memory: only each layer's AHN memory module, which saves the most per token "
                        "(faster than layer); none: nothing (the fastest, the most memory); the same numbers")
    ck.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_const",
                   const="none", help="the same as --activation-checkpointing none")
    r = ap.add_argument_group("run")
    r.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    r.add_argument("--log-every", type=int, default=10, help="progress line every N steps when stderr is "
                                                              "not a terminal (default 10)")
    r.add_argument("--save-every", type=int, default=100, help="resume state every N steps (default 100; "
                                                                "0 = only at the end)")
    r.add_argument("--stop-after", type=int, help="stop after this optimizer step, with a resume state "
                                                  "(continue with --resume)")
    g = ap.add_argument_group("several GPUs (under torchrun --nproc_per_node N; see docs/training.md)")
    par = g.add_mutually_exclusive_group()
    par.add_argument("--ddp", dest="parallel", action="store_const", const="ddp",
                     help="data parallel: every rank holds the whole model, the AHN gradients are summed over "
                          "the ranks once per optimizer step (default)")
    par.add_argument("--fsdp", dest="parallel", action="store_const", const="fsdp",
                     help="FSDP2: shard the frozen base's decoder layers and the AHN modules over the ranks, "
                          "for bases too large for one GPU (only the AHN shards carry optimizer state)")
    g.add_argument("--allow-global-batch-change", action="store_true",
                   help="--resume with another global batch (batch x grad-accum x ranks) than the saved run's")
    ap.set_defaults(parallel="ddp")
    return ap


def _layer_list(text: str) -> list[int]:
    """'5' / '0,3-5' -> sorted layer indices (argparse type: a ValueError becomes its one-line error)."""
    out = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of layer numbers such as 5 or 0,3-5")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise argparse.ArgumentTypeError(f"{part.strip()!r}: a range goes from low to high")
        if b >= MAX_LAYERS:        # checked against the base later; this bounds the list built here
            raise argparse.ArgumentTypeError(f"{part.strip()!r}: layer {b} is beyond any model's layers "
                                             f"(numbered from 0; fewer than {MAX_LAYERS:,})")
        out.update(range(a, b + 1))
    return sorted(out)


def _flag_value(v) -> str:
    """A setting as it is written on the command line (a --train-layers list as 0,3,4)."""
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


# ----------------------------------------------------------------------------------------------
# Checking the command line, before anything is read or written
# ----------------------------------------------------------------------------------------------
def _check_args(a):
    def need(cond, msg):
        if not cond:
            raise AhnError(msg)
    need(a.out.strip() != "", "--out is empty; give the output folder (--out . for the current one)")
    for name, what in (("base", "the base model's .safetensors file or checkpoint folder"), ("data", "a .jsonl file"),
                       ("init_ahn", "an AHN checkpoint, or leave the flag out"),
                       ("tokenizer", "a tokenizer.json, or leave the flag out")):
        refuse_empty(getattr(a, name), "--" + name.replace("_", "-"), what)
    for name, lo in (("steps", 1), ("seq_len", 2), ("batch", 1), ("grad_accum", 1), ("window", 1),
                     ("sinks", 0), ("window_min", 1), ("window_max", 1), ("min_len", 0), ("stop_after", 1),
                     ("infer_window", 1), ("infer_sinks", 0)):
        v = getattr(a, name)
        need(v is None or v >= lo, f"--{name.replace('_', '-')} must be >= {lo}, got {v}")
    from ..config import MAX_CACHE_SLOTS
    for name in ("window", "sinks", "infer_window", "infer_sinks"):    # written to config.json (see _run)
        v = getattr(a, name)
        need(v is None or v <= MAX_CACHE_SLOTS, f"--{name.replace('_', '-')} {v} is more than a state can hold (at "
             f"most {MAX_CACHE_SLOTS} = 2**31 - 1 cache slots, sinks + window); lower it")
    need(a.log_every >= 1, f"--log-every must be >= 1, got {a.log_every}")
    need(a.seed is None or 0 <= a.seed <= SEED_MAX, f"--seed must be in 0..{SEED_MAX}, got {a.seed}")
    need(a.save_every >= 0, f"--save-every must be >= 0, got {a.save_every}")
    for name in ("lr", "warmup_ratio", "weight_decay", "max_grad_norm", "ce_weight"):
        v = getattr(a, name)
        need(v is None or (math.isfinite(v) and v >= 0), f"--{name.replace('_', '-')} must be a finite number "
                                                          f">= 0, got {v}")
    need(a.lr is None or a.lr > 0, "--lr must be > 0")
    # AdamW applies lr / (1 - beta1) = 10 lr (the first step's bias correction) and 1 - lr x weight decay as
    # float32 scalars: beyond float32's range it stops with an overflow error instead of diverging
    lr = a.lr if a.lr is not None else RUN_DEFAULTS["lr"]
    wd = a.weight_decay if a.weight_decay is not None else RUN_DEFAULTS["weight_decay"]
    need(lr * max(10.0, wd) < 3e38, f"--lr {lr:g}" + (f" x --weight-decay {wd:g}" if wd > 10 else "")
         + " is too large: AdamW's float32 update overflows; lower it")
    need(a.warmup_ratio is None or a.warmup_ratio <= 1, f"--warmup-ratio must be <= 1, got {a.warmup_ratio}")
    need((a.window is None) == (a.sinks is None),
         "--window and --sinks go together (a fixed window needs both); without them S+W is drawn per sequence")
    if a.window is not None:
        need(a.window_min is None and a.window_max is None,
             "--window-min/--window-max restrict the drawn window; they cannot go with a fixed --window/--sinks")
    if a.window_min is not None or a.window_max is not None:
        from .data import BUDGETS
        lo, hi = a.window_min or 0, a.window_max or BUDGETS[-1]
        need(a.window_min is None or a.window_max is None or lo <= hi,
             f"--window-min {lo} is above --window-max {hi}; swap them")
        given = " and ".join(f"--window-{k} {v}" for k, v in (("min", a.window_min), ("max", a.window_max))
                             if v is not None)
        need(any(lo <= b <= hi for b in BUDGETS),
             f"{given}: none of the total budgets S+W {list(BUDGETS)} is in that range; widen it")
    need(not (a.init_from_base and a.init_ahn), "--init-from-base and --init-ahn are two different starts; give one")
    need(not (a.resume and (a.init_from_base or a.init_ahn)),
         "--resume continues from OUT/resume; --init-from-base/--init-ahn only choose a new run's start")
    need(not (a.resume and a.overwrite), "--resume and --overwrite contradict each other; give one")
    from .. import settings
    try:
        settings.check("AHN_RT_TRAIN_ATTENTION")   # the environment switch training reads (never the ops' backend)
    except settings.SettingsError as e:
        raise AhnError(f"{e}; set one of those or unset it") from None


def _check_out(out: Path):
    """OUT must be a folder we can create or write into (checked before anything is written)."""
    if out.exists() and not out.is_dir():
        raise AhnError(f"--out {out} is a file; give a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise AhnError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AhnError(f"--out {out}: folder {parent} is not writable; choose another --out")
    try:        # what os.access cannot tell (root, /proc, a read-only mount): make a folder there and remove it
        os.rmdir(tempfile.mkdtemp(prefix=".ahn_rt-probe-", dir=parent))
    except OSError as e:
        raise AhnError(f"--out {out}: cannot create a folder in {parent} ({e.strerror or e}); "
                       "choose another --out") from None


def _holds_run_files(out: Path) -> bool:
    """OUT holds a run's log or model (with or without a resume state)."""
    return any((out / f).exists() for f in ("model.safetensors", "log.jsonl"))


def _not_from_a_run(out: Path) -> list[str]:
    """What the run would overwrite in OUT that no run wrote (a run writes run.json first): another model's
    model.safetensors or config.json, say, in a folder given as --out."""
    if (out / "run.json").exists():
        return []
    return [name for name in ("config.json", "log.jsonl", "loss.png", "merged", "model.safetensors")
            if (out / name).exists()]


def _has_resume_state(out: Path) -> bool:
    """OUT holds a resume state (``checkpoint.find_resume``, without importing torch)."""
    return any((out / name / "state.json").is_file() for name in ("resume", "resume.old"))


def _check_out_spares_inputs(out: Path, a):
    """No input may lie where the run writes: OUT/model.safetensors, config.json, log.jsonl, loss.png, run.json,
    and OUT/merged, resume, resume.old (which --overwrite removes). A base (or --init-ahn) folder that is OUT was
    written over by the AHN-only outputs; a --tokenizer in OUT/merged was removed by --overwrite before the
    merged model copied it, and a --data OUT/log.jsonl was emptied."""
    if not out.is_dir():
        return
    o = out.resolve()
    written = [o / name for name in OUTPUT_FILES]
    trees = [o / name for name in ("merged", "resume", "resume.old")]
    for flag in ("base", "init_ahn", "data", "tokenizer"):
        given = getattr(a, flag)
        if not given:
            continue
        path = Path(given).expanduser()
        if not path.exists():
            continue                        # (said later, as "not found")
        p = path.resolve()
        folder = p if p.is_dir() else p.parent
        hit = (p in written or any(t == p or t in p.parents for t in trees)
               or (flag in ("base", "init_ahn") and folder == o))
        if hit:
            raise AhnError(f"--{flag.replace('_', '-')} {given} lies in --out {out}, where the run writes (model."
                           "safetensors, config.json, log.jsonl, loss.png, run.json, merged/, resume/); copy it "
                           "elsewhere or choose another --out")


def _resolve_run(a, saved: dict | None, world_size: int = 1) -> dict:
    """The run-defining settings: flags, else the saved run (resume), else the defaults; the batch through
    the global batch (``_resolve_batch``)."""
    run = {}
    for k, default in RUN_DEFAULTS.items():
        if k in BATCH_KEYS:
            continue
        given = getattr(a, k)
        if saved is not None and k in saved and k not in PER_INVOCATION:
            if given is not None and given != saved[k]:
                flag = "--" + k.replace("_", "-")
                was = (f"was started without {flag}" if saved[k] is None
                       else f"has {flag} {_flag_value(saved[k])}")
                raise AhnError(f"{flag} {_flag_value(given)} differs from the resumed run, which {was}; "
                               "drop the flag or start a new run in another --out")
            run[k] = saved[k]
        else:
            run[k] = given if given is not None else default
    run.update(_resolve_batch(a, saved, world_size))
    for k, default in OUTPUT_DEFAULTS.items():
        given = getattr(a, k)                      # None: not given (a resume keeps the saved choice)
        run[k] = given if given is not None else (saved or {}).get(k, default)
    return run


def _resolve_batch(a, saved: dict | None, world: int) -> dict:
    """batch (sequences per micro-batch and rank), grad_accum and global_batch = batch x grad_accum x ranks.
    The global batch is what defines a run (which sequences make a step), not how it is split: a resume
    keeps it on any number of ranks, taking grad_accum = global / (batch x ranks) unless --grad-accum is
    given; a different global batch needs --allow-global-batch-change."""
    if saved is None:
        b, k = a.batch or 1, a.grad_accum or 1
        return {"batch": b, "grad_accum": k, "global_batch": b * k * world}
    g = int(saved.get("global_batch") or int(saved.get("batch") or 1) * int(saved.get("grad_accum") or 1))
    b = a.batch if a.batch is not None else int(saved.get("batch") or 1)
    if a.grad_accum is not None:
        k = a.grad_accum
    elif g % (b * world) == 0:
        k = g // (b * world)
    else:
        raise AhnError(f"the resumed run's global batch of {g} sequences is not a multiple of --batch {b} x "
                       f"{_n(world, 'rank')}; give --batch and --grad-accum with batch x grad-accum x ranks = {g}")
    new = b * k * world
    if new != g and not a.allow_global_batch_change:
        raise AhnError(f"global batch {new} (--batch {b} x --grad-accum {k} x {_n(world, 'rank')}) differs from "
                       f"the resumed run's {g}; keep {g}, or pass --allow-global-batch-change to continue with {new}")
    return {"batch": b, "grad_accum": k, "global_batch": new}


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def run(a) -> int:
    from . import dist

    try:
        _check_args(a)
        out = Path(a.out).expanduser()
        _check_out(out)
        _check_out_spares_inputs(out, a)
        d = dist.setup(a.device)
    except AhnError as e:
        e.same_on_every_rank = True        # the command line and this machine: every rank sees the same
        raise
    interrupted = finished = False
    lock = _OutLock()
    try:
        code = _run(a, d, out, lock)
        finished = True
        return code
    except KeyboardInterrupt:
        interrupted = True                 # other ranks may sit in a collective: leave without closing
        raise
    finally:
        lock.release()
        if not interrupted:
            dist.teardown(d, finished)


class _OutLock:
    """An exclusive lock on the folder OUT while a run writes there (rank 0): a second run started into the
    same --out (a command given twice, a job restarted while the first still runs) stops with one line,
    instead of both appending to log.jsonl and writing resume states over each other. flock on the folder
    itself, so nothing is written into it; the system releases it when the process ends, a kill included.
    Where the file system has no flock (some network mounts), the run goes on unlocked."""

    def __init__(self):
        self.fd = None

    def take(self, out: Path):
        """Lock OUT if it exists (and is not locked by this run already); AhnError if another run holds it."""
        if self.fd is not None or not out.is_dir():
            return
        try:
            import fcntl
            fd = os.open(out, os.O_RDONLY)
        except (ImportError, OSError):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AhnError(f"--out {out} is in use by another training run that is still going; wait for it to "
                           "end (--resume then continues it), or choose another --out") from None
        except OSError:
            os.close(fd)
            return
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _run(a, d, out: Path, lock: _OutLock) -> int:
    import torch

    from .. import weights as W
    from ..config import DEFAULT_SINKS, DEFAULT_WINDOW, check_cache_slots, parse_dtype
    from . import checkpoint as ckpt_io
    from . import attention, dist
    from .data import BudgetSpec, load_dataset
    from .trainer import Progress, TrainSettings, Trainer, read_log, truncate_log

    def say(msg):
        if d.is_main:
            print(f"[ahn_rt.train] {msg}", file=sys.stderr)

    # Every rank reads and checks everything; rank 0 writes OUT only once all ranks have (dist.agreed: a
    # mistake is printed once, by the lowest rank that found it, and every rank exits 2).
    def report(e):
        print(f"error{_rank_tag(d.rank)}: {e}", file=sys.stderr, flush=True)

    with dist.agreed(d, report):
        if d.is_main:
            lock.take(out)       # before OUT is read: another run may be writing there
        # ---- the resume state, or a fresh OUT --------------------------------------------------
        resume_dir, saved_state = None, None
        if a.resume:
            resume_dir = ckpt_io.find_resume(out) if out.is_dir() else None
            if resume_dir is None:
                raise AhnError(f"--resume: no resume state in {out} (expected {out / 'resume' / 'state.json'}); "
                               + ("the run there stopped before its first one (written every --save-every "
                                  "steps): start it over with --overwrite instead of --resume"
                                  if _holds_run_files(out) else "run without --resume to start a new run"))
            saved_state, saved_ahn, saved_tensors = ckpt_io.load_resume(resume_dir)
            at = int(saved_state["step"])
            if a.stop_after is not None and a.stop_after <= at:   # else: nothing trained, "stopped after step"
                raise AhnError(f"--stop-after {a.stop_after}: the resumed run is already at step {at} (of "
                               f"{int(saved_state['schedule']['total_steps'])}); give --stop-after above {at}, "
                               "or leave it out to train to the end")
        elif out.is_dir() and not a.overwrite and ckpt_io.find_resume(out):
            raise AhnError(f"{out} already holds a training run; pass --resume to continue it, --overwrite to "
                           "start over, or choose another --out")
        elif out.is_dir() and not a.overwrite and (foreign := _not_from_a_run(out)):
            raise AhnError(f"--out {out} holds {' and '.join(foreign)}, not from a training run (no "
                           "run.json), which the run would overwrite; choose an empty or new --out, or pass "
                           "--overwrite to replace it")
        elif out.is_dir() and not a.overwrite and _holds_run_files(out):
            raise AhnError(f"{out} already holds a training run with no resume state to continue it from; pass "
                           "--overwrite to start over, or choose another --out")
        run_cfg = _resolve_run(a, saved_state["run"] if saved_state else None, d.world_size)
        device = d.device
        attention.check_trainable(device)
        if run_cfg["dtype"] is None:
            run_cfg["dtype"] = "bf16" if device.type == "cuda" else "float32"
        bf16 = run_cfg["dtype"] == "bf16"
        if run_cfg["window"] is not None:
            budget = BudgetSpec(fixed=(run_cfg["window"], run_cfg["sinks"]))
        else:
            budget = BudgetSpec(wt_min=run_cfg["window_min"], wt_max=run_cfg["window_max"])

        # ---- the base model --------------------------------------------------------------------
        base_path = Path(a.base).expanduser()
        try:
            ckpt = W.open_checkpoint(base_path, a.init_ahn)
        except W.AhnOnlyCheckpoint:
            raise AhnError(f"--base {base_path} is an AHN-only checkpoint; give the base model as --base "
                           f"(and this file as --init-ahn to start from it)") from None
        except W.NoAhnTensors:
            raise AhnError(f"--init-ahn {a.init_ahn} holds no AHN tensors (model.layers.N.ahn.fn.*); give an "
                           "AHN checkpoint (a run's OUT/model.safetensors), or --init-from-base for a base "
                           "that holds AHN weights") from None
        config = ckpt.config
        base_keys = {k for k in ckpt.src.where if not W.is_ahn_key(k)}
        base_ahn_keys = {k for k in ckpt.src.where if W.is_ahn_key(k)}
        optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
        W.check_keys(W.base_shapes(config), ckpt.src, base_keys, f"base {base_path}", optional=optional)
        if a.init_from_base and not base_ahn_keys:
            raise AhnError(f"--init-from-base: {base_path} holds no AHN weights (model.layers.N.ahn.fn.*); drop "
                           "--init-from-base for a fresh memory, or give an AHN checkpoint as --init-ahn")
        # The memory variant: --ahn, else the resumed run's, else the starting checkpoint's, else GatedDeltaNet.
        from .. import memory
        start_impl = config.ahn_implementation if (a.init_from_base or a.init_ahn) else None
        impl = memory.resolve(run_cfg["ahn"] or start_impl)
        run_cfg["ahn"] = memory.get(impl).short
        starts = []        # (flag, tensors, their AHN keys, as named in the error)
        if a.init_from_base:
            starts.append(("--init-from-base", ckpt.src, base_ahn_keys, f"base {base_path}"))
        if a.init_ahn:
            starts.append(("--init-ahn", ckpt.ahn_src, {k for k in ckpt.ahn_src.where if W.is_ahn_key(k)},
                           f"--init-ahn {a.init_ahn}"))
        for flag, src, keys, what in starts:
            try:
                W.check_ahn_keys(config, src, keys, what, impl)
            except AhnError as e:       # what to do: the variant the tensors are, or another start
                fits = [memory.get(m).short for m in memory.NAMES if set(W.ahn_shapes(config, m)) == keys]
                fix = (f"pass --ahn={fits[0]}, or leave out --ahn" if fits else
                       f"start from AHN weights trained for this --base, or drop {flag} for a fresh memory")
                raise AhnError(f"{e}; {fix}") from None
        files = sorted(set(ckpt.src.where.values()), key=str)
        base_cfg = W.find_config(base_path, files)
        if saved_state and saved_state.get("base_config") not in (None, base_cfg):
            raise AhnError(f"--base {base_path} is not the model the resumed run trained (its config differs); "
                           "give the --base it started from, or start a new run in another --out")
        # W and S written to config.json: a fixed-window run's own; a random-window run's are the runtime's
        # defaults (S + W = 32768, as the official release); --infer-window / --infer-sinks override both.
        fixed_w, fixed_s = run_cfg["window"], run_cfg["sinks"]
        infer_w, infer_s = run_cfg["infer_window"], run_cfg["infer_sinks"]
        infer = (infer_w if infer_w is not None else fixed_w if fixed_w is not None else DEFAULT_WINDOW,
                 infer_s if infer_s is not None else fixed_s if fixed_s is not None else DEFAULT_SINKS)
        # what the runtime loads (its own rule): checked here, before anything is written
        check_cache_slots(*infer, names=tuple(
            f"--infer-{k}" if given is not None else f"--{k}" if fixed is not None else f"the default {k}"
            for k, given, fixed in (("window", infer_w, fixed_w), ("sinks", infer_s, fixed_s))))
        out_cfg = ckpt_io.output_config(base_cfg, config.family, *infer, implementation=impl)

        # ---- the data --------------------------------------------------------------------------
        tok_path = (Path(a.tokenizer).expanduser() if a.tokenizer
                    else (ckpt.folder or base_path.parent) / "tokenizer.json")
        if a.tokenizer and not tok_path.exists():
            raise AhnError(f"tokenizer file not found: {tok_path}")
        data = load_dataset(Path(a.data).expanduser(), vocab_size=config.vocab_size, seq_len=run_cfg["seq_len"],
                            budget=budget, min_len=run_cfg["min_len"], tokenizer_path=tok_path,
                            family=config.family, loss_on=run_cfg["loss_on"])
        if saved_state and saved_state.get("data_fingerprint") not in (None, data.fingerprint):
            raise AhnError(f"--data {a.data} is not the data the resumed run trained on (its tokens differ); "
                           "give the --data (and --tokenizer) it started from, or start a new run in another --out")
        if run_cfg["global_batch"] > len(data):
            ranks = f" x {_n(d.world_size, 'rank')}" if d.world_size > 1 else ""
            raise AhnError(f"--batch {run_cfg['batch']} x --grad-accum {run_cfg['grad_accum']}{ranks} = "
                           f"{run_cfg['global_batch']} sequences per step, but {a.data} has only "
                           f"{_n(len(data), 'usable sequence')} (a step would repeat them); lower --batch or "
                           "--grad-accum")

        layers = run_cfg["train_layers"]
        if layers is not None and layers[-1] >= config.num_layers:
            raise AhnError(f"--train-layers {','.join(map(str, layers))}: the base has layers 0..{config.num_layers - 1}")

        if base_ahn_keys and not a.init_from_base and not a.resume:   # after the checks: an error comes alone
            start = (f"the memory starts from --init-ahn {a.init_ahn}" if a.init_ahn
                     else "a fresh memory starts with o_proj = 0; pass --init-from-base to start from them")
            say(f"note: {base_path} holds AHN weights; they are not used ({start})")
        # ---- model and trainer -----------------------------------------------------------------
        from .model import TrainModel
        base_dtype = torch.bfloat16 if bf16 else torch.float32
        if saved_state:
            ahn_init = saved_ahn
        elif a.init_from_base:
            ahn_init = {k: ckpt.src.get(k).float() for k in W.ahn_shapes(config, impl)}
        elif a.init_ahn:
            ahn_init = {k: ckpt.ahn_src.get(k).float() for k in W.ahn_shapes(config, impl)}
        else:
            ahn_init = None
        base = {k: ckpt.src.get(k) for k in W.base_shapes(config)}
        base_fp = ckpt_io.base_fingerprint(base)
        if saved_state and saved_state.get("base_fingerprint") not in (None, base_fp):
            raise AhnError(f"--base {base_path} is not the model the resumed run trained (same config, other "
                           "weights); give the base it started from, or start a new run in another --out")
        torch.manual_seed(run_cfg["seed"])
        # A fresh memory's start (TrainModel refuses it with given AHN weights or a variant without decay);
        # a resumed run already holds the weights it started from.
        decay_init = "official" if saved_state else run_cfg["decay_init"]
        model = TrainModel(config, base, ahn_init, base_dtype=base_dtype, seed=run_cfg["seed"],
                           implementation=impl, decay_init=decay_init).to(dist.model_device(a.parallel, d))
        del base
        parallel = dist.make_parallel(a.parallel, d, model)      # before the optimizer: FSDP swaps parameters
        settings = TrainSettings(
            steps=run_cfg["steps"], batch=run_cfg["batch"], grad_accum=run_cfg["grad_accum"], lr=run_cfg["lr"],
            warmup_ratio=run_cfg["warmup_ratio"], weight_decay=run_cfg["weight_decay"],
            max_grad_norm=run_cfg["max_grad_norm"], ce_weight=run_cfg["ce_weight"], seed=run_cfg["seed"],
            budget=budget, autocast_bf16=bf16, activation_checkpointing=run_cfg["activation_checkpointing"],
            log_every=a.log_every, save_every=a.save_every, stop_after=a.stop_after,
            train_layers=None if layers is None else tuple(layers))
        trainer = Trainer(model, data, settings, device=device, parallel=parallel)
        if saved_state:
            trainer.load_state(saved_state, saved_tensors)

    # ---- from here on OUT is written (rank 0 only) -----------------------------------------------
    if d.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:       # checked before (_check_out); the file system changed since
            raise AhnError(f"--out {out}: cannot create it ({e.strerror or e}); choose another --out") from None
        lock.take(out)           # OUT is new (or appeared since): taken before anything is written there
        ckpt_io.remove_stale_temporaries(out)
        if saved_state:
            truncate_log(out, trainer.step)
        elif a.overwrite:
            for name in (ckpt_io.RESUME, ckpt_io.RESUME_OLD, "merged"):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in OUTPUT_FILES:
                if (out / name).exists():
                    (out / name).unlink()
        run_record = dict(run_cfg, steps=trainer.total_steps)
        W.atomic_write_text(out / "run.json", json.dumps({
            "base": str(base_path), "data": str(a.data), "run": run_record, "window": budget.describe(),
            "world_size": d.world_size, "parallel": parallel.name,
            "data_stats": data.stats.line(), "sequences": len(data), "tokens": data.num_tokens}, indent=1) + "\n")

    n_ahn = sum(p.numel() for _, p in trainer.named)
    n_base = sum(p.numel() for p in model.parameters()) - n_ahn
    n_trained = sum(p.numel() for _, p in trainer.trained)
    split = (f" (--batch {settings.batch} x --grad-accum {settings.grad_accum} x {d.world_size} ranks)"
             if d.world_size > 1 else "")
    say(f"{data.stats.line()}; {data.num_tokens:,} tokens")
    only = (f" (training layers {','.join(map(str, layers))} only: {n_trained:,})" if layers is not None else "")
    say(f"{n_ahn:,} AHN parameters ({100 * n_ahn / max(1, n_base):.2f}% of the frozen base){only}, "
        f"{_n(trainer.total_steps, 'step')} of {_n(run_cfg['global_batch'], 'sequence')}{split}, "
        f"{budget.describe()}, {run_cfg['dtype']} on {device}"
        + (f", {parallel.describe()}" if d.world_size > 1 else "")
        + (f"; resumed at step {trainer.step}" if saved_state else ""))
    progress = (Progress(trainer.total_steps, trainer.step, every=a.log_every, world_size=d.world_size)
                if d.is_main else None)
    # Besides the settings (checked on resume), the state records what identifies base and data.
    identity = {"base_config": base_cfg, "base_fingerprint": base_fp, "data_fingerprint": data.fingerprint}
    try:
        trainer.fit(out, run=run_cfg, config=out_cfg, identity=identity, progress=progress)
    finally:
        if progress is not None:
            progress.close()

    if trainer.step < trainer.total_steps:
        say(f"stopped after step {trainer.step} of {trainer.total_steps}; continue with --resume")
        return 0
    ahn = trainer.ahn_weights()          # every rank: --fsdp gathers the shards
    if not d.is_main:
        return 0
    save_dtype = parse_dtype(run_cfg["save_dtype"])
    try:
        path = ckpt_io.write_model(out, ahn, config, out_cfg, save_dtype)
        msg = f"wrote {path} and {out / 'config.json'} (sliding_window {infer[0]}, num_attn_sinks {infer[1]})"
        if run_cfg["merge"]:
            merged_cfg = dict(out_cfg, torch_dtype=base_cfg.get("torch_dtype", "bfloat16"))
            folder = ckpt_io.write_merged(out, ckpt, ahn, merged_cfg, save_dtype)
            msg += f" and {folder}"
    except AhnError as e:   # write_checkpoint's one line (disk full, OUT removed): a file error of the running
        raise OSError(0, str(e)) from None   # job like the others (exit 1; the last resume state rewrites them)
    say(msg)
    say(ckpt_io.plot_loss(out, read_log(out)))
    return 0


class _Diagnostics:
    """sys.stderr while the command runs: what it says there (progress, notes, errors) must never stop the
    training. When the reader is gone (``... 2>&1 | head -1``: BrokenPipeError) or the stream fails (a full
    disk behind ``2>log``), the run goes on without it: nothing more is written there, and the stream's file
    descriptor is pointed at os.devnull, so that torch's own writes and the flush at exit go nowhere too."""

    def __init__(self, stream):
        self._stream = stream
        self._failed = False

    def write(self, text: str) -> int:
        if not self._failed:
            try:
                return self._stream.write(text)
            except OSError:
                self._give_up()
        return len(text)

    def flush(self):
        if not self._failed:
            try:
                self._stream.flush()
            except OSError:
                self._give_up()

    def _give_up(self):
        self._failed = True
        try:
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        except (OSError, ValueError, AttributeError):   # no file descriptor (a test's capture): nothing to do
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv=None) -> int:
    stderr_or_nowhere()
    stderr = sys.stderr
    sys.stderr = _Diagnostics(stderr)
    try:
        return _main(argv)
    finally:
        if isinstance(sys.stderr, _Diagnostics):
            sys.stderr = stderr


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    one_line_warnings()
    prefer_expandable_segments()   # before the first CUDA allocation (a no-op on the CPU)
    from .dist import PeerFailed
    rank = _env_rank()
    previous = signal.getsignal(signal.SIGINT)
    previous_term = signal.getsignal(signal.SIGTERM)
    if threading_main():
        # from here Ctrl-C (or SIGTERM, a scheduler's preemption) raises KeyboardInterrupt, so that
        # cleanups run before the one-line exit
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _term_as_interrupt)
    try:
        return run(args)
    except AhnError as e:
        if rank == 0 or not getattr(e, "same_on_every_rank", False):   # under torchrun: said once
            print(f"error{_rank_tag(rank)}: {e}", file=sys.stderr, flush=True)
        else:
            _grace()
        return getattr(e, "exit_code", 2)            # 2: a user's mistake; 1: a runtime failure (Diverged)
    except PeerFailed as e:                          # another rank failed and said why
        return e.code
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, _interrupted)   # a second Ctrl-C while we print: leave at once
        if rank == 0:
            out = Path(args.out).expanduser()
            if _has_resume_state(out):
                msg = f"the last complete resume state is in {out / 'resume'}, continue with --resume"
            elif _holds_run_files(out):
                msg = ("stopped before the first resume state (written every --save-every steps); start over "
                       "with --overwrite")
            else:
                msg = "nothing to resume yet; run the command again"
            print(f"\ninterrupted; {msg}", file=sys.stderr)
        return 130
    except OSError as e:   # while the run went on: the disk filled up, OUT was removed or made read-only
        what = e.strerror or (str(e).splitlines()[0][:160] if str(e) else type(e).__name__)
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        out = Path(args.out).expanduser()
        if _has_resume_state(out):
            then = "then continue from the last resume state with --resume"
        elif _holds_run_files(out):   # stopped before its first resume state: --resume would refuse it
            then = "then start it over with --overwrite (no resume state was written yet)"
        else:
            then = "then run the command again"
        print(f"error{_rank_tag(rank)}: {what}{where}; the run stopped. Fix that (free space, restore --out), "
              f"{then}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as e:   # torch.OutOfMemoryError; the CPU allocator's is a plain RuntimeError
        if not out_of_memory(e):
            raise
        print(f"error{_rank_tag(rank)}: " + oom_message(e, "lower --batch or --seq-len, use --dtype bf16, or shard "
                                                      "the base with --fsdp"), file=sys.stderr)
        return 1
    finally:
        if threading_main():
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous_term if previous_term is not None else signal.SIG_DFL)


def _grace():
    """A rank other than 0 that stops on the same mistake as rank 0 waits a moment before it exits: torchrun
    stops every rank as soon as one exits with an error, and rank 0 is the one that says why. Stopped while
    it waits (SIGTERM from torchrun, or Ctrl-C), it leaves quietly: no KeyboardInterrupt traceback."""
    import time
    if threading_main():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    time.sleep(2.0)


def _rank_tag(rank: int) -> str:
    return f" (rank {rank})" if rank else ""


def _term_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
