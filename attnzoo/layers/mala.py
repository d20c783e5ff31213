"""Magnitude-aware linear attention (MALA) and its softmax twin, as in MAViT (Fan et al., "Rectifying
Magnitude Neglect in Linear Attention", ICCV 2025, https://arxiv.org/abs/2507.00698 ; official code
https://github.com/qhfan/MALA).

Both modules read a ``[B, C, H, W]`` map: one 1x1 conv ``qkvo`` gives queries, keys, values
and an output gate ``o``; ``lepe`` (5x5 depthwise conv of v) adds a local positional term;
``proj`` maps ``(attention + lepe) * o`` back. The 2-D RoPE tables come from
``RotaryEmbedding2d`` (its ``angle`` buffer is the official ``RoPE.angle``), computed for
whatever map size arrives. Submodule names are the official ones, so checkpoints load by name.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from torch import nn

from ..ops.linear import magnitude_aware_linear_attention, rotate_pairs

__all__ = ["MagnitudeAwareLinearAttention", "RopeSoftmaxAttention", "RotaryEmbedding2d", "pointwise"]

Rope = Optional[Tuple[torch.Tensor, torch.Tensor]]


class RotaryEmbedding2d(nn.Module):
    """2-D RoPE tables for heads of ``head_dim`` channels (official ``RoPE``).

    The first half of a head's channels turn with the row index, the second half with the
    column index; ``angle`` (``head_dim / 2`` values, each frequency ``10000^-t``,
    ``t in linspace(0, 1, head_dim / 4)``, repeated for the two channels of a pair) is a
    persistent buffer, as in the official state_dict. ``forward(H, W)`` returns the
    ``(cos, sin)`` tables ``[H * W, head_dim / 2]`` of ``attnzoo.ops.linear`` for any map size,
    in the buffer's dtype (so the model's: ``.double()`` gives float64 tables), at least float32
    (a half phase ``row * angle`` is rounded by ~0.03 rad at row 56; the op upcasts anyway).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        head_dim = dim // num_heads
        if head_dim % 4:
            raise ValueError(f"RotaryEmbedding2d: head_dim {head_dim} (dim {dim} / {num_heads} heads) must be a "
                             "multiple of 4 (pairs of channels for each of the two axes)")
        angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
        self.register_buffer("angle", angle.repeat_interleave(2))

    def forward(self, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        angle = self.angle.to(torch.promote_types(self.angle.dtype, torch.float32))
        rows = torch.arange(height, device=angle.device, dtype=angle.dtype)
        cols = torch.arange(width, device=angle.device, dtype=angle.dtype)
        # phase of every channel, [H, W, head_dim]; channels 2i and 2i+1 share theirs
        phase = torch.cat([(rows[:, None] * angle).unsqueeze(1).expand(-1, width, -1),
                           (cols[:, None] * angle).unsqueeze(0).expand(height, -1, -1)], dim=-1)
        phase = phase.flatten(0, 1)[:, 0::2]
        return phase.cos(), phase.sin()


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``conv`` of a ``[B, C, H, W]`` map as ``F.linear`` over its channels-last view: one GEMM
    (PyTorch runs 1x1 convs through its im2col path on CPU, forward and backward), no copy when
    ``x`` is channels_last; the result is channels_last too. Keeps ``conv``'s state-dict keys."""
    return F.linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias).permute(0, 3, 1, 2)


class _QkvoAttention(nn.Module):
    """What both attentions share: ``qkvo``, ``lepe``, ``proj`` and the head split."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"{type(self).__name__}: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkvo = nn.Conv2d(dim, dim * 4, 1)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def features(self, qk: torch.Tensor) -> torch.Tensor:
        """``q | k`` channels (``[B, H, W, 2C]``) -> the maps attention reads (``phi`` for MALA)."""
        return qk

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        """``x`` ``[B, C, H, W]``, fastest channels_last (the result is channels_last);
        ``rope``: ``RotaryEmbedding2d(H, W)`` tables, or None."""
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__}: expected [B, {self.dim}, H, W], got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        # channels-last throughout: qkvo and proj are GEMMs over tokens, the features and heads are
        # row slices with unit channel stride (elementwise ops on the NCHW head views were strided)
        qkvo = F.linear(x.permute(0, 2, 3, 1), self.qkvo.weight.flatten(1), self.qkvo.bias)  # [B, H, W, 4C]
        # split, not slicing: the backward of a split is one cat, of each slice a zero-filled full-size grad
        qk, v, o = qkvo.split([2 * C, C, C], dim=-1)
        q, k = self.features(qk).chunk(2, dim=-1)
        v = v.contiguous()  # read by lepe (as channels_last) and attention
        lepe = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        # channel c = head * head_dim + d (official order); [B, heads, H*W, head_dim] views
        q, k, v = (t.reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if torch.compiler.is_compiling():
            # AOTAutograd failed on the backward of elu over strided views of one projection
            # ("view size is not compatible", seen with the NCHW views); eager keeps zero-copy views
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = self.attend(q, k, v, rope).transpose(1, 2).reshape(B, H, W, C)
        out = F.linear((out + lepe) * o, self.proj.weight.flatten(1), self.proj.bias)
        return out.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


class MagnitudeAwareLinearAttention(_QkvoAttention):
    """MALA (official ``AddLinearAttention``): ``phi = elu + 1`` features, then
    ``attnzoo.ops.linear.magnitude_aware_linear_attention`` (``z`` before RoPE, the
    numerator after it, ``eps`` 1e-6). ``backend`` is forwarded to the op."""

    def __init__(self, dim: int, num_heads: int, backend: Optional[str] = None):
        super().__init__(dim, num_heads)
        self.backend = backend

    def features(self, qk):
        return F.elu(qk).add_(1)  # phi on the contiguous-row q | k slice, one pass

    def attend(self, q, k, v, rope):
        return magnitude_aware_linear_attention(q, k, v, rope, scale=self.scale, backend=self.backend)


class RopeSoftmaxAttention(_QkvoAttention):
    """Softmax attention over the whole map with RoPE on q and k (official ``VanillaSelfAttention``,
    used by the released MAViTs in their last two stages). ``fused_attn`` (timm's switch): SDPA,
    else the explicit ``softmax(scale q k^T) v`` (which FLOP counters see; CPU SDPA they do not)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.fused_attn = use_fused_attn()

    def attend(self, q, k, v, rope):
        if rope is not None:
            q, k = rotate_pairs(q, *rope).to(v.dtype), rotate_pairs(k, *rope).to(v.dtype)
        if self.fused_attn:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return torch.softmax(self.scale * q @ k.transpose(-2, -1), dim=-1) @ v
