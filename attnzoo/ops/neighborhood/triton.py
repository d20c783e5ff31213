"""Triton kernels for neighborhood attention: fused forward and fused backward.

Same contract as ``reference.py`` / ``cpu.py``: ``na2d(q, k, v, kernel_size, dilation,
stride, rpb, scale, border="clamp", rel_h=None, rel_w=None)`` with validated arguments
and per-axis tuples, tensors ``[B, H, W, heads, D]`` read in place through their
strides (only a tensor whose last dimension is not unit-stride is copied), ``rpb`` ``[heads, 2kh-1, 2kw-1]`` or None.

Geometry (all in dilation sub-grid units; residue ``r = (i % dh, j % dw)`` is a grid axis):

- Query tiles of ``TH x TW`` sub-grid positions. A query's window start is computed in
  the kernel (``_win_start``: stride leader, centre, clamp; NATTEN <= 0.17, as
  ``reference.window_start``). Starts are non-decreasing along an axis, so a tile's keys
  lie in the *halo* ``[start(first query), start(first query) + HALO)`` per axis, where
  ``HALO`` (a constexpr) is the largest ``start(last) + k - start(first)`` over the tiles
  of every sub-grid, found once per geometry on the host (``_axis_plan``).
- Forward (``_fwd_kernel``, grid ``(tiles, dh * dw, B * heads)``): the flattened
  ``HALO_H x HALO_W`` halo is walked in chunks of ``BLOCK_K`` keys; per chunk
  ``S = Q K^T * scale + rpb[key - query]`` (a gather from the small rpb table),
  ``-inf`` outside each query's ``kh x kw`` window, online softmax, ``acc += P V``
  (``tl.dot``, fp32 accumulation; fp64 for fp64 inputs). Only the output and the fp32
  log-sum-exp per query (``[B, H, W, heads]``) are written: the ``[N, k^2]``
  attention matrix never leaves registers.
- Backward, two kernels, no atomics for dQ / dK / dV:

  * ``_bwd_dq_kernel`` (query tiles, same grid and halo walk): ``delta = rowsum(dO * O)``
    (written out for the next kernel), ``P = exp(S - lse)``, ``dS = P (dO V^T - delta)``,
    ``dQ = scale * dS K``; ``d rpb`` = ``dS`` scattered by key - query offset with fp32
    atomics into ``RPB_SLOTS`` copies of ``[heads, 2kh-1, 2kw-1]`` (program ``i`` uses
    copy ``i % RPB_SLOTS``, spreading the contention on the ~k^2 hot addresses), summed
    on the host.
  * ``_bwd_dkv_kernel`` (key tiles): the *inverse neighborhood*. The queries that see a
    key form a contiguous interval per axis (starts are monotone), so a key tile's
    queries are one rectangle of sub-grid positions; its origin and size per (residue,
    tile) come from the same host plan (tiny int32 tables), so border tiles, whose clamped
    windows are seen by more queries, do not inflate the interior tiles' walk. The kernel
    walks that rectangle in chunks of ``BLOCK_Q`` queries, recomputes ``P^T`` and ``dS^T``
    from q, k, lse, delta with the exact window mask, and accumulates ``dV = P^T dO``,
    ``dK = scale * dS^T Q`` in registers;
    every key is owned by exactly one program, so dK / dV are written once, in the
    input dtype, deterministically (no fp32 scatter buffers, no atomics, no zeroing).
    The price is that ``S`` is recomputed a second time (cheaper than contended
    atomics on ``N * D`` addresses at k^2-fold overlap, and deterministic).

HaloNet (``border="zero_pad"``, ``rel_h`` / ``rel_w``):

- ``zero_pad`` (dilation 1, any kernel size, even included, any map size): ``_win_start``
  returns the unclamped ``group start + S // 2 - K // 2``, so windows (and tile halos) may
  reach outside the map. Those keys are loaded as zeros but stay inside the softmax mask
  (logit = bias terms only, value 0); in the backward they get no dK / dV (the dK / dV
  kernel walks in-map key tiles only), while their ``dS`` still feeds the bias gradients
  (their dQ contribution is ``dS * 0``). The host plan uses the same unclamped starts.
  rpb works unchanged (key - query offsets stay in ``[-(K-1), K-1]`` for ``S <= K``).
- ``rel_h [B, H, W, heads, kh]`` / ``rel_w [..., kw]``: per-query biases gathered by the
  key's row / column inside the query's window, in all three kernels. Their gradients
  come from the dQ kernel without atomics: ``dS`` is summed per halo row / column with a
  one-hot ``tl.dot`` (``[queries, HP]`` accumulators), then each query reads its ``kh`` /
  ``kw`` window rows / columns out of them and stores them (one writer per element).

Low precision: ``P`` and ``dS`` are cast to the input dtype for their matmuls (as in
FlashAttention); everything else is fp32. fp32 matmuls honour
``torch.backends.cuda.matmul.allow_tf32`` (off by default, so IEEE fp32).

Layers, as ``gate/triton.py``: ``@triton.jit`` kernels, host launchers, ``torch.library``
custom ops with fake and autograd registrations (traceable by ``torch.compile``), public ``na2d``.
"""
import bisect
from functools import lru_cache
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _dispatch
from .._triton_common import acc_dtype as _acc_dtype, dot as _dot, precision as _precision
from .._triton_common import unit_last as _unit_last, upcast as _upcast
from .reference import window_start

__all__ = ["na2d", "forward", "backward"]

