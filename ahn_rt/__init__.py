"""ahn_rt: a latency-first runtime for AHN-augmented Qwen models (Qwen2/2.5/3 + GatedDeltaNet memory).

The package imports lazily: ``import ahn_rt`` is cheap, and torch is imported on first use of
``ahn_rt.load`` / ``Model`` / ``Session`` (so a command line tool can set up its signal handling first).
"""
from .errors import AhnError

__all__ = ["AhnError", "Generation", "GenerationStats", "Model", "Session", "load"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in ("Generation", "GenerationStats", "Model", "Session", "load"):
        from . import runtime
        return getattr(runtime, name)
    raise AttributeError(f"module 'ahn_rt' has no attribute {name!r}")
