"""CPU fast path for the gate primitives.

Autograd through the reference keeps ``x * cscale`` alive for the backward and
builds several full-size temporaries (the amax tie mask, per-factor products).
These Functions save only the inputs and write each gradient in as few passes
as torch allows: reductions go through ``bmm`` instead of a product followed by
a sum, and the max gradient is a scatter into the average gradient's buffer.
"""
from typing import Optional, Tuple

import torch


class _ChannelPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, with_max: bool):
        B, C, H, W = x.shape
        flat = x.reshape(B, C, H * W)
        avg = flat.mean(-1)
        if not with_max:
            ctx.save_for_backward(None)
            ctx.shape = x.shape
            return avg, None
        mx, idx = flat.max(-1)
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        ctx.mark_non_differentiable(idx)
        return avg, mx

    @staticmethod
    def backward(ctx, davg, dmax):
        (idx,) = ctx.saved_tensors
        B, C, H, W = ctx.shape
        dx = (davg / (H * W)).unsqueeze(-1).expand(B, C, H * W).contiguous()
        if dmax is not None and idx is not None:
            dx.scatter_add_(-1, idx.unsqueeze(-1), dmax.unsqueeze(-1).to(dx.dtype))
        return dx.view(B, C, H, W), None


class _SpatialPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cscale: Optional[torch.Tensor]):
        xs = x if cscale is None else x * cscale[:, :, None, None]
        mx, idx = xs.max(dim=1)
        mean = xs.mean(dim=1)
        ctx.save_for_backward(x, cscale, idx)
        return torch.stack([mx, mean], dim=1)

    @staticmethod
    def backward(ctx, dout):
        x, cscale, idx = ctx.saved_tensors
        C = x.shape[1]
        # d(xs) = dmean / C everywhere plus dmax at the argmax channel
        dxs = (dout[:, 1:2] / C).expand_as(x).contiguous()
        dxs.scatter_add_(1, idx.unsqueeze(1), dout[:, 0:1])
        if cscale is None:
            return dxs, None
        dcs = None
        if ctx.needs_input_grad[1]:
            B, _, H, W = x.shape
            dcs = torch.bmm(dxs.view(B, C, 1, H * W).flatten(0, 1), x.reshape(B * C, H * W, 1)).view(B, C)
        return dxs.mul_(cscale[:, :, None, None]), dcs


class _GateScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cscale, sscale):
        ctx.save_for_backward(x, cscale, sscale)
        if cscale is not None and sscale is not None:
            return x * cscale[:, :, None, None] * sscale[:, None]
        if cscale is not None:
            return x * cscale[:, :, None, None]
        return x * sscale[:, None]

    @staticmethod
    def backward(ctx, dy):
        x, cscale, sscale = ctx.saved_tensors
        B, C, H, W = x.shape
        dx = dcs = dss = None
        # t = dy * sscale, shared by dx and dcs
        t = dy if sscale is None else dy * sscale[:, None]
        if ctx.needs_input_grad[1] and cscale is not None:
            dcs = torch.bmm(t.reshape(B * C, 1, H * W), x.reshape(B * C, H * W, 1)).view(B, C)
        if ctx.needs_input_grad[2] and sscale is not None:
            # sum_c dy * x * cscale, as one batched matvec over channels
            p = dy * x
            w = cscale if cscale is not None else torch.ones(B, C, dtype=x.dtype, device=x.device)
            dss = torch.bmm(w.view(B, 1, C).to(p.dtype), p.reshape(B, C, H * W)).view(B, H, W)
        if ctx.needs_input_grad[0]:
            dx = t * cscale[:, :, None, None] if cscale is not None else t.clone() if t is dy else t
        return dx, dcs, dss


def channel_pool(x: torch.Tensor, with_max: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    return _ChannelPool.apply(x, with_max)


def spatial_pool(x: torch.Tensor, cscale: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _SpatialPool.apply(x, cscale)


def gate_scale(x, cscale=None, sscale=None):
    return _GateScale.apply(x, cscale, sscale)
