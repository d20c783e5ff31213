"""Bi-level routing attention module (BiFormer, Zhu et al., CVPR 2023, https://arxiv.org/abs/2303.08810).

Built on ``attnzoo.ops.routing.bra``; submodule names (``qkv.qkv``, ``wo``, ``lepe``)
and the qkv channel order ``[q (qk_dim) | k (qk_dim) | v (dim)]``, heads contiguous
inside each, are the official ``ops/bra_legacy.py`` ones, so BiFormer checkpoints load by name.
"""
from typing import Optional

import torch
from torch import nn

from ..ops.routing import bra

__all__ = ["BiLevelRoutingAttention"]


class QKVLinear(nn.Module):
    """One linear for q, k, v (official ``QKVLinear``; the extra level keeps the key ``qkv.qkv``)."""

    def __init__(self, dim: int, qk_dim: int, bias: bool = True):
        super().__init__()
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=bias)

    def forward(self, x: torch.Tensor):
        return self.qkv(x).split([self.qk_dim, self.qk_dim, self.qkv.out_features - 2 * self.qk_dim], dim=-1)


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention over a channels-last map ``[B, H, W, C]``.

    The map is cut into ``n_win x n_win`` regions; each region attends the tokens of
    its ``topk`` most affine regions (region-mean q . k, shared by all heads, not
    differentiated). A 5x5 depthwise conv of V (LePE) is added to the attention output
    before ``wo``. Any map size: the op pads to a multiple of ``n_win`` and masks the
    padding out of the routing and the attention (the official ``auto_pad`` instead
    lets the padded tokens take part), and LePE sees the unpadded map.

    Args:
        dim: channels of x and of v.
        num_heads: attention heads (the official model uses ``qk_dim // 32``).
        n_win: regions per side.
        topk: regions attended per region; -1: all (dense).
        qk_dim: q / k channels; must equal ``dim`` (the op takes one head dim for q, k, v).
        qk_scale: logit scale; default ``qk_dim ** -0.5`` over *all* heads, as the official code.
        side_dwconv: LePE kernel size (0: none).
        qkv_bias: bias of the qkv projection.
        backend: forwarded to ``bra`` (None: ``$ATTNZOO_BACKEND`` or the best that can run).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            n_win: int = 7,
            topk: int = 4,
            qk_dim: Optional[int] = None,
            qk_scale: Optional[float] = None,
            side_dwconv: int = 5,
            qkv_bias: bool = True,
            backend: Optional[str] = None,
    ):
        super().__init__()
        qk_dim = qk_dim or dim
        if qk_dim != dim:
            raise ValueError(f"BiLevelRoutingAttention: qk_dim {qk_dim} must equal dim {dim} "
                             "(the routing op uses one head dim for q, k and v)")
        if dim % num_heads:
            raise ValueError(f"BiLevelRoutingAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.scale = qk_scale or qk_dim ** -0.5
        self.backend = backend
        self.qkv = QKVLinear(dim, qk_dim, bias=qkv_bias)
        self.wo = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv else None

    def forward(self, x: torch.Tensor, return_index: bool = False):
        """``[B, H, W, C]`` -> ``[B, H, W, C]`` (and the routing ``[B, n_win**2, topk]`` if asked)."""
        if x.dim() != 4:
            raise ValueError(f"BiLevelRoutingAttention: expected [B, H, W, C], got shape {tuple(x.shape)}")
        B, H, W, C = x.shape
        q, k, v = self.qkv(x)
        if self.lepe is not None:
            v = v.contiguous()  # the conv reads it as channels_last with no copy of its own
        heads = (B, H, W, self.num_heads, C // self.num_heads)
        out, idx = bra(q.reshape(heads), k.reshape(heads), v.reshape(heads), self.n_win, self.topk,
                       scale=self.scale, backend=self.backend, return_index=True)
        out = out.reshape(B, H, W, C)
        if self.lepe is not None:
            out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.wo(out)
        return (out, idx) if return_index else out

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}, scale={self.scale:.4g}"
