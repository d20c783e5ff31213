"""2-D (dilated) neighborhood attention module (Hassani et al., NAT https://arxiv.org/abs/2204.07143 ;
DiNAT https://arxiv.org/abs/2209.15001).

Built on ``attnzoo.ops.neighborhood.na2d``; parameter names (``qkv``, ``rpb``,
``proj``) and the qkv channel order ``(3, heads, head_dim)`` are NATTEN's
``NeighborhoodAttention2D``, so the released NAT / DiNAT checkpoints load by name.
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from torch import nn

from ..ops.neighborhood import na2d

__all__ = ["NeighborhoodAttention2d"]


class NeighborhoodAttention2d(nn.Module):
    """Multi-head neighborhood attention over a channels-last map ``[B, H, W, C]``.

    Each query attends the ``kernel_size`` neighbours of its dilation sub-grid
    (windows clamped at the borders), plus a relative positional bias ``rpb``
    ``[heads, 2k-1, 2k-1]``. An axis shorter than ``kernel_size * dilation`` is
    zero-padded at its end (bottom / right) up to that length *before* the qkv
    projection and cropped after the attention, as NATTEN 0.14 (pinned by the
    official NAT/DiNAT code) does: the padded positions are ordinary keys whose
    k / v are the qkv bias; they are not masked.

    Args:
        dim: channels (``num_heads * head_dim``).
        num_heads: attention heads.
        kernel_size: odd neighborhood size (int or per-axis pair).
        dilation: sub-grid step (int or pair).
        stride: query grouping of ``na2d`` (int or pair); the output keeps the input size.
        qkv_bias: bias of the qkv projection.
        rpb: learn the relative positional bias.
        attn_drop: must be 0: ``na2d`` never materialises the attention weights.
        proj_drop: dropout after the output projection.
        backend: forwarded to ``na2d`` (None: ``$ATTNZOO_BACKEND`` or the best that can run).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: Union[int, Tuple[int, int]],
            dilation: Union[int, Tuple[int, int]] = 1,
            stride: Union[int, Tuple[int, int]] = 1,
            qkv_bias: bool = True,
            rpb: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            backend: Optional[str] = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"NeighborhoodAttention2d: dim {dim} is not divisible by num_heads {num_heads}")
        self.kernel_size = to_2tuple(kernel_size)
        self.dilation = to_2tuple(dilation)
        self.stride = to_2tuple(stride)
        if any(k < 1 or k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"NeighborhoodAttention2d: kernel_size must be odd, got {kernel_size}")
        if any(d < 1 for d in self.dilation) or any(s < 1 for s in self.stride):
            raise ValueError(f"NeighborhoodAttention2d: dilation and stride must be >= 1, got {dilation}, {stride}")
        if attn_drop:
            raise ValueError("NeighborhoodAttention2d: attn_drop is not supported (na2d is fused; "
                             "the official NAT/DiNAT models use 0)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if rpb:
            kh, kw = self.kernel_size
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kh - 1, 2 * kw - 1))
            trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"NeighborhoodAttention2d: expected [B, H, W, C], got shape {tuple(x.shape)}")
        B, H, W, C = x.shape
        pad_h = max(0, self.kernel_size[0] * self.dilation[0] - H)
        pad_w = max(0, self.kernel_size[1] * self.dilation[1] - W)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        q, k, v = self.qkv(x).reshape(B, Hp, Wp, 3, self.num_heads, self.head_dim).unbind(3)
        x = na2d(q, k, v, self.kernel_size, self.dilation, self.stride, rpb=self.rpb, scale=self.scale,
                 backend=self.backend)
        x = x.reshape(B, Hp, Wp, C)
        if pad_h or pad_w:
            x = x[:, :H, :W]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, stride={self.stride}, rpb={self.rpb is not None}")
