"""The small pieces of Qwen's math that the runtime's references (``ahn_rt.ref``) and the training path
(``ahn_rt.train``) both compute, in one place; torch only, so that training imports nothing of the runtime."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen RMSNorm over the last dim: normalize in float32, round to x.dtype, then scale."""
    xf = x.float()
    r = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * r.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [..., T, nh, D]; cos, sin: [T, D] in x.dtype (dim i pairs with i + D/2)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]
