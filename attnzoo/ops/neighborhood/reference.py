"""Readable reference for neighborhood attention: the test oracle.

Brute force: compute, per axis, which key index every query attends
(``neighbor_index``), gather the K and V neighborhoods of every query, softmax over
them and take the weighted sum. Memory is ``kernel_size**2`` times that of K, so
this is for tests and small maps only; ``cpu.py`` is the fast path.

Layout (NATTEN's): ``q, k, v``: ``[B, H, W, heads, D]``; ``rpb``: ``[heads, 2kh-1, 2kw-1]``.
``na2d`` takes already-validated arguments with per-axis tuples (see ``__init__``);
every backend module exposes the same ``na2d(q, k, v, kernel_size, dilation, stride,
rpb, scale, border="clamp", rel_h=None, rel_w=None, query_stride=(1, 1))`` (1-D runs as 2-D with a height-1
map and kernel height 1).

``query_stride`` ``(qh, qw)``: q (and rel_h / rel_w and the output) live on a coarser grid
``[B, ceil(H / qh), ceil(W / qw), heads, *]``; query ``(i, j)`` sits at key-map position
``(i * qh, j * qw)`` and attends that position's window (HaloNet's stride-2 blocks: timm's
strided ``q`` conv).

``border="zero_pad"`` (HaloNet): windows are centred on the stride group's leader like
with ``"clamp"`` but never clamped (and the leader of a cut-off last group is the
centre of the full group, as if the map were padded to a multiple of the stride);
keys outside the map are zeros that still take part in the softmax (their logit is the
bias terms alone). Dilation 1 only. ``rel_h`` ``[B, H, W, heads, kh]`` / ``rel_w``
``[B, H, W, heads, kw]``: per-query logit biases by window row / column
(``logit[q, (i, j)] += rel_h[q, i] + rel_w[q, j]``).
"""
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def window_start(i: int, length: int, kernel_size: int, dilation: int = 1, stride: int = 1,
                 border: str = "clamp") -> int:
    """First key index of query ``i``'s window on one axis (a map index, not a sub-grid index).

    Dilation ``d`` splits the axis into the sub-grids ``{r, r+d, r+2d, ...}``; query ``i``
    lives in sub-grid ``r = i % d`` at position ``p = i // d``, and that sub-grid has
    ``n = ceil((length - r) / d)`` positions. Stride ``s`` groups the positions
    ``[g, g+s)`` (``g = p - p % s``) of a sub-grid; the group's leader is its centre
    ``g + s // 2`` (the right one of the two centres for even ``s``), or the sub-grid's
    last position for a cut-off final group. Every query of the group uses the leader's
    window, which is centred on the leader and clamped inside the sub-grid:
    ``start = clamp(leader - k // 2, 0, n - k)``. With ``s = 1`` the leader is the query.

    ``border="zero_pad"`` (dilation 1): ``start = g + s // 2 - k // 2``, unclamped (for
    HaloNet's ``s = b``, ``k = b + 2h``: ``start = g - h``); it may lie outside the map.
    """
    r, p = i % dilation, i // dilation
    if border == "zero_pad":
        return p - p % stride + stride // 2 - kernel_size // 2
    n = (length - r + dilation - 1) // dilation
    leader = min(p - p % stride + stride // 2, n - 1)
    start = min(max(leader - kernel_size // 2, 0), n - kernel_size)
    return start * dilation + r


def neighbor_index(length: int, kernel_size: int, dilation: int = 1, stride: int = 1,
                   device=None, border: str = "clamp", query_stride: int = 1) -> Tuple[Tensor, Tensor]:
    """Per-axis index tables, both ``[ceil(length / query_stride), kernel_size]`` int64.

    ``keys[i, t]``: the map index of query ``i``'s ``t``-th key (``start + t * dilation``);
    query ``i`` sits at map position ``p = i * query_stride``.
    ``bias[i, t]``: the rpb index of that pair, the key - query offset in sub-grid units
    shifted to be non-negative: ``(keys[i, t] - p) // dilation + kernel_size - 1``,
    in ``[0, 2 * kernel_size - 2]`` (NATTEN's ``get_pb_start(p) + t``).
    With ``border="zero_pad"`` keys may be out of the map (``< 0`` or ``>= length``).
    """
    positions = range(0, length, query_stride)  # Python ints: traceable (export, compile)
    keys = torch.empty(len(positions), kernel_size, dtype=torch.long)
    for i, p in enumerate(positions):
        start = window_start(p, length, kernel_size, dilation, stride, border)
        keys[i] = torch.arange(kernel_size) * dilation + start
    bias = torch.div(keys - torch.arange(0, length, query_stride)[:, None], dilation,
                     rounding_mode="floor") + kernel_size - 1
    return keys.to(device), bias.to(device)


def na2d(q: Tensor, k: Tensor, v: Tensor, kernel_size: Tuple[int, int], dilation: Tuple[int, int],
         stride: Tuple[int, int], rpb: Optional[Tensor], scale: float, border: str = "clamp",
         rel_h: Optional[Tensor] = None, rel_w: Optional[Tensor] = None,
         query_stride: Tuple[int, int] = (1, 1)) -> Tensor:
    B, H, W, heads, D = k.shape
    keys_h, bias_h = neighbor_index(H, kernel_size[0], dilation[0], stride[0], q.device, border, query_stride[0])
    keys_w, bias_w = neighbor_index(W, kernel_size[1], dilation[1], stride[1], q.device, border, query_stride[1])
    if border == "zero_pad":
        # out-of-map keys are zeros: pad K / V with zeros and shift the indices
        ph = max(0, -int(keys_h.min()), int(keys_h.max()) - H + 1)
        pw = max(0, -int(keys_w.min()), int(keys_w.max()) - W + 1)
        k = torch.nn.functional.pad(k, (0, 0, 0, 0, pw, pw, ph, ph))
        v = torch.nn.functional.pad(v, (0, 0, 0, 0, pw, pw, ph, ph))
        keys_h, keys_w = keys_h + ph, keys_w + pw
    rows = keys_h[:, None, :, None]  # [Hq, 1, kh, 1]
    cols = keys_w[None, :, None, :]  # [1, Wq, 1, kw]
    # neighborhoods [B, Hq, Wq, kh, kw, heads, D]: query (i, j)'s key (a, b) is
    # k[:, keys_h[i, a], keys_w[j, b]]
    k_nb = k[:, rows, cols]
    v_nb = v[:, rows, cols]
    logits = torch.einsum("nijhd,nijxyhd->nhijxy", q * scale, k_nb)
    if rpb is not None:
        # [heads, Hq, Wq, kh, kw]
        logits = logits + rpb[:, bias_h[:, None, :, None], bias_w[None, :, None, :]]
    if rel_h is not None:  # [B, Hq, Wq, heads, kh] -> [B, heads, Hq, Wq, kh, 1]
        logits = logits + rel_h.permute(0, 3, 1, 2, 4)[..., :, None]
    if rel_w is not None:  # [B, Hq, Wq, heads, kw] -> [B, heads, Hq, Wq, 1, kw]
        logits = logits + rel_w.permute(0, 3, 1, 2, 4)[..., None, :]
    attn = logits.flatten(-2).softmax(-1).view(logits.shape)
    return torch.einsum("nhijxy,nijxyhd->nijhd", attn, v_nb)
