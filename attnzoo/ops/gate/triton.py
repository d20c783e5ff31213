"""Triton kernels for the gate op, forward and backward.

Two layers share the kernels:

- the raw passes that ``__init__``'s fused gate Function drives, with the same
  contract as ``cpu.py``: ``pool_channels``, ``pool_spatial``, ``scale``,
  ``scale_grads``, ``pool_spatial_cs_grad``, ``input_grad``;
- the primitives of ``reference.py`` as differentiable ``torch.library`` custom ops
  (traceable by ``torch.compile``): ``channel_pool``, ``spatial_pool``, ``gate_scale``.

Every kernel sees a feature map as ``[B, C, HW]`` plus its three strides, so NCHW
and channels_last maps are read in place; only a map whose H and W cannot merge
into one stride is copied. Arithmetic runs in fp32 (fp64 for fp64 maps) and
outputs keep the map's dtype. The max reductions return an int32 argmax, so
their gradients need no second look at the activations.

Layers, as in flash-linear-attention: ``@triton.jit`` kernels, host launchers
(the raw passes), custom ops with their autograd, public functions.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _dispatch
from .._triton_common import acc_dtype as _acc_dtype

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



def _grid(C: int, HW: int, B: int, bc: int, bhw: int):
    return triton.cdiv(HW, bhw), triton.cdiv(C, bc), B


def _rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-(b, c) or per-(b, hw) vector as a contiguous buffer; these are small, copies are free."""
    return None if t is None else t.contiguous()


def pool_channels(x: torch.Tensor, with_max: bool, need_idx: bool = True):
    """Mean (and max, argmax) over H, W in one read: ``avg, mx | None, idx | None``, each ``[B, C]``.

    The argmax costs nothing extra in the kernel, so ``need_idx`` (for the CPU path) is ignored."""
    B, C, H, W = x.shape
    x, sx = _flat(x)
    avg = torch.empty(B, C, dtype=x.dtype, device=x.device)
    mx = torch.empty(B, C, dtype=x.dtype, device=x.device) if with_max else None
    idx = torch.empty(B, C, dtype=torch.int32, device=x.device) if with_max else None
    bc, bhw = _tile(C, H * W)
    _channel_pool_fwd_kernel[(triton.cdiv(C, bc), B)](
        x, avg, mx, idx, C, H * W, *sx,
        WITH_MAX=with_max, ACC=_acc_dtype(x.dtype)[0], BLOCK_C=bc, BLOCK_HW=bhw,
    )
    return avg, mx, idx


def pool_spatial(x: torch.Tensor, cscale: Optional[torch.Tensor], need_idx: bool = True):
    """``[max_c, mean_c]`` of ``x * cscale`` as ``[B, 2, H, W]`` plus the argmax ``[B, H*W]``."""
    B, C, H, W = x.shape
    x, sx = _flat(x)
    out = torch.empty(B, 2, H, W, dtype=x.dtype, device=x.device)
    idx = torch.empty(B, H * W, dtype=torch.int32, device=x.device)
    bc, bhw = _tile(C, H * W)
    _spatial_pool_fwd_kernel[(triton.cdiv(H * W, bhw), B)](
        x, _rows(cscale), out, idx, C, H * W, *sx,
        HAS_CS=cscale is not None, ACC=_acc_dtype(x.dtype)[0], BLOCK_C=bc, BLOCK_HW=bhw,
    )
    return out, idx


def scale(x: torch.Tensor, cscale: Optional[torch.Tensor], sscale: Optional[torch.Tensor]) -> torch.Tensor:
    """``x * cscale[b, c] * sscale[b, h, w]`` in x's dtype and memory format."""
    B, C, H, W = x.shape
    x, sx = _flat(x)
    y = torch.empty_like(x, memory_format=_memory_format(x))
    bc, bhw = _tile(C, H * W)
    _gate_scale_fwd_kernel[_grid(C, H * W, B, bc, bhw)](
        x, _rows(cscale), _rows(sscale), y, C, H * W, *sx, *_flat(y)[1],
        HAS_CS=cscale is not None, HAS_SS=sscale is not None, ACC=_acc_dtype(x.dtype)[0],
        BLOCK_C=bc, BLOCK_HW=bhw,
    )
    return y


