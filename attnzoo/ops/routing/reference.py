"""Readable reference for bi-level routing attention (BiFormer): the test oracle.

Layout: ``q, k, v``: ``[B, H, W, heads, D]``. The map is cut into ``nh x nw`` regions
of ``h x w`` tokens after zero-padding it at the bottom / right to ``(nh * h, nw * w)``
(the official ``auto_pad``); regions are numbered row-major, ``r = ry * nw + rx``, and
token ``t`` of a region is ``(ry * h + t // w, rx * w + t % w)``.

``route`` (shared by every backend, so all of them attend the same regions) averages
q and k over the *valid* tokens of each region, over all heads and channels together,
and keeps the ``topk`` key regions of largest affinity per query region. ``bra`` then
gathers the selected regions exactly like the official code (``expand`` to
``[B, nR, nR, ...]`` + ``torch.gather``: ``topk`` copies of K and V) and runs softmax
attention with padded keys masked out. Memory is ``topk`` times that of K and V, so
this is for tests and small maps only; ``cpu.py`` is the fast path.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def geometry(H: int, W: int, num_regions: Tuple[int, int]) -> Tuple[int, int]:
    """Region size ``(h, w)``: the map padded up to a multiple of the region grid."""
    nh, nw = num_regions
    return (H + nh - 1) // nh, (W + nw - 1) // nw  # not -(-a // b): the ONNX tracer truncates that


def token_index(B: int, H: int, W: int, num_regions: Tuple[int, int], device) -> Tuple[Tensor, Tensor]:
    """``[B, nR, h*w]`` flat index ``b*H*W + y*W + x`` of every region token, and its validity
    ``[nR, h*w]`` (False on the padding, whose index is set to the batch's first token)."""
    nh, nw = num_regions
    h, w = geometry(H, W, num_regions)
    ys = (torch.arange(nh, device=device)[:, None] * h + torch.arange(h, device=device)[None])  # [nh, h]
    xs = (torch.arange(nw, device=device)[:, None] * w + torch.arange(w, device=device)[None])  # [nw, w]
    y = ys[:, None, :, None].expand(nh, nw, h, w).reshape(nh * nw, h * w)
    x = xs[None, :, None, :].expand(nh, nw, h, w).reshape(nh * nw, h * w)
    valid = (y < H) & (x < W)
    flat = torch.where(valid, y * W + x, torch.zeros_like(y))
    flat = flat[None] + (torch.arange(B, device=device) * (H * W))[:, None, None]
    return flat, valid


def regionize(x: Tensor, num_regions: Tuple[int, int]) -> Tensor:
    """``[B, H, W, heads, D]`` -> zero-padded ``[B, nR, h*w, heads, D]``."""
    B, H, W, heads, D = x.shape
    nh, nw = num_regions
    h, w = geometry(H, W, num_regions)
    x = F.pad(x, (0, 0, 0, 0, 0, nw * w - W, 0, nh * h - H))
    x = x.view(B, nh, h, nw, w, heads, D).permute(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(B, nh * nw, h * w, heads, D)


def unregionize(x: Tensor, num_regions: Tuple[int, int], H: int, W: int) -> Tensor:
    """Inverse of ``regionize``, cropped back to ``H x W``."""
    B, _, _, heads, D = x.shape
    nh, nw = num_regions
    h, w = geometry(H, W, num_regions)
    x = x.view(B, nh, nw, h, w, heads, D).permute(0, 1, 3, 2, 4, 5, 6).reshape(B, nh * h, nw * w, heads, D)
    return x[:, :H, :W]


@torch.no_grad()
def route(q: Tensor, k: Tensor, num_regions: Tuple[int, int], topk: int) -> Tensor:
    """Top-``topk`` key regions per query region, ``[B, nR, topk]`` (int64, not differentiable).

    Region means count valid tokens only; a region with none is never preferred to one
    with some (its affinity is -inf), so every query sees at least its valid regions.
    ``topk >= nR`` selects every region, in order.
    """
    B, H, W, heads, D = q.shape
    nR = num_regions[0] * num_regions[1]
    if topk >= nR:
        return torch.arange(nR, device=q.device).expand(B, nR, nR)
    _, valid = token_index(B, H, W, num_regions, q.device)
    # fp32 sums for half inputs: bf16 region means would reorder near-equal affinities
    compute = torch.promote_types(q.dtype, torch.float32)
    count = valid.sum(-1)  # [nR]
    size = count.to(compute).clamp(min=1)[:, None]
    q_r = regionize(q, num_regions).flatten(3).sum(2, dtype=compute) / size  # padding is zero
    k_r = regionize(k, num_regions).flatten(3).sum(2, dtype=compute) / size
    affinity = (q_r @ k_r.transpose(-1, -2)).masked_fill(count == 0, float("-inf"))  # [B, nR, nR]
    return torch.topk(affinity, topk, dim=-1).indices


def bra(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, num_regions: Tuple[int, int], scale: float) -> Tensor:
    """Attention of every query over the tokens of its region's selected regions ``idx``."""
    B, H, W, heads, D = q.shape
    nR, topk = idx.shape[1], idx.shape[2]
    q_r, k_r, v_r = (regionize(t, num_regions) for t in (q, k, v))  # [B, nR, n, heads, D]
    n = q_r.shape[2]
    _, valid = token_index(B, H, W, num_regions, q.device)
    # the official gather: a view of every region per query region, then topk copies
    gather_idx = idx[:, :, :, None, None, None].expand(B, nR, topk, n, heads, D)
    k_sel = torch.gather(k_r[:, None].expand(B, nR, nR, n, heads, D), 2, gather_idx)  # [B, nR, topk, n, heads, D]
    v_sel = torch.gather(v_r[:, None].expand(B, nR, nR, n, heads, D), 2, gather_idx)
    k_sel = k_sel.reshape(B, nR, topk * n, heads, D)
    v_sel = v_sel.reshape(B, nR, topk * n, heads, D)
    key_valid = valid[idx].reshape(B, nR, 1, 1, topk * n)  # [B, nR, 1(head), 1(query), keys]
    logits = torch.einsum("brqhd,brkhd->brhqk", q_r * scale, k_sel)
    attn = logits.masked_fill(~key_valid, float("-inf")).softmax(-1)
    out = torch.einsum("brhqk,brkhd->brqhd", attn, v_sel)
    return unregionize(out, num_regions, H, W)