# Tile / chunk sizes (powers of two, >= 16 elements so every tl.dot has legal shapes).
_BLOCK_Q = 64  # queries (or keys, in the dK / dV kernel) per tile
_MAX_TILE_W = 8  # tile width cap; the rest of _BLOCK_Q goes to the height
_BLOCK_K = 64  # halo keys per chunk (forward, dQ)
_BLOCK_DKV = 32  # cap on the queries per chunk in dK / dV (see _block_sizes)
_RPB_SLOTS = 16  # copies of the rpb gradient the atomics are spread over


# --------------------------------------------------------------------------- kernels

@triton.jit
def _win_start(p, n, K: tl.constexpr, S: tl.constexpr, ZPAD: tl.constexpr):
    """Window start (sub-grid units) of position ``p`` of a sub-grid of length ``n``.

    Clamp mode (``n >= K``): leader centred and clamped inside the sub-grid. ``ZPAD``
    (HaloNet): ``group start + S // 2 - K // 2``, not clamped (may lie outside the map)."""
    if ZPAD:
        start = p - p % S + S // 2 - K // 2
    else:
        leader = tl.minimum(p - p % S + S // 2, n - 1)
        start = tl.minimum(tl.maximum(leader - K // 2, 0), n - K)
    return start


@triton.jit
def _fwd_kernel(
        q_ptr, k_ptr, v_ptr, rpb_ptr, o_ptr, lse_ptr, scale_ptr, relh_ptr, relw_ptr,
        H, W, NH, DIM, DH, DW, NTW,
        sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son,
        srn, srh, srw, s1b, s1h, s1w, s1n, s1k, s2b, s2h, s2w, s2n, s2k,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        TH: tl.constexpr, TW: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_RPB: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
        ZPAD: tl.constexpr, HAS_RELH: tl.constexpr, HAS_RELW: tl.constexpr,
):
    pid_t, pid_r, pid_bn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bn // NH).to(tl.int64)  # int64: b * sqb overflows int32 on large maps
    head = (pid_bn % NH).to(tl.int64)
    rh, rw = pid_r // DW, pid_r % DW
    n_h = (H - rh + DH - 1) // DH  # length of this residue's sub-grid on each axis
    n_w = (W - rw + DW - 1) // DW
    t0h, t0w = (pid_t // NTW) * TH, (pid_t % NTW) * TW
    offs_q = tl.arange(0, TH * TW)
    qh, qw = t0h + offs_q // TW, t0w + offs_q % TW
    q_ok = (qh < n_h) & (qw < n_w)
    sh, sw = _win_start(qh, n_h, KH, SH, ZPAD), _win_start(qw, n_w, KW, SW, ZPAD)
    h0, w0 = _win_start(t0h, n_h, KH, SH, ZPAD), _win_start(t0w, n_w, KW, SW, ZPAD)  # halo origin
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    q_row, q_col = qh * DH + rh, qw * DW + rw
    qmask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + head * sqn + q_row[:, None] * sqh + q_col[:, None] * sqw + offs_d[None, :],
                mask=qmask, other=0.0)
    scale = tl.load(scale_ptr)
    m_i = tl.full([TH * TW], -1.0e30, ACC)  # finite start of the running max: no inf - inf
    l_i = tl.zeros([TH * TW], ACC)
    acc = tl.zeros([TH * TW, BLOCK_D], ACC)
    for kb in range(0, HALO_H * HALO_W, BLOCK_K):
        offs_k = kb + tl.arange(0, BLOCK_K)
        kh, kw = h0 + offs_k // HALO_W, w0 + offs_k % HALO_W
        k_in = offs_k < HALO_H * HALO_W
        k_ok = k_in & (kh >= 0) & (kh < n_h) & (kw >= 0) & (kw < n_w)
        k_row, k_col = kh * DH + rh, kw * DW + rw
        kmask = k_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_ptr + b * skb + head * skn + k_row[:, None] * skh + k_col[:, None] * skw + offs_d[None, :],
                     mask=kmask, other=0.0)
        s = _dot(q, tl.trans(kt), ACC, PREC, UPCAST) * scale
        ok = (q_ok[:, None] & k_in[None, :]
              & (kh[None, :] >= sh[:, None]) & (kh[None, :] < sh[:, None] + KH)
              & (kw[None, :] >= sw[:, None]) & (kw[None, :] < sw[:, None] + KW))
        if HAS_RPB:
            ih = kh[None, :] - qh[:, None] + (KH - 1)
            iw = kw[None, :] - qw[:, None] + (KW - 1)
            s += tl.load(rpb_ptr + head * srn + ih * srh + iw * srw, mask=ok, other=0.0).to(ACC)
        if HAS_RELH:
            s += tl.load(relh_ptr + b * s1b + head * s1n + q_row[:, None] * s1h + q_col[:, None] * s1w
                         + (kh[None, :] - sh[:, None]) * s1k, mask=ok, other=0.0).to(ACC)
        if HAS_RELW:
            s += tl.load(relw_ptr + b * s2b + head * s2n + q_row[:, None] * s2h + q_col[:, None] * s2w
                         + (kw[None, :] - sw[:, None]) * s2k, mask=ok, other=0.0).to(ACC)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_ptr + b * svb + head * svn + k_row[:, None] * svh + k_col[:, None] * svw + offs_d[None, :],
                     mask=kmask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, ACC, PREC, UPCAST)
        m_i = m_new
    l_i = tl.where(q_ok, l_i, 1.0)  # padding queries: no division by zero
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + head * son + q_row[:, None] * soh + q_col[:, None] * sow + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=qmask)
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + ((b * H + q_row) * W + q_col) * NH + head, lse.to(lse_ptr.dtype.element_ty), mask=q_ok)