def _scale_backward(dy, x, cscale, sscale, need_dx, need_cs, need_ss):
    """One read of (dy, x) for every gradient of ``scale``; scale grads come back in fp32 (fp64)."""
    B, C, H, W = x.shape
    x, sx = _flat(x)
    dy, sg = _flat(dy)
    acc, acc_torch = _acc_dtype(x.dtype)
    dx = torch.empty_like(dy, memory_format=_memory_format(dy)) if need_dx else None
    dcs = torch.zeros(B, C, dtype=acc_torch, device=x.device) if need_cs else None
    dss = torch.zeros(B, H, W, dtype=acc_torch, device=x.device) if need_ss else None
    bc, bhw = _tile(C, H * W)
    _gate_scale_bwd_kernel[_grid(C, H * W, B, bc, bhw)](
        x, _rows(cscale), _rows(sscale), dy, dx, dcs, dss, C, H * W, *sx, *sg,
        *(_flat(dx)[1] if need_dx else (0, 0, 0)),
        HAS_CS=cscale is not None, HAS_SS=sscale is not None,
        NEED_DX=need_dx, NEED_DCS=need_cs, NEED_DSS=need_ss,
        ACC=acc, BLOCK_C=bc, BLOCK_HW=bhw,
    )
    return dx, dcs, dss


def scale_grads(dy, x, cscale, sscale, need_cs: bool, need_ss: bool):
    """``dcs = sum_hw dy * x * sscale``, ``dss = sum_c dy * x * cscale``, in fp32 (fp64 for fp64
    maps): the scales' dtype, unrounded (see ``cpu.py``)."""
    if not (need_cs or need_ss):
        return None, None
    _, dcs, dss = _scale_backward(dy, x, cscale, sscale, False, need_cs, need_ss)
    return dcs, dss


