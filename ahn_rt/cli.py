"""What every ahn_rt command line shares: Ctrl-C at any moment (start-up included) prints one line and
exits 130, and warnings print as one line. Standard library only, so a command can install this before it
imports torch.
"""
from __future__ import annotations

import os
import signal
import sys
import warnings


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


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


def one_line_warnings():
    """Warnings print as 'warning: <message>' (no file, line or source echo)."""
    warnings.formatwarning = _one_line_warning
