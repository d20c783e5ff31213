"""CPU fast path: the raw passes behind the fused gate Function in ``__init__``.

Each function is one or two memory-bound passes written with torch ops, and no
autograd: the Function owns the backward. Reductions weighted by a per-batch
vector are matrix-vector products (a loop of ``mv``: ``bmm`` with a vector
operand is several times slower on CPU), max gradients are scatters through the
argmax, and the input gradient is built in place in one buffer. Fresh full-size
buffers are what cost most on CPU (page faults): the forward allocates only its output
and the backward only ``dx``; the products the pools and the scale gradients reduce are
formed one block at a time (``_CHUNK``).

The gradients of the gate scales come back in fp32 for half maps (fp64 for fp64), the
scales' dtype: rounded to bf16 per pixel, a sum over the map downstream (a conv bias's
gradient) would cancel their errors into a wrong result. Half maps are widened one
block at a time, so the fp32 copies stay one block large.
"""
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def _flat(x: Tensor) -> Tensor:
    # detached: the Function's forward runs under enable_grad (for the gate graphs), where
    # these passes would record autograd nodes for nothing (and out= ops refuse to run)
    B, C, H, W = x.shape
    return x.detach().reshape(B, C, H * W)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# Chunked passes: a fresh full-size temporary (``x * cscale``, ``dy * x``) costs more on CPU
# than the arithmetic (page faults), so the spatial pool and the scale gradients form their
# products one ~1 MB block at a time in a reused buffer and reduce it while it is in cache.
_CHUNK = 1 << 18  # elements per block
# The spatial max over C finds its argmax in two levels: the max of every group of _GROUP
# channels (amax, vectorised, per block), the first group holding the maximum (max with
# indices on 1/_GROUP of the data), then the first channel of that group holding it, from the
# products recomputed there; torch's max with indices over C is several times slower than amax
# on CPU. (Doing the last two levels per block costs more in per-op overhead than it saves.)
# The index is torch.max's: the first maximal channel.
_GROUP = 8


