"""Fake (meta) implementations of the compiled ops: output shapes and dtypes only.

torch.compile, FakeTensor tracing and ``torch.library.opcheck`` use these; imported by ``ahn_rt.ops``
right after ``ahn_rt._C`` (which defines the op schemas in csrc/ops.cpp).
"""
from __future__ import annotations

import torch


@torch.library.register_fake("ahn_rt::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.register_fake("ahn_rt::decode_prep")
def _decode_prep_fake(proj, inv_freq, pos, q_norm, k_norm, norm_eps, a_log, dt_bias, k_cache, v_cache,
                      beta_cache, alpha_cache, sinks, window, k_evict, v_evict, beta_evict, alpha_evict, slots=None):
    Hkv, _, D = k_cache.shape[-3:]
    P = proj.shape[-1]
    H = alpha_cache.shape[-1] if dt_bias is not None else (P - 2 * Hkv * D) // D
    lead = () if slots is None else (slots.shape[0],)
    return proj.new_empty(*lead, H, D)  # q after norm + RoPE: [H, D] (batched: [B, H, D])


@torch.library.register_fake("ahn_rt::swa_decode")
def _swa_decode_fake(q, k_cache, v_cache, pos, sinks, window, scale, slots=None):
    return q.new_empty(*q.shape[:-1], v_cache.shape[-1])  # [H, D] (batched: [B, H, D])


@torch.library.register_fake("ahn_rt::gdn_decode")
def _gdn_decode_fake(state, q, k, v, beta, alpha, z, norm_weight, o_proj, out, pos, sinks, window, eps, slots=None):
    return None  # mutates state and out in place


@torch.library.register_fake("ahn_rt::mamba2_decode")
def _mamba2_decode_fake(state, q, k, v, dt, a_log, z, norm_weight, o_proj, out, pos, sinks, window, eps, slots=None):
    return None  # mutates state and out in place


@torch.library.register_fake("ahn_rt::gemv")
def _gemv_fake(x, weight, bias, norm_weight, norm_eps, residual, silu_mul, out_float, static_weight=False,
               x_add=None):
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    return x.new_empty(*x.shape[:-1], n, dtype=torch.float32 if out_float else x.dtype)


@torch.library.register_fake("ahn_rt::gdn_chunk_prep")
def _gdn_chunk_prep_fake(q, k, v, beta, alpha, scale):
    n, H, Dk = q.shape
    Dv, C = v.shape[-1], 64   # kScanChunk
    N = (n + C - 1) // C
    f = dict(dtype=torch.float32)
    return (q.new_empty(H, N, C, Dk, **f), q.new_empty(H, N, C, Dv, **f), q.new_empty(H, N, Dk, C, **f),
            q.new_empty(H, N, C, Dk, **f), q.new_empty(H, N, **f), q.new_empty(H, N, C, C, **f))


@torch.library.register_fake("ahn_rt::mamba2_chunk_prep")
def _mamba2_chunk_prep_fake(q, k, v, dt, a_log):
    _, u, kd_t, qg, gl, P = _gdn_chunk_prep_fake(q, k, v, dt, None, 1.0)
    return u, kd_t, qg, gl, P


@torch.library.register_fake("ahn_rt::gdn_chunk_scan")
def _gdn_chunk_scan_fake(w, u, kd_t, qg, gl, state):
    return torch.empty_like(u), torch.empty_like(u)


@torch.library.register_fake("ahn_rt::attn_merge")
def _attn_merge_fake(outs, lses, offsets, rows):
    return outs[0].new_empty(rows, outs[0].shape[1], outs[0].shape[2])


@torch.library.register_fake("ahn_rt::band_attention")
def _band_attention_fake(q, k, v, left, scale, kv_len=None, q_len=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.register_fake("ahn_rt::silu_mul")
def _silu_mul_fake(x):
    return x.new_empty(x.shape[0], x.shape[1] // 2)


@torch.library.register_fake("ahn_rt::rope")
def _rope_fake(x, cos, sin):
    return x.new_empty(x.shape)


@torch.library.register_fake("ahn_rt::gdn_gate_norm")
def _gdn_gate_norm_fake(o, z, norm_weight, eps):
    return o.new_empty(o.shape)
