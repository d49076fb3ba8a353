"""ahn_rt: a latency-first runtime for AHN-augmented Qwen models (Qwen2/2.5/3 + GatedDeltaNet memory)."""
from .errors import AhnError
from .runtime import GenerationStats, Model, Session, load

__all__ = ["AhnError", "GenerationStats", "Model", "Session", "load"]
__version__ = "0.1.0"
