"""Triton kernels for bi-level routing attention: block-sparse flash forward and backward.

Same contract as ``reference.py`` / ``cpu.py``: ``bra(q, k, v, idx, num_regions, scale)``,
tensors ``[B, H, W, heads, D]`` read in place through their strides (only a tensor whose
last dimension is not unit-stride is copied), routing ``idx`` ``[B, nR, topk]``.

Geometry: regions of ``RH x RW`` tokens on an ``NH_R x NW_R`` grid (the map padded up
to a multiple of it). Token ``t`` of region ``r`` is ``((r // NW_R) * RH + t // RW,
(r % NW_R) * RW + t % RW)``; it is valid when inside the ``H x W`` map. Nothing is
padded or gathered on the host: every kernel computes token coordinates from the
region id it reads out of ``idx`` and masks the padding.

- Forward (``_fwd_kernel``, grid ``(nR * query tiles, B * heads)``): a tile of
  ``BLOCK_M`` query tokens of one region walks its ``topk`` selected regions (region id
  loaded from ``idx``) in chunks of ``BLOCK_N`` tokens: ``S = Q K^T * scale``, ``-inf`` on
  padding, online softmax, ``acc += P V``. Writes the output and the log-sum-exp
  ``[B, H, W, heads]`` only: no gathered K/V, no attention matrix.
- Backward: ``delta = rowsum(dO * O)`` (torch), then

  * ``_bwd_dq_kernel``: same walk as the forward, ``P = exp(S - lse)``,
    ``dS = P (dO V^T - delta)``, ``dQ = scale * dS K``;
  * ``_bwd_dkv_kernel`` (grid over *key* tiles): the inverse routing. The host sorts
    ``idx`` into a CSR list of the query regions that selected each key region (``topk``
    entries per query region, so ``B * nR * topk`` in all); a key tile walks those query
    regions, recomputes ``P^T`` and ``dS^T`` and accumulates ``dV = P^T dO``,
    ``dK = scale * dS^T Q`` in registers. Every key is owned by one program: dK / dV are
    written once, deterministically, without atomics (keys nobody selected get zeros).

Low precision: ``P`` and ``dS`` are cast to the input dtype for their matmuls (as in
FlashAttention); accumulation is fp32 (fp64 for fp64 inputs, so the kernels can be
checked tightly). All three kernels compile for sm_90 at D <= 128 in every dtype within its
227 KiB of shared memory (fp32, D=128: 214 KiB, the largest). Layers as ``neighborhood/triton.py``: kernels, launchers,
``torch.library`` custom ops (fake and autograd registrations), public ``bra``.
"""
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from .._triton_common import acc_dtype as _acc_dtype, dot as _dot, precision as _precision
from .._triton_common import unit_last as _unit_last, upcast as _upcast
from .. import _dispatch
from .._dispatch import no_autocast
from .reference import geometry

__all__ = ["bra", "forward", "backward"]

_BLOCK = 64  # tokens per query tile / key chunk (capped at the region size, >= 16 for tl.dot)


# --------------------------------------------------------------------------- kernels

