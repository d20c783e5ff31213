"""Triton kernels for the gate primitives, forward and backward.

Same primitives and semantics as ``reference.py``. Every kernel sees a feature
map as ``[B, C, HW]`` plus its three strides, so NCHW and channels_last inputs
are read in place; only a map whose H and W cannot merge into one stride is
copied. Arithmetic runs in fp32 (fp64 for fp64 inputs) and outputs keep the
input's dtype. The two max reductions save an int32 argmax, so their backward
passes read no activations.

Layers, as in flash-linear-attention: ``@triton.jit`` kernels, host launchers,
``torch.autograd.Function``s, public functions.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["channel_pool", "spatial_pool", "gate_scale"]


# --------------------------------------------------------------------------- kernels
# Programs index (hw block, c block, batch) for elementwise passes, so the largest
# extent sits on grid axis 0, whose limit is 2**31 rather than 65535.

@triton.jit
def _channel_pool_fwd_kernel(
        x_ptr, avg_ptr, max_ptr, idx_ptr,
        C, HW, sxb, sxc, sxhw,
        WITH_MAX: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # int64: b * sxb overflows int32 on large maps
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_row = x_ptr + b * sxb + offs_c[:, None] * sxc
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    mx = tl.full([BLOCK_C], float("-inf"), ACC)
    arg = tl.zeros([BLOCK_C], dtype=tl.int32)
    for start in range(0, HW, BLOCK_HW):
        offs_s = start + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_s[None, :] < HW)
        v = tl.load(x_row + offs_s[None, :] * sxhw, mask=mask, other=float("-inf")).to(ACC)
        acc += tl.sum(tl.where(mask, v, 0.0), axis=1)
        if WITH_MAX:
            tmax, targ = tl.max(v, axis=1, return_indices=True)
            # strict '>' keeps the earliest maximum across tiles, as torch.max does
            upd = tmax > mx
            arg = tl.where(upd, start + targ, arg)
            mx = tl.where(upd, tmax, mx)
    out = b * C + offs_c
    tl.store(avg_ptr + out, (acc / HW).to(avg_ptr.dtype.element_ty), mask=mask_c)
    if WITH_MAX:
        tl.store(max_ptr + out, mx.to(max_ptr.dtype.element_ty), mask=mask_c)
        tl.store(idx_ptr + out, arg, mask=mask_c)


@triton.jit
def _channel_pool_bwd_kernel(
        davg_ptr, dmax_ptr, idx_ptr, dx_ptr,
        C, HW, sdb, sdc, sdhw,
        HAS_AVG: tl.constexpr, HAS_MAX: tl.constexpr, ACC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_s, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = pid_s * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_s[None, :] < HW)
    g = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    if HAS_AVG:
        davg = tl.load(davg_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)
        g += davg[:, None] / HW
    if HAS_MAX:
        dmax = tl.load(dmax_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)
        idx = tl.load(idx_ptr + b * C + offs_c, mask=mask_c, other=-1)
        g += tl.where(offs_s[None, :] == idx[:, None], dmax[:, None], 0.0)
    dx = dx_ptr + b * sdb + offs_c[:, None] * sdc + offs_s[None, :] * sdhw
    tl.store(dx, g.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _spatial_pool_fwd_kernel(
        x_ptr, cs_ptr, out_ptr, idx_ptr,
        C, HW, sxb, sxc, sxhw,
        HAS_CS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask_s = offs_s < HW
    x_col = x_ptr + b * sxb + offs_s[None, :] * sxhw
    acc = tl.zeros([BLOCK_HW], dtype=ACC)
    mx = tl.full([BLOCK_HW], float("-inf"), ACC)
    arg = tl.zeros([BLOCK_HW], dtype=tl.int32)
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask = mask_c[:, None] & mask_s[None, :]
        v = tl.load(x_col + offs_c[:, None] * sxc, mask=mask, other=0.0).to(ACC)
        if HAS_CS:
            # x * cscale lives only in registers: the scaled map is never written
            cs = tl.load(cs_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)
            v = v * cs[:, None]
        acc += tl.sum(v, axis=0)
        tmax, targ = tl.max(tl.where(mask, v, float("-inf")), axis=0, return_indices=True)
        upd = tmax > mx
        arg = tl.where(upd, start + targ, arg)
        mx = tl.where(upd, tmax, mx)
    out = out_ptr + b * 2 * HW + offs_s  # [B, 2, HW] in CBAM's [max, mean] order
    tl.store(out, mx.to(out_ptr.dtype.element_ty), mask=mask_s)
    tl.store(out + HW, (acc / C).to(out_ptr.dtype.element_ty), mask=mask_s)
    tl.store(idx_ptr + b * HW + offs_s, arg, mask=mask_s)


@triton.jit
def _spatial_pool_bwd_kernel(
        x_ptr, cs_ptr, dout_ptr, idx_ptr, dx_ptr, dcs_ptr,
        C, HW, sxb, sxc, sxhw, sdb, sdc, sdhw,
        HAS_CS: tl.constexpr, NEED_DX: tl.constexpr, NEED_DCS: tl.constexpr, ACC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_s, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = pid_s * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_s = offs_s < HW
    mask_c = offs_c < C
    mask = mask_c[:, None] & mask_s[None, :]
    dmax = tl.load(dout_ptr + b * 2 * HW + offs_s, mask=mask_s, other=0.0).to(ACC)
    dmean = tl.load(dout_ptr + b * 2 * HW + HW + offs_s, mask=mask_s, other=0.0).to(ACC)
    idx = tl.load(idx_ptr + b * HW + offs_s, mask=mask_s, other=-1)
    # gradient w.r.t. the scaled map x * cscale
    g = dmean[None, :] / C + tl.where(offs_c[:, None] == idx[None, :], dmax[None, :], 0.0)
    if HAS_CS:
        cs = tl.load(cs_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)
    if NEED_DX:
        dx = g
        if HAS_CS:
            dx = dx * cs[:, None]
        dx_ptrs = dx_ptr + b * sdb + offs_c[:, None] * sdc + offs_s[None, :] * sdhw
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DCS:
        x = tl.load(x_ptr + b * sxb + offs_c[:, None] * sxc + offs_s[None, :] * sxhw, mask=mask, other=0.0)
        tl.atomic_add(dcs_ptr + b * C + offs_c, tl.sum(x.to(ACC) * g, axis=1), mask=mask_c)


@triton.jit
def _gate_scale_fwd_kernel(
        x_ptr, cs_ptr, ss_ptr, y_ptr,
        C, HW, sxb, sxc, sxhw, syb, syc, syhw,
        HAS_CS: tl.constexpr, HAS_SS: tl.constexpr, ACC: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_s, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = pid_s * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_s = offs_s < HW
    mask_c = offs_c < C
    mask = mask_c[:, None] & mask_s[None, :]
    v = tl.load(x_ptr + b * sxb + offs_c[:, None] * sxc + offs_s[None, :] * sxhw, mask=mask, other=0.0).to(ACC)
    if HAS_CS:
        v = v * tl.load(cs_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None]
    if HAS_SS:
        v = v * tl.load(ss_ptr + b * HW + offs_s, mask=mask_s, other=0.0).to(ACC)[None, :]
    y = y_ptr + b * syb + offs_c[:, None] * syc + offs_s[None, :] * syhw
    tl.store(y, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_scale_bwd_kernel(
        x_ptr, cs_ptr, ss_ptr, dy_ptr, dx_ptr, dcs_ptr, dss_ptr,
        C, HW, sxb, sxc, sxhw, sgb, sgc, sghw, sdb, sdc, sdhw,
        HAS_CS: tl.constexpr, HAS_SS: tl.constexpr,
        NEED_DX: tl.constexpr, NEED_DCS: tl.constexpr, NEED_DSS: tl.constexpr,
        ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_s, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = pid_s * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_s = offs_s < HW
    mask_c = offs_c < C
    mask = mask_c[:, None] & mask_s[None, :]
    dy = tl.load(dy_ptr + b * sgb + offs_c[:, None] * sgc + offs_s[None, :] * sghw, mask=mask, other=0.0).to(ACC)
    if HAS_CS:
        cs = tl.load(cs_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)
    if HAS_SS:
        ss = tl.load(ss_ptr + b * HW + offs_s, mask=mask_s, other=0.0).to(ACC)
    if NEED_DX:
        dx = dy
        if HAS_CS:
            dx = dx * cs[:, None]
        if HAS_SS:
            dx = dx * ss[None, :]
        dx_ptrs = dx_ptr + b * sdb + offs_c[:, None] * sdc + offs_s[None, :] * sdhw
        tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DCS or NEED_DSS:
        # both scale gradients share dy * x; x is read once for the pair
        x = tl.load(x_ptr + b * sxb + offs_c[:, None] * sxc + offs_s[None, :] * sxhw, mask=mask, other=0.0)
        p = dy * x.to(ACC)
        if NEED_DCS:
            q = p
            if HAS_SS:
                q = q * ss[None, :]
            tl.atomic_add(dcs_ptr + b * C + offs_c, tl.sum(q, axis=1), mask=mask_c)
        if NEED_DSS:
            r = p
            if HAS_CS:
                r = r * cs[:, None]
            tl.atomic_add(dss_ptr + b * HW + offs_s, tl.sum(r, axis=0), mask=mask_s)


# --------------------------------------------------------------------------- launchers

def _acc_dtype(dtype: torch.dtype):
    """(triton, torch) accumulator dtypes: fp64 stays fp64 so it can serve as a tight oracle."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _flat(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """``t`` and its (batch, channel, spatial) strides as a ``[B, C, H*W]`` view.

    H and W merge when stepping w past its end lands on the next h; otherwise (a
    crop along W, say) the map is copied once.
    """
    _, _, H, W = t.shape
    sb, sc, sh, sw = t.stride()
    if H > 1 and W > 1 and sh != W * sw:
        t = t.contiguous()
        sb, sc, sh, sw = t.stride()
    return t, (sb, sc, sw if W > 1 else sh)


def _tile(C: int, HW: int) -> Tuple[int, int]:
    # <= 2048 elements per tile keeps the backward's few live tiles in registers;
    # the floor of 16 keeps every tl.arange a legal, non-degenerate shape
    bhw = max(16, min(triton.next_power_of_2(HW), 128))
    bc = max(16, min(triton.next_power_of_2(C), 2048 // bhw))
    return bc, bhw


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def _channel_pool_fwd(x, with_max):
    B, C, H, W = x.shape
    HW = H * W
    x, sx = _flat(x)
    acc, _ = _acc_dtype(x.dtype)
    avg = torch.empty(B, C, dtype=x.dtype, device=x.device)
    mx = torch.empty(B, C, dtype=x.dtype, device=x.device) if with_max else None
    idx = torch.empty(B, C, dtype=torch.int32, device=x.device) if with_max else None
    bc, bhw = _tile(C, HW)
    _channel_pool_fwd_kernel[(triton.cdiv(C, bc), B)](
        x, avg, mx, idx, C, HW, *sx,
        WITH_MAX=with_max, ACC=acc, BLOCK_C=bc, BLOCK_HW=bhw,
    )
    return avg, mx, idx


def _channel_pool_bwd(davg, dmax, idx, shape, dtype, memory_format):
    B, C, H, W = shape
    HW = H * W
    ref = davg if davg is not None else dmax
    dx = torch.empty(shape, dtype=dtype, device=ref.device, memory_format=memory_format)
    _, sd = _flat(dx)
    acc, _ = _acc_dtype(dtype)
    bc, bhw = _tile(C, HW)
    _channel_pool_bwd_kernel[(triton.cdiv(HW, bhw), triton.cdiv(C, bc), B)](
        None if davg is None else davg.contiguous(),
        None if dmax is None else dmax.contiguous(),
        idx, dx, C, HW, *sd,
        HAS_AVG=davg is not None, HAS_MAX=dmax is not None, ACC=acc, BLOCK_C=bc, BLOCK_HW=bhw,
    )
    return dx


def _spatial_pool_fwd(x, cscale):
    B, C, H, W = x.shape
    HW = H * W
    x, sx = _flat(x)
    acc, _ = _acc_dtype(x.dtype)
    out = torch.empty(B, 2, H, W, dtype=x.dtype, device=x.device)
    idx = torch.empty(B, HW, dtype=torch.int32, device=x.device)
    bc, bhw = _tile(C, HW)
    _spatial_pool_fwd_kernel[(triton.cdiv(HW, bhw), B)](
        x, cscale, out, idx, C, HW, *sx,
        HAS_CS=cscale is not None, ACC=acc, BLOCK_C=bc, BLOCK_HW=bhw,
    )
    return out, idx


def _spatial_pool_bwd(x, cscale, idx, dout, need_dx, need_dcs):
    B, C, H, W = x.shape
    HW = H * W
    x, sx = _flat(x)
    acc, acc_torch = _acc_dtype(x.dtype)
    dx = torch.empty_like(x, memory_format=_memory_format(x)) if need_dx else None
    dcs = torch.zeros(B, C, dtype=acc_torch, device=x.device) if need_dcs else None
    sd = _flat(dx)[1] if need_dx else (0, 0, 0)
    bc, bhw = _tile(C, HW)
    _spatial_pool_bwd_kernel[(triton.cdiv(HW, bhw), triton.cdiv(C, bc), B)](
        x, cscale, dout.reshape(B, 2, HW).contiguous(), idx, dx, dcs, C, HW, *sx, *sd,
        HAS_CS=cscale is not None, NEED_DX=need_dx, NEED_DCS=need_dcs, ACC=acc, BLOCK_C=bc, BLOCK_HW=bhw,
    )
    return dx, None if dcs is None else dcs.to(cscale.dtype)


def _gate_scale_fwd(x, cscale, sscale):
    B, C, H, W = x.shape
    HW = H * W
    x, sx = _flat(x)
    acc, _ = _acc_dtype(x.dtype)
    y = torch.empty_like(x, memory_format=_memory_format(x))
    bc, bhw = _tile(C, HW)
    _gate_scale_fwd_kernel[(triton.cdiv(HW, bhw), triton.cdiv(C, bc), B)](
        x, cscale, sscale, y, C, HW, *sx, *_flat(y)[1],
        HAS_CS=cscale is not None, HAS_SS=sscale is not None, ACC=acc, BLOCK_C=bc, BLOCK_HW=bhw,
    )
    return y


def _gate_scale_bwd(x, cscale, sscale, dy, need_dx, need_dcs, need_dss):
    B, C, H, W = x.shape
    HW = H * W
    x, sx = _flat(x)
    dy, sg = _flat(dy)
    acc, acc_torch = _acc_dtype(x.dtype)
    dx = torch.empty_like(x, memory_format=_memory_format(x)) if need_dx else None
    dcs = torch.zeros(B, C, dtype=acc_torch, device=x.device) if need_dcs else None
    dss = torch.zeros(B, HW, dtype=acc_torch, device=x.device) if need_dss else None
    sd = _flat(dx)[1] if need_dx else (0, 0, 0)
    bc, bhw = _tile(C, HW)
    _gate_scale_bwd_kernel[(triton.cdiv(HW, bhw), triton.cdiv(C, bc), B)](
        x, cscale, sscale, dy, dx, dcs, dss, C, HW, *sx, *sg, *sd,
        HAS_CS=cscale is not None, HAS_SS=sscale is not None,
        NEED_DX=need_dx, NEED_DCS=need_dcs, NEED_DSS=need_dss,
        ACC=acc, BLOCK_C=bc, BLOCK_HW=bhw,
    )
    dcs = None if dcs is None else dcs.to(cscale.dtype)
    dss = None if dss is None else dss.view(B, H, W).to(sscale.dtype)
    return dx, dcs, dss


# --------------------------------------------------------------------------- autograd

def _check(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a feature map [B, C, H, W], got shape {tuple(x.shape)}")


def _vec(t: Optional[torch.Tensor], shape) -> Optional[torch.Tensor]:
    """A scale as a contiguous ``[B, N]`` buffer (scales are small; copying them is free)."""
    if t is None:
        return None
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"expected a scale of shape {tuple(shape)}, got {tuple(t.shape)}")
    return t.contiguous()


class _ChannelPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, with_max):
        _check(x)
        avg, mx, idx = _channel_pool_fwd(x, with_max)
        ctx.save_for_backward(idx)
        ctx.shape, ctx.dtype, ctx.memory_format = x.shape, x.dtype, _memory_format(x)
        # an unused output's gradient arrives as None instead of a zero map
        ctx.set_materialize_grads(False)
        return avg, mx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, davg, dmax):
        (idx,) = ctx.saved_tensors
        if idx is None:
            dmax = None
        if davg is None and dmax is None:
            return None, None
        return _channel_pool_bwd(davg, dmax, idx, ctx.shape, ctx.dtype, ctx.memory_format), None


class _SpatialPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cscale):
        _check(x)
        cscale = _vec(cscale, x.shape[:2])
        out, idx = _spatial_pool_fwd(x, cscale)
        ctx.save_for_backward(x, cscale, idx)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, cscale, idx = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dcs = cscale is not None and ctx.needs_input_grad[1]
        if not (need_dx or need_dcs):
            return None, None
        return _spatial_pool_bwd(x, cscale, idx, dout, need_dx, need_dcs)


class _GateScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cscale, sscale):
        _check(x)
        B, C, H, W = x.shape
        cscale = _vec(cscale, (B, C))
        sscale = None if sscale is None else _vec(sscale, (B, H, W)).view(B, H * W)
        ctx.save_for_backward(x, cscale, sscale)
        return _gate_scale_fwd(x, cscale, sscale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, cscale, sscale = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        need_dcs = cscale is not None and ctx.needs_input_grad[1]
        need_dss = sscale is not None and ctx.needs_input_grad[2]
        if not (need_dx or need_dcs or need_dss):
            return None, None, None
        return _gate_scale_bwd(x, cscale, sscale, dy, need_dx, need_dcs, need_dss)


# --------------------------------------------------------------------------- public

def channel_pool(x: torch.Tensor, with_max: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Mean (and max) of ``x`` over H, W in one pass: ``([B, C], [B, C] or None)``."""
    return _ChannelPool.apply(x, with_max)


def spatial_pool(x: torch.Tensor, cscale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[max_c, mean_c]`` of ``x * cscale[:, :, None, None]`` as ``[B, 2, H, W]``, never forming the product."""
    return _SpatialPool.apply(x, cscale)


def gate_scale(
        x: torch.Tensor,
        cscale: Optional[torch.Tensor] = None,
        sscale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x * cscale[:, :, None, None] * sscale[:, None]``; either scale may be None."""
    if cscale is None and sscale is None:
        return x  # as the reference: nothing to scale
    return _GateScale.apply(x, cscale, sscale)