@triton.jit
def _bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, rpb_ptr, lse_ptr, delta_ptr, dq_ptr, drpb_ptr, scale_ptr,
        relh_ptr, relw_ptr, drelh_ptr, drelw_ptr,
        H, W, NH, DIM, DH, DW, NTW, NTILES,
        sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son,
        sgb, sgh, sgw, sgn, sdb, sdh, sdw, sdn, srn, srh, srw,
        s1b, s1h, s1w, s1n, s1k, s2b, s2h, s2w, s2n, s2k,
        t1b, t1h, t1w, t1n, t1k, t2b, t2h, t2w, t2n, t2k,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        TH: tl.constexpr, TW: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, RPB_SLOTS: tl.constexpr,
        HAS_RPB: tl.constexpr, NEED_DRPB: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
        UPCAST: tl.constexpr, ZPAD: tl.constexpr, HAS_RELH: tl.constexpr, HAS_RELW: tl.constexpr,
        NEED_DREL: tl.constexpr, HP_H: tl.constexpr, HP_W: tl.constexpr,
):
    pid_t, pid_r, pid_bn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bn // NH).to(tl.int64)
    head = (pid_bn % NH).to(tl.int64)
    rh, rw = pid_r // DW, pid_r % DW
    n_h = (H - rh + DH - 1) // DH
    n_w = (W - rw + DW - 1) // DW
    t0h, t0w = (pid_t // NTW) * TH, (pid_t % NTW) * TW
    offs_q = tl.arange(0, TH * TW)
    qh, qw = t0h + offs_q // TW, t0w + offs_q % TW
    q_ok = (qh < n_h) & (qw < n_w)
    sh, sw = _win_start(qh, n_h, KH, SH, ZPAD), _win_start(qw, n_w, KW, SW, ZPAD)
    h0, w0 = _win_start(t0h, n_h, KH, SH, ZPAD), _win_start(t0w, n_w, KW, SW, ZPAD)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    q_row, q_col = qh * DH + rh, qw * DW + rw
    qmask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + head * sqn + q_row[:, None] * sqh + q_col[:, None] * sqw + offs_d[None, :],
                mask=qmask, other=0.0)
    do = tl.load(do_ptr + b * sgb + head * sgn + q_row[:, None] * sgh + q_col[:, None] * sgw + offs_d[None, :],
                 mask=qmask, other=0.0)
    o = tl.load(o_ptr + b * sob + head * son + q_row[:, None] * soh + q_col[:, None] * sow + offs_d[None, :],
                mask=qmask, other=0.0)
    delta = tl.sum(do.to(ACC) * o.to(ACC), 1)
    row_off = ((b * H + q_row) * W + q_col) * NH + head
    tl.store(delta_ptr + row_off, delta.to(delta_ptr.dtype.element_ty), mask=q_ok)
    lse = tl.load(lse_ptr + row_off, mask=q_ok, other=0.0).to(ACC)
    scale = tl.load(scale_ptr)
    dq = tl.zeros([TH * TW, BLOCK_D], ACC)
    # d rel_h / d rel_w: dS summed per halo row / column (a matmul with a one-hot), read out
    # at each query's window rows / columns after the walk; per query, no atomics
    gh = tl.zeros([TH * TW, HP_H], ACC)
    gw = tl.zeros([TH * TW, HP_W], ACC)
    for kb in range(0, HALO_H * HALO_W, BLOCK_K):
        offs_k = kb + tl.arange(0, BLOCK_K)
        kh, kw = h0 + offs_k // HALO_W, w0 + offs_k % HALO_W
        k_in = offs_k < HALO_H * HALO_W
        k_ok = k_in & (kh >= 0) & (kh < n_h) & (kw >= 0) & (kw < n_w)
        k_row, k_col = kh * DH + rh, kw * DW + rw
        kmask = k_ok[:, None] & d_ok[None, :]
        kt = tl.load(k_ptr + b * skb + head * skn + k_row[:, None] * skh + k_col[:, None] * skw + offs_d[None, :],
                     mask=kmask, other=0.0)
        vt = tl.load(v_ptr + b * svb + head * svn + k_row[:, None] * svh + k_col[:, None] * svw + offs_d[None, :],
                     mask=kmask, other=0.0)
        s = _dot(q, tl.trans(kt), ACC, PREC, UPCAST) * scale
        ok = (q_ok[:, None] & k_in[None, :]
              & (kh[None, :] >= sh[:, None]) & (kh[None, :] < sh[:, None] + KH)
              & (kw[None, :] >= sw[:, None]) & (kw[None, :] < sw[:, None] + KW))
        ih = kh[None, :] - qh[:, None] + (KH - 1)
        iw = kw[None, :] - qw[:, None] + (KW - 1)
        if HAS_RPB:
            s += tl.load(rpb_ptr + head * srn + ih * srh + iw * srw, mask=ok, other=0.0).to(ACC)
        if HAS_RELH:
            s += tl.load(relh_ptr + b * s1b + head * s1n + q_row[:, None] * s1h + q_col[:, None] * s1w
                         + (kh[None, :] - sh[:, None]) * s1k, mask=ok, other=0.0).to(ACC)
        if HAS_RELW:
            s += tl.load(relw_ptr + b * s2b + head * s2n + q_row[:, None] * s2h + q_col[:, None] * s2w
                         + (kw[None, :] - sw[:, None]) * s2k, mask=ok, other=0.0).to(ACC)
        p = tl.exp(tl.where(ok, s - lse[:, None], float("-inf")))
        dp = _dot(do, tl.trans(vt), ACC, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), kt, ACC, PREC, UPCAST)
        if NEED_DREL:
            oh = ((offs_k // HALO_W)[:, None] == tl.arange(0, HP_H)[None, :]).to(ACC)
            gh += _dot(ds, oh, ACC, "ieee", False)
            ow = ((offs_k % HALO_W)[:, None] == tl.arange(0, HP_W)[None, :]).to(ACC)
            gw += _dot(ds, ow, ACC, "ieee", False)
        if NEED_DRPB:
            # this program's copy of the rpb gradient
            slot = ((b * tl.num_programs(1) + pid_r) * NTILES + pid_t) % RPB_SLOTS
            drpb_slot = drpb_ptr + (slot * NH + head) * ((2 * KH - 1) * (2 * KW - 1))
            tl.atomic_add(drpb_slot + ih * (2 * KW - 1) + iw, ds, mask=ok)
    if NEED_DREL:
        ar_h = tl.arange(0, HP_H)
        rel_h0 = sh - h0  # a query's window rows in halo coordinates: rel_h0 + i
        out_h = drelh_ptr + b * t1b + head * t1n + q_row * t1h + q_col * t1w
        for i in tl.static_range(KH):
            col = tl.sum(tl.where(ar_h[None, :] == (rel_h0 + i)[:, None], gh, 0.0), 1)
            tl.store(out_h + i * t1k, col.to(drelh_ptr.dtype.element_ty), mask=q_ok)
        ar_w = tl.arange(0, HP_W)
        rel_w0 = sw - w0
        out_w = drelw_ptr + b * t2b + head * t2n + q_row * t2h + q_col * t2w
        for j in tl.static_range(KW):
            col = tl.sum(tl.where(ar_w[None, :] == (rel_w0 + j)[:, None], gw, 0.0), 1)
            tl.store(out_w + j * t2k, col.to(drelw_ptr.dtype.element_ty), mask=q_ok)
    dq = dq * scale
    tl.store(dq_ptr + b * sdb + head * sdn + q_row[:, None] * sdh + q_col[:, None] * sdw + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _bwd_dkv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, rpb_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, qoh_ptr, qow_ptr, scale_ptr,
        relh_ptr, relw_ptr,
        H, W, NH, DIM, DH, DW, NTH, NTW,
        sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn,
        sgb, sgh, sgw, sgn, sob, soh, sow, son, srn, srh, srw,
        s1b, s1h, s1w, s1n, s1k, s2b, s2h, s2w, s2n, s2k,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        TH: tl.constexpr, TW: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_RPB: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
        ZPAD: tl.constexpr, HAS_RELH: tl.constexpr, HAS_RELW: tl.constexpr,
):
    pid_t, pid_r, pid_bn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bn // NH).to(tl.int64)
    head = (pid_bn % NH).to(tl.int64)
    rh, rw = pid_r // DW, pid_r % DW
    n_h = (H - rh + DH - 1) // DH
    n_w = (W - rw + DW - 1) // DW
    tile_h, tile_w = pid_t // NTW, pid_t % NTW
    offs_k = tl.arange(0, TH * TW)
    kh, kw = tile_h * TH + offs_k // TW, tile_w * TW + offs_k % TW
    k_ok = (kh < n_h) & (kw < n_w)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    k_row, k_col = kh * DH + rh, kw * DW + rw
    kmask = k_ok[:, None] & d_ok[None, :]
    kt = tl.load(k_ptr + b * skb + head * skn + k_row[:, None] * skh + k_col[:, None] * skw + offs_d[None, :],
                 mask=kmask, other=0.0)
    vt = tl.load(v_ptr + b * svb + head * svn + k_row[:, None] * svh + k_col[:, None] * svw + offs_d[None, :],
                 mask=kmask, other=0.0)
    # the queries (per axis) whose windows reach this key tile: first one and count, from
    # the host tables [residue, tile, 2]; a count of 0 leaves dk = dv = 0
    q0h = tl.load(qoh_ptr + (rh * NTH + tile_h) * 2)
    neh = tl.load(qoh_ptr + (rh * NTH + tile_h) * 2 + 1)
    q0w = tl.load(qow_ptr + (rw * NTW + tile_w) * 2)
    new = tl.load(qow_ptr + (rw * NTW + tile_w) * 2 + 1)
    scale = tl.load(scale_ptr)
    dk = tl.zeros([TH * TW, BLOCK_D], ACC)
    dv = tl.zeros([TH * TW, BLOCK_D], ACC)
    for qb in range(0, neh * new, BLOCK_Q):
        offs_q = qb + tl.arange(0, BLOCK_Q)
        qh, qw = q0h + offs_q // new, q0w + offs_q % new
        q_ok = (offs_q < neh * new) & (qh < n_h) & (qw < n_w)
        sh, sw = _win_start(qh, n_h, KH, SH, ZPAD), _win_start(qw, n_w, KW, SW, ZPAD)
        q_row, q_col = qh * DH + rh, qw * DW + rw
        qmask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b * sqb + head * sqn + q_row[:, None] * sqh + q_col[:, None] * sqw + offs_d[None, :],
                    mask=qmask, other=0.0)
        do = tl.load(do_ptr + b * sgb + head * sgn + q_row[:, None] * sgh + q_col[:, None] * sgw + offs_d[None, :],
                     mask=qmask, other=0.0)
        row_off = ((b * H + q_row) * W + q_col) * NH + head
        lse = tl.load(lse_ptr + row_off, mask=q_ok, other=0.0).to(ACC)
        delta = tl.load(delta_ptr + row_off, mask=q_ok, other=0.0).to(ACC)
        # transposed scores: keys on rows, queries on columns
        st = _dot(kt, tl.trans(q), ACC, PREC, UPCAST) * scale
        ok = (k_ok[:, None] & q_ok[None, :]
              & (kh[:, None] >= sh[None, :]) & (kh[:, None] < sh[None, :] + KH)
              & (kw[:, None] >= sw[None, :]) & (kw[:, None] < sw[None, :] + KW))
        if HAS_RPB:
            ih = kh[:, None] - qh[None, :] + (KH - 1)
            iw = kw[:, None] - qw[None, :] + (KW - 1)
            st += tl.load(rpb_ptr + head * srn + ih * srh + iw * srw, mask=ok, other=0.0).to(ACC)
        if HAS_RELH:
            st += tl.load(relh_ptr + b * s1b + head * s1n + q_row[None, :] * s1h + q_col[None, :] * s1w
                          + (kh[:, None] - sh[None, :]) * s1k, mask=ok, other=0.0).to(ACC)
        if HAS_RELW:
            st += tl.load(relw_ptr + b * s2b + head * s2n + q_row[None, :] * s2h + q_col[None, :] * s2w
                          + (kw[:, None] - sw[None, :]) * s2k, mask=ok, other=0.0).to(ACC)
        pt = tl.exp(tl.where(ok, st - lse[None, :], float("-inf")))
        dv += _dot(pt.to(do.dtype), do, ACC, PREC, UPCAST)
        dpt = _dot(vt, tl.trans(do), ACC, PREC, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, ACC, PREC, UPCAST)
    dk = dk * scale
    out_off = b * sob + head * son + k_row[:, None] * soh + k_col[:, None] * sow + offs_d[None, :]
    tl.store(dk_ptr + out_off, dk.to(dk_ptr.dtype.element_ty), mask=kmask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kmask)


# --------------------------------------------------------------------------- host plan

@lru_cache(maxsize=128)
def _sub_starts(length: int, k: int, d: int, s: int, r: int, zpad: bool = False) -> Tuple[int, ...]:
    """Window starts (sub-grid units) of every position of residue ``r``'s sub-grid
    (``zpad``: HaloNet's unclamped ``group start + s // 2 - k // 2``, dilation 1)."""
    n = (length - r + d - 1) // d
    if zpad:
        return tuple(p - p % s + s // 2 - k // 2 for p in range(n))
    return tuple((window_start(r + p * d, length, k, d, s) - r) // d for p in range(n))


@lru_cache(maxsize=128)
def _axis_plan(length: int, k: int, d: int, s: int, t: int, zpad: bool = False):
    """Per-axis tiling: ``(n_tiles, halo, qhalo, qrange)``.

    Tiles of ``t`` sub-grid positions, counted on the longest sub-grid. ``halo``: the
    largest key extent of a query tile, ``start(last) + k - start(first)``.
    ``qrange[r][m] = (first, count)``: the queries of residue ``r``'s sub-grid that see a
    key of key tile ``m`` (``(0, 0)`` when none does); ``qhalo``: the largest count. Exact
    for every residue (sub-grids of a dilated axis differ in length by one).
    """
    n_long = -(-length // d)
    n_tiles = -(-n_long // t)
    halo, qhalo = 1, 1
    qrange = []
    for r in range(d):
        st = _sub_starts(length, k, d, s, r, zpad)
        ends = [x + k for x in st]  # exclusive window ends, non-decreasing like the starts
        n = len(st)
        row = []
        for m in range(n_tiles):
            a, b = m * t, min(m * t + t, n)
            if a >= n:
                row.append((0, 0))
                continue
            halo = max(halo, st[b - 1] + k - st[a])
            first = bisect.bisect_right(ends, a)  # first query whose window ends past key a
            last = bisect.bisect_right(st, b - 1) - 1  # last query whose window starts at or before key b-1
            if first <= last:
                qhalo = max(qhalo, last - first + 1)
                row.append((first, last - first + 1))
            else:
                row.append((0, 0))
        qrange.append(tuple(row))
    return n_tiles, halo, qhalo, tuple(qrange)


def _tiles(n_h: int, n_w: int, block_q: int, max_tile_w: int) -> Tuple[int, int]:
    """Query tile ``(TH, TW)`` in sub-grid units: powers of two, ``TH * TW`` in ``[16, block_q]``."""
    tw = min(triton.next_power_of_2(n_w), max_tile_w)
    th = min(triton.next_power_of_2(n_h), max(block_q // tw, 1))
    while th * tw < 16:  # tl.dot needs >= 16 rows; the extra rows are masked
        th *= 2
    return th, tw


class _Plan:
    """Tiles, halos and inverse-halo tables of one geometry (and one set of block sizes)."""

    def __init__(self, H, W, kernel_size, dilation, stride, block_q, max_tile_w, block_k, zpad=False):
        (kh, kw), (dh, dw), (sh, sw) = kernel_size, dilation, stride
        self.th, self.tw = _tiles(-(-H // dh), -(-W // dw), block_q, max_tile_w)
        self.nth, self.halo_h, self.qhalo_h, self.qrange_h = _axis_plan(H, kh, dh, sh, self.th, zpad)
        self.ntw, self.halo_w, self.qhalo_w, self.qrange_w = _axis_plan(W, kw, dw, sw, self.tw, zpad)
        self.block_k = max(16, min(block_k, triton.next_power_of_2(self.halo_h * self.halo_w)))
        self._tables = {}

    def tables(self, device):
        """The ``qrange`` tables as int32 ``[d, n_tiles, 2]`` tensors on ``device`` (cached)."""
        if device not in self._tables:
            self._tables[device] = tuple(torch.tensor(t, dtype=torch.int32, device=device)
                                         for t in (self.qrange_h, self.qrange_w))
        return self._tables[device]


@lru_cache(maxsize=64)
def _plan(H, W, kernel_size, dilation, stride, block_q, max_tile_w, block_k, zpad=False) -> _Plan:
    return _Plan(H, W, kernel_size, dilation, stride, block_q, max_tile_w, block_k, zpad)


# --------------------------------------------------------------------------- launchers

def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _rpb_args(rpb: Optional[torch.Tensor]):
    if rpb is None:
        return None, (0, 0, 0)
    return rpb, rpb.stride()


class _Launch(NamedTuple):
    block_q: int  # queries per tile
    block_k: int  # keys per dQ chunk
    fwd_block_k: int  # keys per forward chunk
    block_dkv: int  # cap on the queries per dK / dV chunk
    warps: int  # backward kernels
    fwd_warps: int


def _block_sizes(dtype: torch.dtype, block_d: int, rel: bool = False, dilated: bool = False) -> _Launch:
    """Tile / chunk sizes and warps of one call.

    Chosen with ``tools/gpu_readiness.py`` (sm_80 / sm_90 cubins at the paper models' shapes).
    The masks, rpb / rel offsets and softmax terms of a ``[tile, chunk]`` block are all live at
    once, so register pressure, not the matmuls, sets the sizes; where the need is just above a
    two-blocks-per-SM budget (80 / 128 registers on 8 warps) ptxas spills a few bytes rather than
    give up a block, so a smaller chunk can spill where a larger one does not. On 4 warps every
    kernel spilled somewhere: fp16 / bf16 keep 64 x 64 tiles on 8 warps, with dK / dV's queries
    chunked by 32; fp32, whose dots are FMA loops unless TF32 is on, takes 32 x 32 (16 keys at
    D > 128, where fp32's FMA operand staging passed sm_80's 163 KiB of shared memory); with
    dilation (runtime index arithmetic on every key-query pair) its dK / dV queries go 16 at a
    time (32 spilled at DiNAT's dilated 7 x 7, also on 2 stages or 128 registers). The rel_h /
    rel_w path (HaloNet) adds the bias gathers and the dQ kernel's one-hot ``[tile, halo row /
    column]`` gradient dots: dQ takes 16 keys per chunk (32 spilled up to 164 bytes in fp32 and
    32 in half at D = 128), dK / dV 16 queries in fp32 and in half at D <= 32 (32 spilled 4-16
    bytes there, 16 spilled in half at D = 64 / 128); the forward keeps 32 keys (16 spilled
    more), and in half at D > 128 runs on 4 warps, where ptxas may use 255 registers (on 8 it
    held 128 and spilled). fp64 (not in the matrix): 32 x 32, 16 keys at D > 64, 4 warps."""
    if dtype == torch.float64:
        bk = 32 if block_d <= 64 else 16
        return _Launch(32, bk, bk, min(bk, _BLOCK_DKV), 4, 4)
    if rel:
        bk = 32 if block_d <= 128 else 16
        dkv = 16 if dtype == torch.float32 or block_d <= 32 else min(bk, _BLOCK_DKV)
        return _Launch(32, 16, bk, dkv, 8, 4 if dtype != torch.float32 and block_d > 128 else 8)
    if dtype == torch.float32:
        bk = 32 if block_d <= 128 else 16
        return _Launch(32, bk, bk, 16 if dilated else min(bk, _BLOCK_DKV), 8, 8)
    return _Launch(_BLOCK_Q, _BLOCK_K, _BLOCK_K, min(_BLOCK_K, _BLOCK_DKV), 8, 8)


def _rel_args(rel: Optional[torch.Tensor]):
    if rel is None:
        return None, (0, 0, 0, 0, 0)
    return rel, rel.stride()


def _chunk(cap: int, n: int) -> int:
    """A chunk of at most ``cap`` (a power of two) and at least 16 for ``n`` elements."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _common(q, kernel_size, dilation, stride, zpad=False, rel=False):
    """The plan, grid, BLOCK_D, forward key chunk, dK / dV query chunk and launch choices of one call."""
    B, H, W, NH, D = q.shape
    block_d = max(16, triton.next_power_of_2(D))
    lc = _block_sizes(q.dtype, block_d, rel, dilation[0] * dilation[1] > 1)
    plan = _plan(H, W, tuple(kernel_size), tuple(dilation), tuple(stride), lc.block_q, _MAX_TILE_W, lc.block_k,
                 bool(zpad))
    grid = (plan.nth * plan.ntw, dilation[0] * dilation[1], B * NH)
    return (plan, grid, block_d, _chunk(lc.fwd_block_k, plan.halo_h * plan.halo_w),
            _chunk(lc.block_dkv, plan.qhalo_h * plan.qhalo_w), lc)


def _scale_tensor(scale: float, acc_torch, device) -> torch.Tensor:
    # a pointer rather than a float argument: Triton would round a float scalar to fp32
    return torch.full((1,), scale, dtype=acc_torch, device=device)


def forward(q, k, v, kernel_size, dilation, stride, rpb, scale, border="clamp", rel_h=None,
            rel_w=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Output ``[B, H, W, heads, D]`` (q's dtype) and log-sum-exp ``[B, H, W, heads]`` (fp32; fp64 for fp64)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, W, NH, D = q.shape
    zpad = border == "zero_pad"
    plan, grid, block_d, block_k, _, lc = _common(q, kernel_size, dilation, stride, zpad,
                                                  rel_h is not None or rel_w is not None)
    rel_h, s1 = _rel_args(rel_h)
    rel_w, s2 = _rel_args(rel_w)
    acc, acc_torch = _acc_dtype(q.dtype)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, W, NH), dtype=acc_torch, device=q.device)
    rpb, sr = _rpb_args(rpb)
    _fwd_kernel[grid](
        q, k, v, rpb, out, lse, _scale_tensor(scale, acc_torch, q.device), rel_h, rel_w,
        H, W, NH, D, dilation[0], dilation[1], plan.ntw,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *sr, *s1, *s2,
        KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1],
        TH=plan.th, TW=plan.tw, HALO_H=plan.halo_h, HALO_W=plan.halo_w,
        BLOCK_K=block_k, BLOCK_D=block_d,
        HAS_RPB=rpb is not None, ACC=acc, PREC=_precision(q.dtype), UPCAST=_upcast(q.dtype),
        ZPAD=zpad, HAS_RELH=rel_h is not None, HAS_RELW=rel_w is not None, num_warps=lc.fwd_warps,
    )
    return out, lse


def backward(do, q, k, v, out, lse, kernel_size, dilation, stride, rpb, scale,
             need_dkv: bool = True, need_drpb: bool = True, border: str = "clamp",
             rel_h: Optional[torch.Tensor] = None, rel_w: Optional[torch.Tensor] = None, need_drel: bool = True):
    """``dq, dk, dv, drpb, drel_h, drel_w`` (dk, dv None unless ``need_dkv``; drpb None without rpb
    or ``need_drpb``; drel_h / drel_w None without rel_h / rel_w or ``need_drel``).

    ``out`` and ``lse`` are ``forward``'s; dq / dk / dv come in the inputs' dtype, drpb in rpb's,
    drel_h / drel_w (contiguous) in rel_h's / rel_w's.
    """
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do)
    B, H, W, NH, D = q.shape
    zpad = border == "zero_pad"
    plan, grid, block_d, _, block_dkv, lc = _common(q, kernel_size, dilation, stride, zpad,
                                                    rel_h is not None or rel_w is not None)
    rel_h, s1 = _rel_args(rel_h)
    rel_w, s2 = _rel_args(rel_w)
    need_drel = need_drel and (rel_h is not None or rel_w is not None)
    # the kernel writes both when it writes one; a gradient nobody asked for is dropped
    drel_h = torch.empty((B, H, W, NH, kernel_size[0]), dtype=(rel_h if rel_h is not None else q).dtype,
                         device=q.device) if need_drel else None
    drel_w = torch.empty((B, H, W, NH, kernel_size[1]), dtype=(rel_w if rel_w is not None else q).dtype,
                         device=q.device) if need_drel else None
    t1 = drel_h.stride() if need_drel else (0,) * 5
    t2 = drel_w.stride() if need_drel else (0,) * 5
    acc, acc_torch = _acc_dtype(q.dtype)
    prec = _precision(q.dtype)
    scale_t = _scale_tensor(scale, acc_torch, q.device)
    rpb_t, sr = _rpb_args(rpb)
    need_drpb = need_drpb and rpb is not None
    kh, kw = kernel_size
    delta = torch.empty((B, H, W, NH), dtype=acc_torch, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    slots = min(_RPB_SLOTS, grid[0] * grid[1] * B)
    drpb = torch.zeros((slots, NH, 2 * kh - 1, 2 * kw - 1), dtype=acc_torch, device=q.device) if need_drpb else None
    consts = dict(KH=kh, KW=kw, SH=stride[0], SW=stride[1], TH=plan.th, TW=plan.tw,
                  BLOCK_D=block_d, HAS_RPB=rpb is not None, ACC=acc, PREC=prec, UPCAST=_upcast(q.dtype),
                  ZPAD=zpad, HAS_RELH=rel_h is not None, HAS_RELW=rel_w is not None, num_warps=lc.warps)
    _bwd_dq_kernel[grid](
        q, k, v, out, do, rpb_t, lse, delta, dq, drpb, scale_t, rel_h, rel_w, drel_h, drel_w,
        H, W, NH, D, dilation[0], dilation[1], plan.ntw, grid[0],
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(do), *_strides(dq), *sr,
        *s1, *s2, *t1, *t2,
        HALO_H=plan.halo_h, HALO_W=plan.halo_w, BLOCK_K=plan.block_k,
        RPB_SLOTS=slots, NEED_DRPB=need_drpb, NEED_DREL=need_drel,
        HP_H=max(16, triton.next_power_of_2(plan.halo_h)), HP_W=max(16, triton.next_power_of_2(plan.halo_w)),
        **consts,
    )
    dk = dv = None
    if need_dkv:
        dk = torch.empty(q.shape, dtype=k.dtype, device=q.device)
        dv = torch.empty(q.shape, dtype=v.dtype, device=q.device)
        qoh, qow = plan.tables(q.device)
        _bwd_dkv_kernel[grid](
            q, k, v, do, rpb_t, lse, delta, dk, dv, qoh, qow, scale_t, rel_h, rel_w,
            H, W, NH, D, dilation[0], dilation[1], plan.nth, plan.ntw,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *sr, *s1, *s2,
            BLOCK_Q=block_dkv, **consts,
        )
    if drpb is not None:
        drpb = drpb.sum(0).to(rpb.dtype)
    if rel_h is None:
        drel_h = None
    if rel_w is None:
        drel_w = None
    return dq, dk, dv, drpb, drel_h, drel_w


# --------------------------------------------------------------------------- custom ops
# The kernels run behind two ``torch.library`` custom ops with fake (shape) and autograd
# registrations, so ``torch.compile`` traces ``na2d`` as two opaque nodes instead of
# breaking the graph on the host code (tiling plans, launches). ``custom_op`` rather than
# ``triton_op``: the launchers' host code (lru-cached plans, int32 tables) need not be
# traceable, and the same ops run under TRITON_INTERPRET=1 on CPU, where they are tested.
# Outputs a caller did not ask for are returned as empty tensors (custom ops return no None).

Tensor = torch.Tensor
_NONE = (0,)


def _or_empty(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(_NONE) if t is None else t


@torch.library.custom_op("attnzoo::na2d_triton_fwd", mutates_args=())
def _na2d_fwd_op(q: Tensor, k: Tensor, v: Tensor, rpb: Optional[Tensor], rel_h: Optional[Tensor],
                 rel_w: Optional[Tensor], kernel_size: List[int], dilation: List[int], stride: List[int],
                 scale: float, border: str) -> Tuple[Tensor, Tensor]:
    return forward(q, k, v, tuple(kernel_size), tuple(dilation), tuple(stride), rpb, scale, border, rel_h, rel_w)


@_na2d_fwd_op.register_fake
def _(q, k, v, rpb, rel_h, rel_w, kernel_size, dilation, stride, scale, border):
    B, H, W, NH, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, W, NH), dtype=_acc_dtype(q.dtype)[1])


@torch.library.custom_op("attnzoo::na2d_triton_bwd", mutates_args=())
def _na2d_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, rpb: Optional[Tensor],
                 rel_h: Optional[Tensor], rel_w: Optional[Tensor], kernel_size: List[int], dilation: List[int],
                 stride: List[int], scale: float, border: str, need_dkv: bool, need_drpb: bool,
                 need_drel: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = backward(do, q, k, v, out, lse, tuple(kernel_size), tuple(dilation), tuple(stride), rpb, scale,
                     need_dkv=need_dkv, need_drpb=need_drpb, border=border, rel_h=rel_h, rel_w=rel_w,
                     need_drel=need_drel)
    return tuple(_or_empty(g, q) for g in grads)


@_na2d_bwd_op.register_fake
def _(do, q, k, v, out, lse, rpb, rel_h, rel_w, kernel_size, dilation, stride, scale, border,
      need_dkv, need_drpb, need_drel):
    B, H, W, NH, _ = q.shape
    empty = q.new_empty(_NONE)
    dk = q.new_empty(q.shape, dtype=k.dtype) if need_dkv else empty
    dv = q.new_empty(q.shape, dtype=v.dtype) if need_dkv else empty
    drpb = rpb.new_empty(rpb.shape) if rpb is not None and need_drpb else empty
    need_drel = need_drel and (rel_h is not None or rel_w is not None)
    drh = rel_h.new_empty((B, H, W, NH, kernel_size[0])) if need_drel and rel_h is not None else empty
    drw = rel_w.new_empty((B, H, W, NH, kernel_size[1])) if need_drel and rel_w is not None else empty
    return q.new_empty(q.shape), dk, dv, drpb, drh, drw


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, rel_h, rel_w, kernel_size, dilation, stride, scale, border = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, rel_h, rel_w, out, lse)
    ctx.geometry = (kernel_size, dilation, stride, scale, border)


def _backward(ctx, do, _dlse):
    q, k, v, rpb, rel_h, rel_w, out, lse = ctx.saved_tensors
    need_q, need_k, need_v, need_rpb, need_rh, need_rw = ctx.needs_input_grad[:6]
    kernel_size, dilation, stride, scale, border = ctx.geometry
    dq, dk, dv, drpb, drh, drw = _na2d_bwd_op(
        do, q, k, v, out, lse, rpb, rel_h, rel_w, kernel_size, dilation, stride, scale, border,
        need_k or need_v, need_rpb, need_rh or need_rw)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
            drpb if need_rpb else None, drh if need_rh else None, drw if need_rw else None,
            None, None, None, None, None)


_na2d_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_dispatch.register_compile_traceable(__name__)


# --------------------------------------------------------------------------- public

def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Tuple[int, int],
         dilation: Tuple[int, int], stride: Tuple[int, int], rpb: Optional[torch.Tensor],
         scale: float, border: str = "clamp", rel_h: Optional[torch.Tensor] = None,
         rel_w: Optional[torch.Tensor] = None, query_stride: Tuple[int, int] = (1, 1)) -> torch.Tensor:
    """Neighborhood attention on ``[B, H, W, heads, D]``; arguments validated by ``__init__`` (per-axis
    tuples, rpb / rel_h / rel_w in q's dtype), not checked again here.

    ``border="zero_pad"`` (HaloNet, dilation 1): unclamped windows starting at ``group start +
    stride // 2 - kernel // 2``; keys outside the map are zeros that still take part in the
    softmax (logit = the bias terms only). Any kernel size (even too) and map size.
    ``rel_h`` / ``rel_w`` ``[B, H, W, heads, kh | kw]``: per-query biases added to the logit of
    the key at window row ``i`` / column ``j``; differentiable.
    ``query_stride`` is always ``(1, 1)`` here: the dispatch's ``can_run`` refuses a query stride.
    """
    return _na2d_fwd_op(q, k, v, rpb, rel_h, rel_w, list(kernel_size), list(dilation), list(stride),
                        float(scale), border)[0]
