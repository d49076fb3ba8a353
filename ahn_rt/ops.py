"""The one place that chooses a backend for every hot op.

Model code calls only the functions here. Each dispatches to the compiled op ``torch.ops.ahn_rt.<name>``
(C++ on the CPU, CUDA kernels on the GPU; built from csrc/ into ``ahn_rt._C``) when the extension is
built and has an implementation for the tensors' device, else to the pure-torch reference
``ahn_rt.ref.<name>_ref`` of the same signature.

``AHN_RT_BACKEND=ref`` forces the references (the benchmark's "reference ops" row uses
``use_backend("ref")``); ``AHN_RT_BACKEND=ext`` makes a missing extension an error instead of a
fallback. With the default ``auto``, a missing extension is said once per process, in one line, when a
model is loaded (``note_backend``), and in the stats line.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from . import ref, settings
from .errors import AhnError

_ext_error: str | None = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.ahn_rt.*)
    from . import _meta  # noqa: F401  (fake implementations for torch.compile / opcheck)
except ImportError as e:  # pragma: no cover - depends on the build
    _ext_error = str(e)

try:
    _backend = settings.backend()
except settings.SettingsError as e:
    raise AhnError(str(e)) from None

BUILD_COMMAND = "pip install --no-build-isolation -e ."
_noted = False


def ext_available() -> bool:
    return _ext_error is None


def backend() -> str:
    """'ext' when compiled ops are used where they exist, 'ref' when only references are."""
    return "ref" if _backend == "ref" or not ext_available() else "ext"


def backend_note() -> str:
    """Why the references run, in a few words (for the stats line)."""
    if _backend == "ref":
        return "pure-torch reference ops (AHN_RT_BACKEND=ref)"
    return f"pure-torch reference ops, slow: the compiled extension is not built; run `{BUILD_COMMAND}`"


def note_backend():
    """At load: once per process, one line on stderr when the compiled ops are missing (auto mode)."""
    global _noted
    if _noted or _backend != "auto" or ext_available():
        return
    _noted = True
    print(f"ahn_rt: the compiled extension ahn_rt._C is not built, so the slow pure-torch reference ops "
          f"run; build it with `{BUILD_COMMAND}`", file=sys.stderr)


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily force 'ref' (or 'auto'/'ext') for the ops called inside the block."""
    global _backend
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def _use_ext(t: torch.Tensor) -> bool:
    if _backend == "ref":
        return False
    if not ext_available():
        if _backend == "ext":
            raise AhnError(f"the compiled extension ahn_rt._C is missing ({_ext_error}); "
                           "build it with: pip install --no-build-isolation -e .")
        return False
    return t.device.type in ("cpu", "cuda")


# ---- ops with a compiled implementation ------------------------------------------------------
def rms_norm(x, weight, eps):
    if _use_ext(x):
        shape = x.shape
        return torch.ops.ahn_rt.rms_norm(x.reshape(-1, shape[-1]), weight, eps).view(shape)
    return ref.rms_norm_ref(x, weight, eps)


def decode_prep(proj, inv_freq, pos, q_norm, k_norm, norm_eps, a_log, dt_bias, k_cache, v_cache,
                beta_cache, alpha_cache, sinks, window, k_evict, v_evict, beta_evict, alpha_evict):
    fn = torch.ops.ahn_rt.decode_prep if _use_ext(proj) else ref.decode_prep_ref
    return fn(proj, inv_freq, pos, q_norm, k_norm, norm_eps, a_log, dt_bias, k_cache, v_cache,
              beta_cache, alpha_cache, sinks, window, k_evict, v_evict, beta_evict, alpha_evict)


def swa_decode(q, k_cache, v_cache, pos, sinks, window, scale):
    fn = torch.ops.ahn_rt.swa_decode if _use_ext(q) else ref.swa_decode_ref
    return fn(q, k_cache, v_cache, pos, sinks, window, scale)


def gdn_decode(state, q, k, v, beta, alpha, z, norm_weight, o_proj, out, pos, sinks, window, eps):
    fn = torch.ops.ahn_rt.gdn_decode if _use_ext(q) else ref.gdn_decode_ref
    fn(state, q, k, v, beta, alpha, z, norm_weight, o_proj, out, pos, sinks, window, eps)


def gemv(x, weight, bias, norm_weight, norm_eps, residual, silu_mul, out_float):
    fn = torch.ops.ahn_rt.gemv if _use_ext(x) else ref.gemv_ref
    return fn(x, weight, bias, norm_weight, norm_eps, residual, silu_mul, out_float)


# ---- prefill path: torch implementations -------------------------------------------------------
def linear(x, weight, bias=None):
    """x @ weight^T (+ bias). torch has no fast float16 GEMM on the CPU (about 10x slower than bf16 on
    x86), so there float16 runs in float32, a block of weight rows at a time (no float32 copy of a whole
    LM head), and is rounded once: the same values up to summation order."""
    if x.dtype == torch.float16 and x.device.type == "cpu":
        xf = x.float()
        ys = [torch.nn.functional.linear(xf, w.float()) for w in weight.split(16384)]
        y = torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]
        return (y if bias is None else y + bias.float()).to(torch.float16)
    return torch.nn.functional.linear(x, weight, bias)


def window_attention(q, k, v, q_pos, k_pos, sinks, window, scale):
    if q.is_cuda and _backend != "ref":
        return _window_attention_sdpa(q, k, v, q_pos, k_pos, sinks, window, scale)
    return ref.window_attention_ref(q, k, v, q_pos, k_pos, sinks, window, scale)


def _window_attention_sdpa(q, k, v, q_pos, k_pos, sinks, window, scale):
    """The same masked attention through torch's fused SDPA (memory-efficient kernel, GQA native)."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    allowed = (kp <= qp) & ((qp - kp < window) | (kp < sinks))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=allowed, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1).contiguous()   # [T, H, D]


rope = ref.rope_ref
rope_cos_sin = ref.rope_cos_sin_ref
gdn_chunk = ref.gdn_chunk_ref
gdn_output = ref.gdn_output_ref


# ---- the Mamba2 memory: no compiled kernels yet -------------------------------------------------
# Its references run on every device, CUDA included (README: a known gap). mamba2_decode reads the position
# on the host, so a Mamba2 model decodes eagerly (memory.Mamba2.graph_safe is False): GatedDeltaNet and
# DeltaNet models keep their CUDA graph.
mamba2_chunk = ref.mamba2_chunk_ref
mamba2_output = ref.mamba2_output_ref


def mamba2_decode(state, q, k, v, dt, a_log, z, norm_weight, o_proj, out, pos, sinks, window, eps):
    ref.mamba2_decode_ref(state, q, k, v, dt, a_log, z, norm_weight, o_proj, out, pos, sinks, window, eps)
