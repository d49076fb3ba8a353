"""What every ahn_rt command line shares: usage errors print one line and exit 2 (``ArgParser``), Ctrl-C at
any moment (start-up included) prints one line and exits 130, and warnings print as one line. Standard
library only, so a command can install this before it imports torch.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import warnings
from pathlib import Path


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, "error: <message> (see <prog> --help)", and exit 2, like
    every other user mistake (argparse's default prints the whole usage block first). Options must be
    spelled out: a prefix such as ``--step`` for ``--steps`` is an unknown option, so a script's command
    line cannot change meaning when a later version adds an option with the same prefix."""

    # What reads as a negative number, not an option: argparse's own pattern has no exponent or inf, so
    # "--lr -1e-3" said "expected one argument" instead of reaching the option's check.
    NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self.NEGATIVE_NUMBER

    def error(self, message):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def typed_number(convert, minimum, what, strict=False, maximum=None):
    """An argparse type: `convert`(text) >= minimum (> minimum when strict), at most `maximum` when given,
    and finite, else a one-line usage error."""
    def parse(text):
        try:
            v = convert(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if v != v or v < minimum or (strict and v == minimum):   # NaN, or below the minimum
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text!r}")
        if maximum is not None and v > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {text!r}")
        if v == float("inf"):   # a budget of inf seconds: JSON's Infinity, which strict readers refuse
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        return v
    parse.__name__ = what
    return parse


positive_int = typed_number(int, 1, "an integer")
nonneg_int = typed_number(int, 0, "an integer")
positive_float = typed_number(float, 0, "a number", strict=True)
nonneg_float = typed_number(float, 0, "a number")
fraction = typed_number(float, 0, "a number", maximum=1)   # a share: a number in [0, 1]


def once_each(values: list[int], texts: list[str], flag: str) -> list[int]:
    """`values` when each is there once; else ValueError naming the repeated value as the user wrote it
    (a repeated depth ran its rows twice, and the --json of gemv_bench, keyed by batch size, kept one)."""
    seen = {}
    for v, t in zip(values, texts):
        if v in seen:
            same = f"{seen[v]!r} and {t.strip()!r} are both {v}" if seen[v] != t.strip() else f"{v} is given twice"
            raise ValueError(f"{flag}: {same}; name each value once")
        seen[v] = t.strip()
    return values


def int_list(text: str, flag: str, minimum: int = 1, maximum: int | None = None, ascending: bool = False,
             example: str = "1,4,16") -> list[int]:
    """A comma list of integers in [minimum, maximum] ('1,4,16'), each once (increasing when ``ascending``);
    ValueError naming `flag` otherwise (an empty list too: an unset shell variable)."""
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise ValueError(f"{flag} needs at least one number, e.g. {example}")
    out = []
    for x in items:
        try:
            v = int(x)
        except ValueError:
            raise ValueError(f"{flag}: {x!r} is not an integer (give a comma list such as {example})") from None
        if v < minimum or (maximum is not None and v > maximum):
            bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"{flag}: every value must be {bounds}, got {v}")
        if ascending and out and v < out[-1]:
            raise ValueError(f"{flag}: give the values in increasing order, got {v} after {out[-1]}")
        out.append(v)
    return once_each(out, items, flag)


