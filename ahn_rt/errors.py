"""The one exception type a user of ahn_rt sees for bad input: a one-line message that names the
problem and what to do. The CLI prints it and exits 2, with no traceback (1 for the subclasses of a runtime
failure, which say so in ``exit_code``: ``NonFiniteLogits`` here, train's ``Diverged``)."""
from __future__ import annotations

import collections.abc
import numbers


class AhnError(ValueError):
    """Bad input (file, option, checkpoint) described in one line."""


class NonFiniteLogits(AhnError):
    """A generation's logits held NaN or inf (weights that hold NaN/inf, or activations that overflowed): the
    generation stops with one line instead of "sampling" from them (the NaN's argmax, token 0: often the end of
    sequence, so an empty reply and no error). A runtime failure, not a usage error: a command exits 1
    (``exit_code``, as train's ``Diverged``)."""
    exit_code = 1


def as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer of any type (int, numpy's integers: what
    ``numbers.Integral`` names; never a bool), else None: the API's integer arguments take what its token
    ids take."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def unordered(value) -> bool:
    """Whether ``value`` is a set or a mapping: its order is not one the caller wrote (a set of ids iterates in
    hash order, a dict as its keys), so the API refuses it where it takes a sequence (ids, sessions, stops)."""
    return isinstance(value, (collections.abc.Set, collections.abc.Mapping))


def int_arg(value, what: str, minimum: int = 1, optional: bool = False, message: str | None = None) -> int | None:
    """An integer argument of the API as a Python int (``as_int``: any integer type, never a bool) that is at
    least ``minimum``; None passes when ``optional``. Else AhnError: ``message``, or "<what> must be a positive
    (non-negative) integer [or None], got <value>"."""
    if value is None and optional:
        return None
    n = as_int(value)
    if n is None or n < minimum:
        kind = {1: "positive", 0: "non-negative"}.get(minimum, f">= {minimum}")
        raise AhnError(message or f"{what} must be a {kind} integer{' or None' if optional else ''}, got {value!r}")
    return n


def oom_message(e: BaseException, fix: str) -> str:
    """The one line a command prints for a failed allocation (``out_of_memory``): the error's first non-empty
    line, cut, and ``fix``."""
    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return f"out of memory ({first[:160]}); {fix}"


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a failed allocation: torch.OutOfMemoryError (a GPU's), MemoryError, or the plain
    RuntimeError of torch's CPU allocator ("DefaultCPUAllocator: can't allocate memory"), which
    ``except torch.OutOfMemoryError`` let through as a traceback."""
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)))