def pool_spatial_cs_grad(x: torch.Tensor, dpooled: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gradient of ``pool_spatial(x, cs)`` w.r.t. cs: ``sum_hw x * (dmean / C + [c == argmax] dmax)``,
    in fp32 (fp64 for fp64 maps)."""
    B, C, H, W = x.shape
    x, sx = _flat(x)
    acc, acc_torch = _acc_dtype(x.dtype)
    dcs = torch.zeros(B, C, dtype=acc_torch, device=x.device)
    bc, bhw = _tile(C, H * W)
    _spatial_cs_grad_kernel[_grid(C, H * W, B, bc, bhw)](
        x, dpooled.reshape(B, 2, H * W).contiguous(), idx, dcs, C, H * W, *sx,
        ACC=acc, BLOCK_C=bc, BLOCK_HW=bhw,
    )
    return dcs


def _input_grad(shape, dtype, device, memory_format, dy, cscale, sscale, davg, dmax, cidx, dpooled, sidx):
    B, C, H, W = shape
    dx = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    _, sd = _flat(dx)
    if dy is not None:
        dy, sg = _flat(dy)
    else:
        sg = (0, 0, 0)
    if dpooled is not None:
        dpooled = dpooled.reshape(B, 2, H * W).contiguous()
    bc, bhw = _tile(C, H * W)
    _input_grad_kernel[_grid(C, H * W, B, bc, bhw)](
        dy, _rows(cscale), _rows(sscale), _rows(davg), _rows(dmax), _rows(cidx), dpooled, _rows(sidx), dx,
        C, H * W, *sg, *sd,
        HAS_DY=dy is not None, HAS_CS=cscale is not None, HAS_SS=sscale is not None and dy is not None,
        HAS_AVG=davg is not None, HAS_CMAX=dmax is not None, HAS_SPOOL=dpooled is not None,
        ACC=_acc_dtype(dtype)[0], BLOCK_C=bc, BLOCK_HW=bhw,
    )
    return dx


def input_grad(dy, cscale, sscale, davg, dmax, cidx, dpooled, sidx) -> torch.Tensor:
    """``dx = dy*cs*ss + cs*(dmean_s/C + [c == sidx] dmax_s) + davg/HW + [hw == cidx] dmax_c``, one write."""
    return _input_grad(dy.shape, dy.dtype, dy.device, _memory_format(dy),
                       dy, cscale, sscale, davg, dmax, cidx, dpooled, sidx)


# --------------------------------------------------------------------------- autograd

def _check(x: torch.Tensor, cscale=None, sscale=None) -> None:
    if x.dim() != 4:
        raise ValueError(f"expected a feature map [B, C, H, W], got shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    for name, t, shape in (("cscale", cscale, (B, C)), ("sscale", sscale, (B, H, W))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


# The primitives run behind ``torch.library`` custom ops with fake (shape) and autograd
# registrations, so ``torch.compile`` traces them as opaque nodes: under a compile, the
# gates are composed from these primitives (``__init__``), since the fused Function keeps
# the learned gate callables in its ctx. ``custom_op`` rather than ``triton_op``: the
# launchers' host code need not be traceable, and the ops also run under TRITON_INTERPRET=1
# on CPU, where they are tested. Custom ops return no None: an absent output is empty.

Tensor = torch.Tensor


def _empty(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype)


@torch.library.custom_op("attnzoo::gate_channel_pool", mutates_args=())
def _channel_pool_op(x: Tensor, with_max: bool) -> Tuple[Tensor, Tensor, Tensor]:
    avg, mx, idx = pool_channels(x, with_max)
    return avg, (mx if with_max else _empty(x)), (idx if with_max else _empty(x, torch.int32))


@_channel_pool_op.register_fake
def _(x, with_max):
    B, C = x.shape[:2]
    if not with_max:
        return x.new_empty((B, C)), _empty(x), _empty(x, torch.int32)
    return x.new_empty((B, C)), x.new_empty((B, C)), x.new_empty((B, C), dtype=torch.int32)


@torch.library.custom_op("attnzoo::gate_input_grad", mutates_args=())
def _input_grad_op(shape: List[int], dtype: torch.dtype, channels_last: bool, dy: Optional[Tensor],
                   cscale: Optional[Tensor], sscale: Optional[Tensor], davg: Optional[Tensor], dmax: Optional[Tensor],
                   cidx: Optional[Tensor], dpooled: Optional[Tensor], sidx: Optional[Tensor]) -> Tensor:
    device = next(t.device for t in (dy, davg, dmax, dpooled) if t is not None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return _input_grad(tuple(shape), dtype, device, fmt, dy, cscale, sscale, davg, dmax, cidx, dpooled, sidx)


@_input_grad_op.register_fake
def _(shape, dtype, channels_last, dy, cscale, sscale, davg, dmax, cidx, dpooled, sidx):
    device = next(t.device for t in (dy, davg, dmax, dpooled) if t is not None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


def _setup_channel_pool(ctx, inputs, output):
    x, with_max = inputs
    ctx.save_for_backward(output[2] if with_max else None)
    ctx.like = (list(x.shape), x.dtype, _memory_format(x) == torch.channels_last, with_max)


def _channel_pool_backward(ctx, davg, dmax, _didx):
    (idx,) = ctx.saved_tensors
    shape, dtype, cl, with_max = ctx.like
    dmax = dmax if with_max else None
    if davg is None and dmax is None:
        return None, None
    return _input_grad_op(shape, dtype, cl, None, None, None, davg, dmax, idx, None, None), None


_channel_pool_op.register_autograd(_channel_pool_backward, setup_context=_setup_channel_pool)


@torch.library.custom_op("attnzoo::gate_spatial_pool", mutates_args=())
def _spatial_pool_op(x: Tensor, cscale: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return pool_spatial(x, cscale)


@_spatial_pool_op.register_fake
def _(x, cscale):
    B, _, H, W = x.shape
    return x.new_empty((B, 2, H, W)), x.new_empty((B, H * W), dtype=torch.int32)


@torch.library.custom_op("attnzoo::gate_spatial_cs_grad", mutates_args=())
def _spatial_cs_grad_op(x: Tensor, dpooled: Tensor, idx: Tensor) -> Tensor:
    return pool_spatial_cs_grad(x, dpooled, idx)


@_spatial_cs_grad_op.register_fake
def _(x, dpooled, idx):
    return x.new_empty(x.shape[:2], dtype=_acc_dtype(x.dtype)[1])


def _setup_spatial_pool(ctx, inputs, output):
    x, cscale = inputs
    ctx.save_for_backward(x, cscale, output[1])


def _spatial_pool_backward(ctx, dout, _didx):
    x, cscale, idx = ctx.saved_tensors
    dx = dcs = None
    if ctx.needs_input_grad[0]:
        dx = _input_grad_op(list(x.shape), x.dtype, _memory_format(x) == torch.channels_last,
                            None, cscale, None, None, None, None, dout, idx)
    if cscale is not None and ctx.needs_input_grad[1]:
        dcs = _spatial_cs_grad_op(x, dout, idx).to(cscale.dtype)
    return dx, dcs


_spatial_pool_op.register_autograd(_spatial_pool_backward, setup_context=_setup_spatial_pool)


@torch.library.custom_op("attnzoo::gate_scale", mutates_args=())
def _gate_scale_op(x: Tensor, cscale: Optional[Tensor], sscale: Optional[Tensor]) -> Tensor:
    return scale(x, cscale, sscale)


def _like_flat(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor laid out as the launchers lay out an output like ``t`` (``_flat`` may copy)."""
    t = _flat(t)[0]
    return torch.empty_like(t, memory_format=_memory_format(t))


@_gate_scale_op.register_fake
def _(x, cscale, sscale):
    return _like_flat(x)


@torch.library.custom_op("attnzoo::gate_scale_backward", mutates_args=())
def _gate_scale_bwd_op(dy: Tensor, x: Tensor, cscale: Optional[Tensor], sscale: Optional[Tensor], need_dx: bool,
                       need_cs: bool, need_ss: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dcs, dss = _scale_backward(dy, x, cscale, sscale, need_dx, need_cs, need_ss)
    return (dx if need_dx else _empty(x), dcs.to(cscale.dtype) if need_cs else _empty(x),
            dss.to(sscale.dtype) if need_ss else _empty(x))


@_gate_scale_bwd_op.register_fake
def _(dy, x, cscale, sscale, need_dx, need_cs, need_ss):
    B, C, H, W = x.shape
    return (_like_flat(dy) if need_dx else _empty(x), cscale.new_empty((B, C)) if need_cs else _empty(x),
            sscale.new_empty((B, H, W)) if need_ss else _empty(x))


def _setup_gate_scale(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gate_scale_backward(ctx, dy):
    x, cscale, sscale = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_cs = cscale is not None and ctx.needs_input_grad[1]
    need_ss = sscale is not None and ctx.needs_input_grad[2]
    if not (need_dx or need_cs or need_ss):
        return None, None, None
    dx, dcs, dss = _gate_scale_bwd_op(dy, x, cscale, sscale, need_dx, need_cs, need_ss)
    return (dx if need_dx else None), (dcs if need_cs else None), (dss if need_ss else None)


_gate_scale_op.register_autograd(_gate_scale_backward, setup_context=_setup_gate_scale)
_dispatch.register_compile_traceable(__name__)


# --------------------------------------------------------------------------- public

def channel_pool(x: torch.Tensor, with_max: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Mean (and max) of ``x`` over H, W: ``([B, C], [B, C] or None)``."""
    _check(x)
    avg, mx, _ = _channel_pool_op(x, with_max)
    return avg, (mx if with_max else None)


def spatial_pool(x: torch.Tensor, cscale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[max_c, mean_c]`` of ``x * cscale[:, :, None, None]`` as ``[B, 2, H, W]``, never forming the product."""
    _check(x, cscale)
    return _spatial_pool_op(x, cscale)[0]


def gate_scale(
        x: torch.Tensor,
        cscale: Optional[torch.Tensor] = None,
        sscale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x * cscale[:, :, None, None] * sscale[:, None]``; either scale may be None."""
    if cscale is None and sscale is None:
        return x  # as the reference: nothing to scale
    _check(x, cscale, sscale)
    return _gate_scale_op(x, cscale, sscale)
