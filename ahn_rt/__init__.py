"""ahn_rt: a latency-first runtime for AHN-augmented Qwen models (Qwen2/2.5/3 + GatedDeltaNet memory).

The package imports lazily: ``import ahn_rt`` is cheap, and torch is imported on first use of
``ahn_rt.load`` / ``Model`` / ``Session`` (so a command line tool can set up its signal handling first).
"""
import warnings

from .errors import AhnError

# torch warns at import when NumPy is absent; ahn_rt never uses NumPy (it is not a dependency), so that
# warning would only confuse the first run on a fresh machine.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__all__ = ["AhnError", "Generation", "GenerationStats", "Model", "Session", "load"]
__version__ = "0.1.0"


def __dir__():
    # the lazy names too, so that dir(ahn_rt) and completion in an editor or REPL list the API
    return sorted(set(globals()) | set(__all__))


def __getattr__(name):
    if name in ("Generation", "GenerationStats", "Model", "Session", "load"):
        from . import runtime
        return getattr(runtime, name)
    raise AttributeError(f"module 'ahn_rt' has no attribute {name!r}")
