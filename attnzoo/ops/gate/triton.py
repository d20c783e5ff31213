"""Triton kernels for the gate op, forward and backward.

Two layers share the kernels:

- the raw passes that ``__init__``'s fused gate Function drives, with the same
  contract as ``cpu.py``: ``pool_channels``, ``pool_spatial``, ``scale``,
  ``scale_grads``, ``pool_spatial_cs_grad``, ``input_grad``;
- the primitives of ``reference.py`` as differentiable Functions:
  ``channel_pool``, ``spatial_pool``, ``gate_scale``.

Every kernel sees a feature map as ``[B, C, HW]`` plus its three strides, so NCHW
and channels_last maps are read in place; only a map whose H and W cannot merge
into one stride is copied. Arithmetic runs in fp32 (fp64 for fp64 maps) and
outputs keep the map's dtype. The max reductions return an int32 argmax, so
their gradients need no second look at the activations.

Layers, as in flash-linear-attention: ``@triton.jit`` kernels, host launchers
(the raw passes), ``torch.autograd.Function``s, public functions.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = [
    "channel_pool", "spatial_pool", "gate_scale",
    "pool_channels", "pool_spatial", "scale", "scale_grads", "pool_spatial_cs_grad", "input_grad",
]


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
def _spatial_cs_grad_kernel(
        x_ptr, dpool_ptr, idx_ptr, dcs_ptr,
        C, HW, sxb, sxc, sxhw,
        ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid_s, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = pid_s * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_s = offs_s < HW
    mask_c = offs_c < C
    mask = mask_c[:, None] & mask_s[None, :]
    dmax = tl.load(dpool_ptr + b * 2 * HW + offs_s, mask=mask_s, other=0.0).to(ACC)
    dmean = tl.load(dpool_ptr + b * 2 * HW + HW + offs_s, mask=mask_s, other=0.0).to(ACC)
    idx = tl.load(idx_ptr + b * HW + offs_s, mask=mask_s, other=-1)
    # gradient w.r.t. the scaled map x * cscale; its product with x, summed over pixels
    g = dmean[None, :] / C + tl.where(offs_c[:, None] == idx[None, :], dmax[None, :], 0.0)
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


@triton.jit
def _input_grad_kernel(
        dy_ptr, cs_ptr, ss_ptr, davg_ptr, dmax_ptr, cidx_ptr, dpool_ptr, sidx_ptr, dx_ptr,
        C, HW, sgb, sgc, sghw, sdb, sdc, sdhw,
        HAS_DY: tl.constexpr, HAS_CS: tl.constexpr, HAS_SS: tl.constexpr,
        HAS_AVG: tl.constexpr, HAS_CMAX: tl.constexpr, HAS_SPOOL: tl.constexpr,
        ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """dx = cs * (dy * ss + dmean_s / C + [c == sidx] dmax_s) + davg / HW + [hw == cidx] dmax_c.

    Every path into x summed in registers, so dx is written once.
    """
    pid_s, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = pid_s * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_s = offs_s < HW
    mask_c = offs_c < C
    mask = mask_c[:, None] & mask_s[None, :]
    g = tl.zeros([BLOCK_C, BLOCK_HW], dtype=ACC)
    if HAS_DY:
        t = tl.load(dy_ptr + b * sgb + offs_c[:, None] * sgc + offs_s[None, :] * sghw, mask=mask, other=0.0).to(ACC)
        if HAS_SS:
            t = t * tl.load(ss_ptr + b * HW + offs_s, mask=mask_s, other=0.0).to(ACC)[None, :]
        g += t
    if HAS_SPOOL:
        dmax_s = tl.load(dpool_ptr + b * 2 * HW + offs_s, mask=mask_s, other=0.0).to(ACC)
        dmean_s = tl.load(dpool_ptr + b * 2 * HW + HW + offs_s, mask=mask_s, other=0.0).to(ACC)
        sidx = tl.load(sidx_ptr + b * HW + offs_s, mask=mask_s, other=-1)
        g += dmean_s[None, :] / C + tl.where(offs_c[:, None] == sidx[None, :], dmax_s[None, :], 0.0)
    if HAS_CS:
        # the output and the spatial pool both see x through cscale
        g = g * tl.load(cs_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None]
    if HAS_AVG:
        g += tl.load(davg_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None] / HW
    if HAS_CMAX:
        dmax_c = tl.load(dmax_ptr + b * C + offs_c, mask=mask_c, other=0.0).to(ACC)
        cidx = tl.load(cidx_ptr + b * C + offs_c, mask=mask_c, other=-1)
        g += tl.where(offs_s[None, :] == cidx[:, None], dmax_c[:, None], 0.0)
    dx = dx_ptr + b * sdb + offs_c[:, None] * sdc + offs_s[None, :] * sdhw
    tl.store(dx, g.to(dx_ptr.dtype.element_ty), mask=mask)


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


