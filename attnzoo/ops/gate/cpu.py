"""CPU fast path: the raw passes behind the fused gate Function in ``__init__``.

Each function is one or two memory-bound passes written with torch ops, and no
autograd: the Function owns the backward. Reductions weighted by a per-batch
vector are matrix-vector products (a loop of ``mv``: ``bmm`` with a vector
operand is several times slower on CPU), max gradients are scatters through the
argmax, and the input gradient is built in place in one buffer. Fresh full-size
buffers are what cost most on CPU (page faults), so the backward allocates two.

The gradients of the gate scales come back in fp32 for half maps (fp64 for fp64), the
scales' dtype: rounded to bf16 per pixel, a sum over the map downstream (a conv bias's
gradient) would cancel their errors into a wrong result. Half maps take those
reductions one sample at a time, so the fp32 copies stay one sample large.
"""
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def _flat(x: Tensor) -> Tensor:
    B, C, H, W = x.shape
    return x.reshape(B, C, H * W)


def _bmv(mat: Tensor, vec: Tensor) -> Tensor:
    """[B, M, N] @ [B, N] -> [B, M]"""
    return torch.stack([torch.mv(m, v) for m, v in zip(mat, vec.to(mat.dtype))])


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def pool_channels(x: Tensor, with_max: bool, need_idx: bool = True) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    flat = _flat(x)
    avg = flat.mean(-1)
    if not with_max:
        return avg, None, None
    if not need_idx:  # inference: amax is several times faster than max-with-indices on CPU
        return avg, flat.amax(-1), None
    mx, idx = flat.max(-1)
    return avg, mx, idx


def pool_spatial(x: Tensor, cscale: Optional[Tensor], need_idx: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    B, C, H, W = x.shape
    acc = _acc(x.dtype)
    if cscale is not None and acc != x.dtype:
        # x * cscale in fp32, one sample at a time (as the Triton kernel, in registers): rounded
        # to half, the products tie where the true maximum does not, and the argmax moves
        pools = [pool_spatial(x[b:b + 1].to(acc), cscale[b:b + 1], need_idx) for b in range(B)]
        idx = torch.cat([i for _, i in pools]) if need_idx else None
        return torch.cat([p for p, _ in pools]).to(x.dtype), idx
    flat = _flat(x)
    xs = flat if cscale is None else flat * cscale.unsqueeze(-1).to(x.dtype)
    if need_idx:
        mx, idx = xs.max(dim=1)
    else:
        mx, idx = xs.amax(dim=1), None
    if cscale is None:
        mean = flat.mean(dim=1)
    else:
        mean = torch.bmm(cscale.unsqueeze(1).to(x.dtype), flat).squeeze(1) / C
    if x.dtype == torch.float64:
        # oneDNN has no fp64 path; and torch's fallback conv (slow_conv2d) cannot take the
        # backward of a channels_last map with a channels_last weight
        return torch.stack([mx, mean], dim=1).view(B, 2, H, W), idx
    # channels-last [B, 2, H, W]: a 7x7 conv on 2 channels takes oneDNN's path that way,
    # ~4x faster than the NCHW fallback at 56x56 (forward + backward)
    return torch.stack([mx, mean], dim=-1).view(B, H, W, 2).permute(0, 3, 1, 2), idx


def scale(x: Tensor, cscale: Optional[Tensor], sscale: Optional[Tensor]) -> Tensor:
    y = x * cscale[:, :, None, None].to(x.dtype) if cscale is not None else x * sscale[:, None].to(x.dtype)
    if cscale is not None and sscale is not None:
        y.mul_(sscale[:, None].to(x.dtype))
    return y


def scale_grads(dy: Tensor, x: Tensor, cscale: Optional[Tensor], sscale: Optional[Tensor],
                need_cs: bool, need_ss: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """dcs = sum_hw dy * x * sscale, dss = sum_c dy * x * cscale, in fp32 (fp64 for fp64 maps)."""
    B, C, H, W = x.shape
    acc = _acc(x.dtype)
    if acc != x.dtype:  # half map: one fp32 sample at a time
        grads = [scale_grads(dy[b:b + 1].to(acc), x[b:b + 1].to(acc), None if cscale is None else cscale[b:b + 1],
                             None if sscale is None else sscale[b:b + 1], need_cs, need_ss) for b in range(B)]
        return tuple(torch.cat(g) if need else None for g, need in zip(zip(*grads), (need_cs, need_ss)))
    p = _flat(dy * x)
    dcs = dss = None
    if need_cs:
        dcs = p.sum(-1) if sscale is None else _bmv(p, sscale.reshape(B, H * W))
    if need_ss:
        dss = (p.sum(1) if cscale is None else torch.bmm(cscale.unsqueeze(1).to(p.dtype), p).squeeze(1)).view(B, H, W)
    return dcs, dss


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
