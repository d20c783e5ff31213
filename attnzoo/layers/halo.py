"""Halo attention (Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient
Visual Backbones", CVPR 2021, https://arxiv.org/abs/2103.12731).

A drop-in for timm's ``timm.layers.HaloAttn``: same constructor arguments, same
parameters (``q``, ``kv``, ``pos_embed.height_rel``, ``pos_embed.width_rel``) and the
same maths, so timm HaloNet checkpoints load by name. The attention itself runs on
``attnzoo.ops.neighborhood.na2d(border="zero_pad")``: queries are grouped in
``block_size`` blocks (``stride=block_size``), every block attends the
``block_size + 2 * halo_size`` window centred on it, keys outside the map are zeros
that take part in the softmax (timm zero-pads ``kv``), and timm's relative position
logits are passed as per-query biases ``rel_h`` / ``rel_w``.

Relative logits (derived from timm's ``rel_logits_1d``): a query at row ``r`` inside
its (possibly downsampled) block and the key at window row ``i`` get
``q . height_rel[i - r + win - 1]`` (likewise for columns with ``width_rel``).

Differences from timm: any input size works (timm asserts ``H``, ``W`` divisible by
``block_size``); a map that is not a multiple of the block is treated as if zero-padded
at its bottom / right to one, which is exactly timm's result on the zero-padded input
(``kv`` has no bias in every timm HaloNet) cropped back.

Stride 2 follows timm: with ``block_size % 2 == 0`` the queries are those of a
stride-2 ``q`` conv (``block_size // 2`` queries per block side, still attending the
full-resolution window), otherwise (or with ``avg_down``) full-resolution attention
followed by ``AvgPool2d(2, 2)``. The strided queries go to the op as they are, with
``query_stride=2`` (query ``r`` sits at key row ``2 r``), so they cost a quarter of
full-resolution queries.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import make_divisible, trunc_normal_
from torch import nn

from ..ops.neighborhood import na2d

__all__ = ["HaloAttention", "HaloPosEmbedRel"]


class HaloPosEmbedRel(nn.Module):
    """timm's ``PosEmbedRel`` parameters (``height_rel``, ``width_rel``: ``[2 * win - 1, dim_head]``)
    computed as per-query, per-window-row / -column biases for ``na2d``."""

    def __init__(self, block_size: int, win_size: int, dim_head: int, scale: float, device=None, dtype=None):
        super().__init__()
        self.block_size = block_size
        self.win_size = win_size
        self.dim_head = dim_head
        self.scale = scale
        self.height_rel = nn.Parameter(torch.empty(win_size * 2 - 1, dim_head, device=device, dtype=dtype))
        self.width_rel = nn.Parameter(torch.empty(win_size * 2 - 1, dim_head, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.height_rel, std=self.scale)
        nn.init.normal_(self.width_rel, std=self.scale)

    def _table(self, rel: torch.Tensor, length: int) -> torch.Tensor:
        """``[length, win, dim]``: for map position ``p`` (block-local ``r = p % block``) and
        window index ``i``, the embedding ``rel[i - r + win - 1]``."""
        r = torch.arange(length, device=rel.device) % self.block_size
        i = torch.arange(self.win_size, device=rel.device)
        return rel[i[None, :] - r[:, None] + self.win_size - 1]

    def forward(self, q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """q ``[B, H, W, heads, D]`` -> ``(rel_h [B, H, W, heads, win], rel_w [B, H, W, heads, win])``."""
        _, H, W, _, _ = q.shape
        rel_h = torch.einsum("byxnd,yid->byxni", q, self._table(self.height_rel, H))
        rel_w = torch.einsum("byxnd,xjd->byxnj", q, self._table(self.width_rel, W))
        return rel_h, rel_w


class HaloAttention(nn.Module):
    """Halo attention with timm ``HaloAttn``'s arguments and parameters.

    Args:
        dim: input channels.
        dim_out: output channels (default ``dim``); the v head dim is ``dim_out // num_heads``.
        feat_size: unused (argument compatibility with timm's self-attention layers).
        stride: 1 or 2; see the module docstring.
        num_heads: attention heads.
        dim_head: q / k head dim; default ``make_divisible(dim_out * qk_ratio, 8) // num_heads``.
        block_size: query block side.
        halo_size: halo around each block; the key window is ``block_size + 2 * halo_size``.
        qk_ratio: q / k width relative to ``dim_out`` when ``dim_head`` is not set.
        qkv_bias: bias on the q and kv projections.
        avg_down: downsample with ``AvgPool2d(2, 2)`` instead of strided query blocks.
        scale_pos_embed: scale the relative logits as well as ``q . k``.
        backend: ``na2d`` backend (default: the best that can run).
    """

    def __init__(
            self,
            dim: int,
            dim_out: Optional[int] = None,
            feat_size: Optional[Tuple[int, int]] = None,
            stride: int = 1,
            num_heads: int = 8,
            dim_head: Optional[int] = None,
            block_size: int = 8,
            halo_size: int = 3,
            qk_ratio: float = 1.0,
            qkv_bias: bool = False,
            avg_down: bool = False,
            scale_pos_embed: bool = False,
            backend: Optional[str] = None,
            device=None,
            dtype=None,
    ):
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        dim_out = dim_out or dim
        if dim_out % num_heads != 0:
            raise ValueError(f"HaloAttention: dim_out {dim_out} must be divisible by num_heads {num_heads}")
        if stride not in (1, 2):
            raise ValueError(f"HaloAttention: stride must be 1 or 2, got {stride}")
        if block_size < 1 or halo_size < 0:
            raise ValueError(f"HaloAttention: need block_size >= 1 and halo_size >= 0, got {block_size}, {halo_size}")
        self.num_heads = num_heads
        self.dim_head_qk = dim_head or make_divisible(dim_out * qk_ratio, divisor=8) // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.dim_out_v = num_heads * self.dim_head_v
        self.scale = self.dim_head_qk ** -0.5
        self.scale_pos_embed = scale_pos_embed
        self.block_size = self.block_size_ds = block_size
        self.halo_size = halo_size
        self.win_size = block_size + halo_size * 2
        self.block_stride = 1
        self.backend = backend
        use_avg_pool = False
        if stride > 1:
            use_avg_pool = avg_down or block_size % stride != 0
            self.block_stride = 1 if use_avg_pool else stride
            self.block_size_ds = block_size // self.block_stride

        self.q = nn.Conv2d(dim, self.dim_out_qk, 1, stride=self.block_stride, bias=qkv_bias, **dd)
        self.kv = nn.Conv2d(dim, self.dim_out_qk + self.dim_out_v, 1, bias=qkv_bias, **dd)
        self.pos_embed = HaloPosEmbedRel(self.block_size_ds, self.win_size, self.dim_head_qk, self.scale, **dd)
        self.pool = nn.AvgPool2d(2, 2) if use_avg_pool else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.q.weight.shape[1] ** -0.5  # fan-in, as timm
        trunc_normal_(self.q.weight, std=std)
        trunc_normal_(self.kv.weight, std=std)
        trunc_normal_(self.pos_embed.height_rel, std=self.scale)
        trunc_normal_(self.pos_embed.width_rel, std=self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise RuntimeError(f"HaloAttention: input must be [B, C, H, W], got shape {tuple(x.shape)}")
        B, _, H, W = x.shape
        nh, dqk, dv, s = self.num_heads, self.dim_head_qk, self.dim_head_v, self.block_stride

        q = self.q(x)  # [B, heads * dqk, ceil(H / s), ceil(W / s)]
        Hq, Wq = q.shape[-2:]
        # permuted views of the NCHW conv outputs: the op returns the output and the gradients in
        # its inputs' memory layout, so this layer hands NCHW-contiguous tensors on, forward and
        # backward (split before the permute: its backward is then a cat of NCHW gradients)
        q = q.view(B, nh, dqk, Hq, Wq).permute(0, 3, 4, 1, 2)  # [B, Hq, Wq, heads, dqk]
        k, v = (t.permute(0, 3, 4, 1, 2) for t in self.kv(x).view(B, nh, dqk + dv, H, W).split([dqk, dv], dim=2))

        rel_h, rel_w = self.pos_embed(q)  # block-local positions of the (strided) queries
        if self.scale_pos_embed:
            rel_h, rel_w = rel_h * self.scale, rel_w * self.scale

        # the op wants one head dim: zero channels change neither q . k nor (sliced off) the output
        d = max(dqk, dv)
        if dqk < d:
            q, k = F.pad(q, [0, d - dqk]), F.pad(k, [0, d - dqk])
        if dv < d:
            v = F.pad(v, [0, d - dv])
        # strided query r of a block sits at full-resolution row s * r of it: the op's query stride
        out = na2d(q, k, v, self.win_size, stride=self.block_size, scale=self.scale, backend=self.backend,
                   border="zero_pad", rel_h=rel_h, rel_w=rel_w, query_stride=s)
        out = out[..., :dv]
        # a view when the output is NCHW-laid (q was); contiguous() copies only odd sizes' crops
        out = out.permute(0, 3, 4, 1, 2).reshape(B, self.dim_out_v, Hq, Wq).contiguous()
        return self.pool(out)