def _blocks(B: int, C: int, HW: int, step: int = 1):
    """(b0, b1, c0, c1) blocks of about _CHUNK elements: whole samples when one is smaller,
    else channel ranges (multiples of ``step``) of one sample."""
    if C * HW >= _CHUNK and C > step:
        n = -(-C * HW // _CHUNK)  # blocks per sample, of equal size (a multiple of step)
        cc = -(-C // (n * step)) * step
        return [(b, b + 1, c0, min(c0 + cc, C)) for b in range(B) for c0 in range(0, C, cc)]
    nb = max(1, _CHUNK // (C * HW))
    return [(b0, min(b0 + nb, B), 0, C) for b0 in range(0, B, nb)]


def _products(buf: Tensor, x: Tensor, w: Optional[Tensor]) -> Tensor:
    """``x * w[..., None]`` (``x`` when ``w`` is None) in ``buf``'s dtype: a half ``x`` is
    widened exactly, so the products are those of the fp32 reference, not rounded to half."""
    out = buf[:x.numel()].view(x.shape)
    if w is None:
        return out.copy_(x)
    return torch.mul(x, w.unsqueeze(-1), out=out)


def pool_channels(x: Tensor, with_max: bool, need_idx: bool = True) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Mean and max over H, W; on a large map one block at a time, so the max reads the block the
    mean brought into cache (on a small one the blocks' per-op overhead costs more than that saves)."""
    B, C, H, W = x.shape
    flat = _flat(x)
    avg = torch.empty(B, C, dtype=x.dtype, device=x.device)
    mx = torch.empty(B, C, dtype=x.dtype, device=x.device) if with_max else None
    idx = torch.empty(B, C, dtype=torch.long, device=x.device) if with_max and need_idx else None
    for b0, b1, c0, c1 in _blocks(B, C, H * W) if x.numel() > 8 * _CHUNK else [(0, B, 0, C)]:
        blk = flat[b0:b1, c0:c1]
        torch.mean(blk, -1, out=avg[b0:b1, c0:c1])
        if idx is not None:
            torch.max(blk, -1, out=(mx[b0:b1, c0:c1], idx[b0:b1, c0:c1]))
        elif mx is not None:  # inference: amax is several times faster than max-with-indices on CPU
            torch.amax(blk, -1, out=mx[b0:b1, c0:c1])
    return avg, mx, idx


def pool_spatial(x: Tensor, cscale: Optional[Tensor], need_idx: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    B, C, H, W = x.shape
    HW, acc = H * W, _acc(x.dtype)
    flat = _flat(x)
    cs = cscale.to(acc) if cscale is not None else None
    if need_idx and C < 2 * _GROUP:  # few channels: the products are small, torch's max directly
        p = flat.to(acc) if cs is None else flat * cs.unsqueeze(-1)
        mx, idx = p.max(1)
        mean = p.mean(1)
    else:
        G = _GROUP if need_idx else 1
        Cm = C // G * G  # channels in whole groups; the rest (< G) is pooled after the loop
        # group maxima [B, Cm / G, HW] (with indices) or the running max [B, 1, HW] (without)
        gmax = torch.empty(B, Cm // G if need_idx else 1, HW, dtype=acc, device=x.device)
        mean = torch.empty(B, HW, dtype=acc, device=x.device)
        blocks = _blocks(B, Cm, HW, G)
        buf = torch.empty(max((b1 - b0) * (c1 - c0) for b0, b1, c0, c1 in blocks) * HW, dtype=acc,
                          device=x.device)
        for b0, b1, c0, c1 in blocks:
            p = _products(buf, flat[b0:b1, c0:c1], None if cs is None else cs[b0:b1, c0:c1])
            if need_idx:
                torch.amax(p.view(b1 - b0, (c1 - c0) // G, G, HW), 2, out=gmax[b0:b1, c0 // G:c1 // G])
            elif c0 == 0:
                torch.amax(p, 1, keepdim=True, out=gmax[b0:b1])
            else:
                torch.maximum(gmax[b0:b1], p.amax(1, keepdim=True), out=gmax[b0:b1])
            if c0 == 0:
                torch.sum(p, 1, out=mean[b0:b1])
            else:
                mean[b0:b1] += p.sum(1)
        idx = None
        if need_idx:  # the first maximal group, then its first maximal channel (products recomputed)
            mx, j = gmax.max(1)
            ch = j.unsqueeze(1) * G + torch.arange(G, device=x.device).view(1, G, 1)  # [B, G, HW]
            v = flat.gather(1, ch).to(acc)
            _, k = (v if cs is None else v * cs.gather(1, ch.view(B, G * HW)).view(B, G, HW)).max(1)
            idx = j * G + k
        else:
            mx = gmax[:, 0]
        if Cm < C:  # the last partial group: it wins only with a larger (or a NaN) value
            rest = flat[:, Cm:].to(acc) if cs is None else flat[:, Cm:] * cs[:, Cm:, None]
            rmx, ridx = rest.max(1)
            later = (rmx > mx) | (rmx.isnan() & ~mx.isnan())
            mx = torch.where(later, rmx, mx)
            idx = torch.where(later, ridx + Cm, idx)
            mean += rest.sum(1)
        mean /= C
    if x.dtype == torch.float64:
        # oneDNN has no fp64 path; and torch's fallback conv (slow_conv2d) cannot take the
        # backward of a channels_last map with a channels_last weight
        return torch.stack([mx, mean], dim=1).view(B, 2, H, W), idx
    # channels-last [B, 2, H, W]: a 7x7 conv on 2 channels takes oneDNN's path that way,
    # ~4x faster than the NCHW fallback at 56x56 (forward + backward)
    return torch.stack([mx, mean], dim=-1).to(x.dtype).view(B, H, W, 2).permute(0, 3, 1, 2), idx


def scale(x: Tensor, cscale: Optional[Tensor], sscale: Optional[Tensor]) -> Tensor:
    y = x * cscale[:, :, None, None].to(x.dtype) if cscale is not None else x * sscale[:, None].to(x.dtype)
    if cscale is not None and sscale is not None:
        y.mul_(sscale[:, None].to(x.dtype))
    return y


def scale_grads(dy: Tensor, x: Tensor, cscale: Optional[Tensor], sscale: Optional[Tensor],
                need_cs: bool, need_ss: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """dcs = sum_hw dy * x * sscale, dss = sum_c dy * x * cscale, in fp32 (fp64 for fp64 maps),
    from ``dy * x`` formed one block at a time (see ``_CHUNK``)."""
    B, C, H, W = x.shape
    HW, acc = H * W, _acc(x.dtype)
    fdy, fx = _flat(dy), _flat(x)
    cs = cscale.to(acc) if cscale is not None else None
    ss = sscale.reshape(B, HW).to(acc) if sscale is not None else None
    dcs = torch.empty(B, C, dtype=acc, device=x.device) if need_cs else None
    dss = torch.zeros(B, HW, dtype=acc, device=x.device) if need_ss else None
    blocks = _blocks(B, C, HW)
    buf = torch.empty(max((b1 - b0) * (c1 - c0) for b0, b1, c0, c1 in blocks) * HW, dtype=acc, device=x.device)
    for b0, b1, c0, c1 in blocks:
        p = buf[:(b1 - b0) * (c1 - c0) * HW].view(b1 - b0, c1 - c0, HW)
        if acc == x.dtype:
            torch.mul(fdy[b0:b1, c0:c1], fx[b0:b1, c0:c1], out=p)
        else:  # a half map widened first: the fp32 product of the half values is exact
            p.copy_(fdy[b0:b1, c0:c1]).mul_(fx[b0:b1, c0:c1])
        for i, b in enumerate(range(b0, b1)):  # matrix-vector products (see the module docstring)
            if need_cs:
                if ss is None:
                    torch.sum(p[i], -1, out=dcs[b, c0:c1])
                else:
                    torch.mv(p[i], ss[b], out=dcs[b, c0:c1])
            if need_ss:
                if cs is None:
                    dss[b] += p[i].sum(0)
                else:
                    dss[b].addmv_(p[i].t(), cs[b, c0:c1])
    return dcs, None if dss is None else dss.view(B, H, W)


def pool_spatial_cs_grad(x: Tensor, dpooled: Tensor, idx: Tensor) -> Tensor:
    """Gradient of ``pool_spatial(x, cs)`` w.r.t. cs: sum_hw x * (dmean / C + [c == argmax] dmax),
    in fp32 (fp64 for fp64 maps)."""
    B, C, H, W = x.shape
    acc = _acc(x.dtype)
    flat = _flat(x)
    d = dpooled.reshape(B, 2, H * W).to(acc)
    # a half map one sample at a time in fp32 (see the module docstring)
    dcs = torch.stack([torch.mv(m.to(acc), v) for m, v in zip(flat, d[:, 1] / C)])
    return dcs.scatter_add_(1, idx, flat.gather(1, idx.unsqueeze(1)).squeeze(1).to(acc) * d[:, 0])


def input_grad(dy: Tensor, cscale: Optional[Tensor], sscale: Optional[Tensor],
               davg: Optional[Tensor], dmax: Optional[Tensor], cidx: Optional[Tensor],
               dpooled: Optional[Tensor], sidx: Optional[Tensor]) -> Tensor:
    """dx = dy*cs*ss + cs*(dmean_s/C + [c == sidx] dmax_s) + davg/HW + [hw == cidx] dmax_c, in one buffer."""
    B, C, H, W = dy.shape
    HW = H * W
    dx = scale(dy, cscale, sscale)
    flat = dx.view(B, C, HW) if dx.is_contiguous() else None
    if flat is None:
        dx = dx.contiguous()
        flat = dx.view(B, C, HW)
    cs = cscale.to(dy.dtype) if cscale is not None else torch.ones(B, C, dtype=dy.dtype, device=dy.device)
    # the rank-2 part, cs ⊗ dmean_s/C + davg/HW ⊗ 1, as one in-place batched matmul
    left, right = [], []
    if dpooled is not None:
        d = dpooled.reshape(B, 2, HW).to(dy.dtype)
        left.append(cs)
        right.append(d[:, 1] / C)
        flat.scatter_add_(1, sidx.unsqueeze(1), (cs.gather(1, sidx) * d[:, 0]).unsqueeze(1))
    if davg is not None:
        left.append(davg.to(dy.dtype) / HW)
        right.append(torch.ones(B, HW, dtype=dy.dtype, device=dy.device))
    if left:
        flat.baddbmm_(torch.stack(left, -1), torch.stack(right, 1))
    if dmax is not None:
        flat.scatter_add_(2, cidx.unsqueeze(-1), dmax.to(dy.dtype).unsqueeze(-1))
    return dx
