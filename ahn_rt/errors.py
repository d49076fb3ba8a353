"""The one exception type a user of ahn_rt sees for bad input: a one-line message that names the
problem and what to do. The CLI prints it and exits 2, with no traceback."""
from __future__ import annotations

import numbers


class AhnError(ValueError):
    """Bad input (file, option, checkpoint) described in one line."""


def as_int(value) -> int | None:
    """``value`` as a Python int when it is an integer of any type (int, numpy's integers: what
    ``numbers.Integral`` names; never a bool), else None: the API's integer arguments take what its token
    ids take."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)