@triton.jit
def _tokens(region, offs, H, W, NW_R, RH, RW, N):
    """Map row / column of tokens ``offs`` of ``region`` and whether they are real (not padding)."""
    y = (region // NW_R) * RH + offs // RW
    x = (region % NW_R) * RW + offs % RW
    return y, x, (offs < N) & (y < H) & (x < W)


@triton.jit
def _fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, idx_ptr, scale_ptr,
        H, W, NH, DIM, NW_R, RH, RW, N, TOPK, NQT, NR,
        sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid, pid_bn = tl.program_id(0), tl.program_id(1)
    b = (pid_bn // NH).to(tl.int64)  # int64: b * sqb overflows int32 on large maps
    head = (pid_bn % NH).to(tl.int64)
    region = pid // NQT
    offs_m = (pid % NQT) * BLOCK_M + tl.arange(0, BLOCK_M)
    qy, qx, q_ok = _tokens(region, offs_m, H, W, NW_R, RH, RW, N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    qmask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + head * sqn + qy[:, None] * sqh + qx[:, None] * sqw + offs_d[None, :],
                mask=qmask, other=0.0)
    scale = tl.load(scale_ptr)
    m_i = tl.full([BLOCK_M], -1.0e30, ACC)  # finite start of the running max: no inf - inf
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for s in range(0, TOPK):
        kr = tl.load(idx_ptr + (b * NR + region) * TOPK + s)
        for kb in range(0, N, BLOCK_N):
            offs_n = kb + tl.arange(0, BLOCK_N)
            ky, kx, k_ok = _tokens(kr, offs_n, H, W, NW_R, RH, RW, N)
            kmask = k_ok[:, None] & d_ok[None, :]
            kt = tl.load(k_ptr + b * skb + head * skn + ky[:, None] * skh + kx[:, None] * skw + offs_d[None, :],
                         mask=kmask, other=0.0)
            sc = _dot(q, tl.trans(kt), ACC, PREC, UPCAST) * scale
            sc = tl.where(k_ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_ptr + b * svb + head * svn + ky[:, None] * svh + kx[:, None] * svw + offs_d[None, :],
                         mask=kmask, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, ACC, PREC, UPCAST)
            m_i = m_new
    l_i = tl.where(q_ok, l_i, 1.0)  # padding queries: no division by zero
    tl.store(o_ptr + b * sob + head * son + qy[:, None] * soh + qx[:, None] * sow + offs_d[None, :],
             (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=qmask)
    tl.store(lse_ptr + ((b * H + qy) * W + qx) * NH + head, (m_i + tl.log(l_i)).to(lse_ptr.dtype.element_ty),
             mask=q_ok)


@triton.jit
def _bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, idx_ptr, scale_ptr,
        H, W, NH, DIM, NW_R, RH, RW, N, TOPK, NQT, NR,
        sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sgb, sgh, sgw, sgn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dQ of one query tile; ``do`` and ``dq`` share the strides ``sg*`` (both contiguous)."""
    pid, pid_bn = tl.program_id(0), tl.program_id(1)
    b = (pid_bn // NH).to(tl.int64)
    head = (pid_bn % NH).to(tl.int64)
    region = pid // NQT
    offs_m = (pid % NQT) * BLOCK_M + tl.arange(0, BLOCK_M)
    qy, qx, q_ok = _tokens(region, offs_m, H, W, NW_R, RH, RW, N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    qmask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + head * sqn + qy[:, None] * sqh + qx[:, None] * sqw + offs_d[None, :],
                mask=qmask, other=0.0)
    g_off = b * sgb + head * sgn + qy[:, None] * sgh + qx[:, None] * sgw + offs_d[None, :]
    do = tl.load(do_ptr + g_off, mask=qmask, other=0.0)
    row = ((b * H + qy) * W + qx) * NH + head
    lse = tl.load(lse_ptr + row, mask=q_ok, other=0.0)
    delta = tl.load(delta_ptr + row, mask=q_ok, other=0.0)
    scale = tl.load(scale_ptr)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for s in range(0, TOPK):
        kr = tl.load(idx_ptr + (b * NR + region) * TOPK + s)
        for kb in range(0, N, BLOCK_N):
            offs_n = kb + tl.arange(0, BLOCK_N)
            ky, kx, k_ok = _tokens(kr, offs_n, H, W, NW_R, RH, RW, N)
            kmask = k_ok[:, None] & d_ok[None, :]
            kt = tl.load(k_ptr + b * skb + head * skn + ky[:, None] * skh + kx[:, None] * skw + offs_d[None, :],
                         mask=kmask, other=0.0)
            vt = tl.load(v_ptr + b * svb + head * svn + ky[:, None] * svh + kx[:, None] * svw + offs_d[None, :],
                         mask=kmask, other=0.0)
            sc = _dot(q, tl.trans(kt), ACC, PREC, UPCAST) * scale
            p = tl.where(q_ok[:, None] & k_ok[None, :], tl.exp(sc - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(vt), ACC, PREC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(kt.dtype), kt, ACC, PREC, UPCAST)
    tl.store(dq_ptr + g_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _bwd_dkv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, off_ptr, qreg_ptr, scale_ptr,
        H, W, NH, DIM, NW_R, RH, RW, N, NKT, NR,
        sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sgb, sgh, sgw, sgn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """dK / dV of one key tile over the query regions that selected its region (CSR ``off`` /
    ``qreg``); ``do``, ``dk`` and ``dv`` share the strides ``sg*`` (all contiguous)."""
    pid, pid_bn = tl.program_id(0), tl.program_id(1)
    b = (pid_bn // NH).to(tl.int64)
    head = (pid_bn % NH).to(tl.int64)
    kr = pid // NKT
    offs_n = (pid % NKT) * BLOCK_N + tl.arange(0, BLOCK_N)
    ky, kx, k_ok = _tokens(kr, offs_n, H, W, NW_R, RH, RW, N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    kmask = k_ok[:, None] & d_ok[None, :]
    kt = tl.load(k_ptr + b * skb + head * skn + ky[:, None] * skh + kx[:, None] * skw + offs_d[None, :],
                 mask=kmask, other=0.0)
    vt = tl.load(v_ptr + b * svb + head * svn + ky[:, None] * svh + kx[:, None] * svw + offs_d[None, :],
                 mask=kmask, other=0.0)
    scale = tl.load(scale_ptr)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    start = tl.load(off_ptr + b * NR + kr)
    end = tl.load(off_ptr + b * NR + kr + 1)
    for e in range(start, end):
        qr = tl.load(qreg_ptr + e)
        for qb in range(0, N, BLOCK_M):
            offs_m = qb + tl.arange(0, BLOCK_M)
            qy, qx, q_ok = _tokens(qr, offs_m, H, W, NW_R, RH, RW, N)
            qmask = q_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + b * sqb + head * sqn + qy[:, None] * sqh + qx[:, None] * sqw + offs_d[None, :],
                        mask=qmask, other=0.0)
            do = tl.load(do_ptr + b * sgb + head * sgn + qy[:, None] * sgh + qx[:, None] * sgw + offs_d[None, :],
                         mask=qmask, other=0.0)
            row = ((b * H + qy) * W + qx) * NH + head
            lse = tl.load(lse_ptr + row, mask=q_ok, other=0.0)
            delta = tl.load(delta_ptr + row, mask=q_ok, other=0.0)
            st = _dot(kt, tl.trans(q), ACC, PREC, UPCAST) * scale  # [keys, queries]
            pt = tl.where(k_ok[:, None] & q_ok[None, :], tl.exp(st - lse[None, :]), 0.0)
            dv += _dot(pt.to(do.dtype), do, ACC, PREC, UPCAST)
            dpt = _dot(vt, tl.trans(do), ACC, PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, ACC, PREC, UPCAST)
    g_off = b * sgb + head * sgn + ky[:, None] * sgh + kx[:, None] * sgw + offs_d[None, :]
    tl.store(dk_ptr + g_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kmask)
    tl.store(dv_ptr + g_off, dv.to(dv_ptr.dtype.element_ty), mask=kmask)


# --------------------------------------------------------------------------- launchers

def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _common(q: torch.Tensor, num_regions: Tuple[int, int]):
    B, H, W, NH, D = q.shape
    rh, rw = geometry(H, W, num_regions)
    n = rh * rw
    block = max(16, min(_BLOCK, triton.next_power_of_2(n)))
    warps = 4
    if q.dtype == torch.float64:  # the FMA path of tl.dot stages more shared memory
        block = min(block, 32)
    elif q.dtype == torch.float32:  # FMA dots unless TF32: 64-token blocks spilled on sm_80 and sm_90,
        block = min(block, 32)  # 32 on 4 warps too, 16 on 8 warps (tools/gpu_readiness.py)
        warps = 8 if block == 32 else 4
    acc, acc_torch = _acc_dtype(q.dtype)
    meta = dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(D)), ACC=acc,
                PREC=_precision(q.dtype), UPCAST=_upcast(q.dtype), num_warps=warps)
    geo = (H, W, NH, D, num_regions[1], rh, rw, n)
    return geo, -(-n // block), acc_torch, meta


def _scale_tensor(scale: float, acc_torch, device) -> torch.Tensor:
    # a pointer rather than a float argument: Triton would round a float scalar to fp32
    return torch.full((1,), scale, dtype=acc_torch, device=device)


def forward(q, k, v, idx, num_regions, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output ``[B, H, W, heads, D]`` (q's dtype) and log-sum-exp ``[B, H, W, heads]`` (fp32; fp64 for fp64)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, NH = q.shape[0], q.shape[3]
    nR, topk = idx.shape[1], idx.shape[2]
    geo, ntiles, acc_torch, meta = _common(q, num_regions)
    idx = idx.to(torch.int32).contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:4], dtype=acc_torch, device=q.device)
    _fwd_kernel[(nR * ntiles, B * NH)](
        q, k, v, out, lse, idx, _scale_tensor(scale, acc_torch, q.device), *geo, topk, ntiles, nR,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), **meta)
    return out, lse


def _inverse_routing(idx: torch.Tensor):
    """CSR of the query regions that selected each key region: offsets ``[B * nR + 1]`` and
    query-region ids, both int32, grouped by ``(b, key region)``."""
    B, nR, topk = idx.shape
    key = (idx + torch.arange(B, device=idx.device)[:, None, None] * nR).reshape(-1)
    order = torch.argsort(key, stable=True)
    qreg = (order // topk % nR).to(torch.int32)
    off = torch.zeros(B * nR + 1, dtype=torch.int32, device=idx.device)
    off[1:] = torch.cumsum(torch.bincount(key, minlength=B * nR), 0)
    return off, qreg


def backward(do, q, k, v, out, lse, idx, num_regions, scale):
    """``dq, dk, dv`` in the inputs' dtypes (``out`` and ``lse`` from ``forward``)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    do = do.contiguous()
    B, NH = q.shape[0], q.shape[3]
    nR, topk = idx.shape[1], idx.shape[2]
    geo, ntiles, acc_torch, meta = _common(q, num_regions)
    delta = (do.to(acc_torch) * out.to(acc_torch)).sum(-1)  # [B, H, W, heads], contiguous like lse
    scale_t = _scale_tensor(scale, acc_torch, q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(q.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=v.dtype, device=q.device)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    _bwd_dq_kernel[(nR * ntiles, B * NH)](
        q, k, v, do, lse, delta, dq, idx.to(torch.int32).contiguous(), scale_t, *geo, topk, ntiles, nR,
        *strides, **meta)
    off, qreg = _inverse_routing(idx)
    _bwd_dkv_kernel[(nR * ntiles, B * NH)](
        q, k, v, do, lse, delta, dk, dv, off, qreg, scale_t, *geo, ntiles, nR, *strides,
        # queries 32 at a time, 2 stages: its [keys, queries] softmax terms spilled on sm_80 at 64 / 3;
        # 1 stage for fp32 (FMA dots) 16-token blocks, which spilled 8 bytes on sm_90 at 2 (1 at 32 on sm_80)
        **dict(meta, BLOCK_M=min(meta["BLOCK_M"], 32),
               num_stages=1 if q.dtype == torch.float32 and meta["BLOCK_N"] == 16 else 2))
    return dq, dk, dv


# --------------------------------------------------------------------------- custom ops
# The kernels run behind two ``torch.library`` custom ops with fake (shape) and autograd
# registrations, so ``torch.compile`` traces ``bra`` as two opaque nodes (as ``na2d``); the same
# ops run under TRITON_INTERPRET=1 on CPU, where they are tested. Autocast is off inside: the
# backward's host code (``delta``) must run in the forward's precision (see ``bra`` in ``__init__``).

Tensor = torch.Tensor


@torch.library.custom_op("attnzoo::bra_triton_fwd", mutates_args=())
def _bra_fwd_op(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, num_regions: List[int],
                scale: float) -> Tuple[Tensor, Tensor]:
    with no_autocast(q.device.type):
        return forward(q, k, v, idx, tuple(num_regions), scale)


@_bra_fwd_op.register_fake
def _(q, k, v, idx, num_regions, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:4], dtype=_acc_dtype(q.dtype)[1])


@torch.library.custom_op("attnzoo::bra_triton_bwd", mutates_args=())
def _bra_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, idx: Tensor,
                num_regions: List[int], scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    with no_autocast(q.device.type):
        return backward(do, q, k, v, out, lse, idx, tuple(num_regions), scale)


@_bra_bwd_op.register_fake
def _(do, q, k, v, out, lse, idx, num_regions, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape, dtype=k.dtype), q.new_empty(q.shape, dtype=v.dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, idx, num_regions, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, idx)
    ctx.geometry = (num_regions, scale)


def _backward(ctx, do, _dlse):
    q, k, v, out, lse, idx = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk, dv = _bra_bwd_op(do, q, k, v, out, lse, idx, *ctx.geometry)
    return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None


_bra_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_dispatch.register_compile_traceable(__name__)


# --------------------------------------------------------------------------- public

def bra(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, num_regions: Tuple[int, int],
        scale: float) -> torch.Tensor:
    """Routed attention on ``[B, H, W, heads, D]`` with routing ``idx`` ``[B, nR, topk]`` (see ``__init__``)."""
    return _bra_fwd_op(q, k, v, idx, list(num_regions), float(scale))[0]