def interrupted(signum=None, frame=None):
    """Leave at once: one line on stderr, exit 130 (nothing half-written: every writer is atomic)."""
    try:
        sys.stderr.write("\ninterrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


def exit_on_interrupt():
    """From now on Ctrl-C exits with one line (call it first thing, before heavy imports)."""
    signal.signal(signal.SIGINT, interrupted)


def stderr_or_nowhere():
    """Started with stderr closed (2>&-): Python sets sys.stderr to None, and print(..., file=None) writes to
    stdout, so the stats line and every error went into the text a command writes there. The user closed it
    to silence those messages: they go nowhere instead (call it first thing in a command's main)."""
    if sys.stderr is None:
        # onto file descriptor 2 itself, so that what C++ (torch, CUDA) writes there goes nowhere too
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 2:
            os.dup2(fd, 2)
            os.close(fd)
        sys.stderr = open(2, "w", closefd=False)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


def one_line_warnings():
    """Warnings print as 'warning: <message>' (no file, line or source echo)."""
    warnings.formatwarning = _one_line_warning


# The runtime's modes, spelled once here (ahn_rt.config uses them; this module imports no torch).
MODES = ("ahn", "swa", "full")


def add_mode_argument(group):
    """--mode, as every command spells it (the benches that take a checkpoint too)."""
    group.add_argument("--mode", choices=list(MODES), help="default: ahn with AHN weights, else full")


def add_model_arguments(ap, weights_help: str, weights_required: bool = False):
    """The options that choose and configure a model, the same in every command; returns the group."""
    m = ap.add_argument_group("model")
    m.add_argument("--weights", required=weights_required, help=weights_help)
    m.add_argument("--ahn", help="separate AHN-only checkpoint (file or folder)")
    m.add_argument("--tokenizer", help="tokenizer.json, or a folder holding one (default: the one beside the weights)")
    m.add_argument("--window", type=int, help="sliding window W (default: config, else 32640)")
    m.add_argument("--sinks", type=int, help="attention sinks S (default: config, else 128)")
    add_mode_argument(m)
    m.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    m.add_argument("--dtype", help="bf16, fp16 or float32 (default: the checkpoint's)")
    m.add_argument("--chunk-size", type=int, default=None,
                   help="prompt tokens per prefill chunk (default 4096 on CUDA, 2048 on the CPU)")
    return m


# The model this project trained and ships (weights/README.md); the commands run it when --weights is not given.
DEMO_DIR = Path(__file__).resolve().parent.parent / "weights" / "demo"


def refuse_empty(value: str | None, flag: str, what: str) -> None:
    """AhnError when a path option was given empty (an unset shell variable): pathlib reads '' as the
    current folder, never what was meant."""
    if value is not None and not value.strip():
        from .errors import AhnError
        raise AhnError(f"{flag} is empty; give {what}")


def use_demo_weights(args) -> bool:
    """No --weights: point args.weights at the demo model (AhnError if this install has none). Returns
    whether it did."""
    if args.weights is not None:
        return False
    from .errors import AhnError
    if not (DEMO_DIR / "model.safetensors").exists():
        raise AhnError(f"no --weights given and the demo model is not in {DEMO_DIR}; "
                       "pass --weights PATH (a .safetensors file or a checkpoint folder)")
    args.weights = str(DEMO_DIR)
    return True


def load_model(args):
    """ahn_rt.load from the options of ``add_model_arguments``; the tokenizer is checked now, before any
    compute."""
    import ahn_rt
    for flag, what in (("weights", "a .safetensors file or a checkpoint folder"),
                       ("ahn", "an AHN checkpoint, or leave --ahn out"),
                       ("tokenizer", "a tokenizer.json or a folder holding one, or leave --tokenizer out")):
        refuse_empty(getattr(args, flag), "--" + flag, what)
    check_model_options(args)
    model = ahn_rt.load(args.weights, ahn=args.ahn, window=args.window, sinks=args.sinks, dtype=args.dtype,
                        device=args.device, mode=args.mode, chunk_size=args.chunk_size, tokenizer=args.tokenizer)
    model.tokenizer
    return model


def check_model_options(args):
    """AhnError for --mode / --window / --sinks / --chunk-size that would be ignored or refused: --window or
    --sinks with --mode full, or with a checkpoint that has no AHN weights and no --mode (it runs full
    attention, which keeps every token), checked on the checkpoint's headers before the weights load.
    ``load_model`` runs it; a command that loads its model its own way or starts a server (a bench) runs it on
    the same options (``args.weights`` None: random weights of the command's own, which hold an AHN memory; no
    ``args.chunk_size``: a command without --chunk-size)."""
    from .errors import AhnError
    if args.mode == "full" and (args.window is not None or args.sinks is not None):
        raise AhnError("--window and --sinks do nothing with --mode full (full attention keeps every token): "
                       "drop them, or use --mode ahn / swa")
    from .errors import int_arg   # named by their flags here (the API's own checks name its parameters)
    for flag, value, minimum in (("--window", args.window, 1), ("--sinks", args.sinks, 0),
                                 ("--chunk-size", getattr(args, "chunk_size", None), 1)):
        if value is not None:
            int_arg(value, flag, minimum, message=f"{flag} must be >= {minimum}, got {value}")
    if args.weights is not None and args.mode is None and (args.window is not None or args.sinks is not None):
        from .weights import open_checkpoint   # (the files' headers only; a bad path: ahn_rt.load's own message)
        try:
            has_ahn = open_checkpoint(args.weights, args.ahn).has_ahn
        except Exception:  # noqa: BLE001
            has_ahn = True
        if not has_ahn:
            raise AhnError("--window / --sinks were given, but this checkpoint has no AHN weights, so it runs full "
                           "attention, which keeps every token: add --mode swa for sinks + window only, or --ahn "
                           "PATH, or drop them")
