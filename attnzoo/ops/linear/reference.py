"""Readable linear attention (plain and magnitude-aware): the oracle the other backends are tested against.

Plain torch under autograd, no data-dependent control flow (export-friendly). Half
inputs are computed in fp32 and the result cast back; fp64 stays fp64 (gradcheck).
"""
from typing import Optional

import torch

Tensor = torch.Tensor


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on adjacent channel pairs: ``(x[2i], x[2i+1])`` turned by the angle whose
    cosine / sine are ``cos[n, i]`` / ``sin[n, i]`` (tables ``[N, D/2]``)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
                     scale: float, eps: float, magnitude_aware: bool) -> Tensor:
    """``q, k, v``: ``[B, heads, N, D]``; ``cos, sin``: ``[N, D/2]`` or None. See ``__init__``."""
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    n = q.shape[-2]
    # the query's magnitude term comes from the features BEFORE RoPE (MALA's order)
    z = scale * (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1))  # [B, heads, N, 1]
    if cos is not None:
        cos, sin = cos.to(compute), sin.to(compute)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    kv = (scale / n) * (k.transpose(-2, -1) @ v)  # [B, heads, D, D]
    num = q @ kv
    if magnitude_aware:
        out = num * (1 + 1 / (z + eps)) - z * v.mean(dim=-2, keepdim=True)
    else:
        out = num / (z + eps)
    return out.to(dtype)
