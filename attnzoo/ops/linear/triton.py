"""Triton kernels for linear attention (plain and magnitude-aware): fused forward and backward.

Same contract as ``reference.py``: ``linear_attention(q, k, v, cos, sin, scale, eps,
magnitude_aware)`` on ``[B, heads, N, D]`` tensors read in place through their strides,
RoPE tables ``[N, D/2]`` or None. Each direction is two passes over the tokens:

- Forward

  1. ``_summary_kernel`` (grid ``(B * heads, chunks)``): each program walks a chunk of
     tokens and accumulates ``rope(k)^T v`` (``tl.dot``), ``sum(k)`` and ``sum(v)``;
     the per-chunk partials (``[D, D]`` + ``2 D`` floats) are summed on the host into
     ``kv = (scale / N) rope(k)^T v``, ``mean(k)``, ``mean(v)``.
  2. ``_out_kernel`` (grid ``(B * heads, token blocks)``): per query,
     ``z = scale q . mean(k)``, ``out = a(z) rope(q) @ kv - b(z) mean(v)``.

- Backward (``g = dL/dout``; derivation in README.md)

  1. ``_bwd_summary_kernel``: recomputes ``z``, ``a``, ``rope(q)`` and
     ``dz = da/dz rope(q).(g kv^T) - g.mean(v)`` per query and accumulates
     ``dkv = (a rope(q))^T g``, ``sum(dz q)`` and ``sum(z g)`` per chunk.
  2. ``_bwd_rows_kernel``: per token, ``dq = rope^-1(a g kv^T) + scale dz mean(k)``,
     ``dk = rope^-1((scale/N) v dkv^T) + scale sum(dz q) / N``,
     ``dv = (scale/N) rope(k) dkv - sum(z g) / N``.

Nothing ``N x N`` or per-token ``D x D`` exists: the largest objects are the ``[D, D]``
summaries per head (and per chunk, before the host sum). RoPE needs each channel's pair
partner ``2i <-> 2i+1``: it is loaded a second time at column ``d ^ 1`` (for the inverse
turn of a matmul result, the matmul is repeated with the ``[D, D]`` operand's rows
permuted the same way), so no register shuffles are needed. Everything is computed in
fp32 (fp64 for fp64 inputs): every operand is upcast on load, so ``dot`` never needs to
(``UPCAST`` False); fp32 matmuls honour ``torch.backends.cuda.matmul.allow_tf32``.

Layers, as the other ops: ``@triton.jit`` kernels, host launchers, ``torch.library`` custom ops
(fake and autograd registrations), the public function.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _dispatch
from .._triton_common import acc_dtype as _acc_dtype, dot as _dot, precision as _precision

__all__ = ["linear_attention", "forward", "backward"]

_BLOCK_N = 16  # tokens per block (see _num_warps)
_BLOCK_K = 16  # rows of a [BD, BD] summary per dot step in _out_kernel and _bwd_rows_kernel (_rows_times)
_TARGET_PROGRAMS = 512  # summary kernels: split N into chunks until about this many programs


# --------------------------------------------------------------------------- kernels

@triton.jit
def _load(ptr, offs_n, offs_d, sn, sd, N, D, ACC: tl.constexpr):
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    return tl.load(ptr + offs_n[:, None] * sn + offs_d[None, :] * sd, mask=mask, other=0.0).to(ACC)


@triton.jit
def _turn(x, x_partner, cos_ptr, sin_ptr, offs_n, offs_d, N, D, INVERSE: tl.constexpr, ACC: tl.constexpr):
    """RoPE of rows ``x`` given their pair partners (``x[:, d ^ 1]``); INVERSE turns back."""
    half = offs_d // 2
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    tab = offs_n[:, None] * (D // 2) + half[None, :]
    c = tl.load(cos_ptr + tab, mask=mask, other=0.0).to(ACC)
    s = tl.load(sin_ptr + tab, mask=mask, other=0.0).to(ACC)
    even = (offs_d % 2) == 0
    sign = tl.where(even, -1.0, 1.0).to(ACC)
    if INVERSE:
        sign = -sign
    return x * c + x_partner * (s * sign[None, :])


@triton.jit
def _summary_kernel(
        k_ptr, v_ptr, cos_ptr, sin_ptr, kv_ptr, ks_ptr, vs_ptr,
        N, D, NH, CHUNK,
        skb, skh, skn, skd, svb, svh, svn, svd,
        HAS_ROPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh, pid_c = tl.program_id(0), tl.program_id(1)
    nchunks = tl.num_programs(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    k_ptr += b * skb + h * skh
    v_ptr += b * svb + h * svh
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)
    ksum = tl.zeros((BLOCK_D,), dtype=ACC)
    vsum = tl.zeros((BLOCK_D,), dtype=ACC)
    for start in range(pid_c * CHUNK, tl.minimum(pid_c * CHUNK + CHUNK, N), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load(k_ptr, offs_n, offs_d, skn, skd, N, D, ACC)
        v = _load(v_ptr, offs_n, offs_d, svn, svd, N, D, ACC)
        ksum += tl.sum(k, 0)
        vsum += tl.sum(v, 0)
        if HAS_ROPE:
            kp = _load(k_ptr, offs_n, offs_d ^ 1, skn, skd, N, D, ACC)
            k = _turn(k, kp, cos_ptr, sin_ptr, offs_n, offs_d, N, D, False, ACC)
        acc += _dot(tl.trans(k), v, ACC, PREC, False)
    base = pid_bh * nchunks + pid_c
    tl.store(kv_ptr + base * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :], acc)
    tl.store(ks_ptr + base * BLOCK_D + offs_d, ksum)
    tl.store(vs_ptr + base * BLOCK_D + offs_d, vsum)


@triton.jit
def _coefs(z, eps, MAGNITUDE: tl.constexpr):
    inv = 1.0 / (z + eps)
    if MAGNITUDE:
        a = 1.0 + inv
    else:
        a = inv
    return a, -inv * inv


@triton.jit
def _rows_times(x_ptr, sn, sd, cos_ptr, sin_ptr, m_ptr, offs_n, N, D, TURN: tl.constexpr, MODE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                PREC: tl.constexpr):
    """``x @ M'`` for the rows ``x`` at ``x_ptr`` (RoPE-turned if TURN) and a ``[BD, BD]`` summary
    ``M`` read as ``M`` (MODE 0), ``M^T`` (1) or ``M^T`` with its columns permuted ``d -> d ^ 1``
    (2), ``BLOCK_K`` rows of ``M'`` at a time: an FMA dot keeps its operand's whole K extent in each
    thread's registers, which spilled kilobytes at BD = 128 (tools/gpu_readiness.py)."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    for kc in range(0, BLOCK_D, BLOCK_K):  # a loop: unrolled (static_range), every block's loads were hoisted
        offs_k = kc + tl.arange(0, BLOCK_K)
        x = _load(x_ptr, offs_n, offs_k, sn, sd, N, D, ACC)
        if TURN:
            xp = _load(x_ptr, offs_n, offs_k ^ 1, sn, sd, N, D, ACC)
            x = _turn(x, xp, cos_ptr, sin_ptr, offs_n, offs_k, N, D, False, ACC)
        if MODE == 0:
            m = tl.load(m_ptr + offs_k[:, None] * BLOCK_D + offs_d[None, :])
        elif MODE == 1:
            m = tl.load(m_ptr + offs_d[None, :] * BLOCK_D + offs_k[:, None])
        else:
            m = tl.load(m_ptr + (offs_d[None, :] ^ 1) * BLOCK_D + offs_k[:, None])
        acc += _dot(x, m, ACC, PREC, False)
    return acc


@triton.jit
def _out_kernel(
        q_ptr, cos_ptr, sin_ptr, kv_ptr, km_ptr, vm_ptr, o_ptr, consts_ptr,
        N, D, NH,
        sqb, sqh, sqn, sqd, sob, soh, son, sod,
        HAS_ROPE: tl.constexpr, MAGNITUDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
    scale, eps = tl.load(consts_ptr), tl.load(consts_ptr + 1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    q_ptr += b * sqb + h * sqh
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    km = tl.load(km_ptr + pid_bh * BLOCK_D + offs_d)
    q = _load(q_ptr, offs_n, offs_d, sqn, sqd, N, D, ACC)
    z = scale * tl.sum(q * km[None, :], 1)
    a, _ = _coefs(z, eps, MAGNITUDE)
    out = _rows_times(q_ptr, sqn, sqd, cos_ptr, sin_ptr, kv_ptr + pid_bh * BLOCK_D * BLOCK_D, offs_n, N, D, HAS_ROPE,
                      0, BLOCK_N, BLOCK_D, BLOCK_K, ACC, PREC) * a[:, None]
    if MAGNITUDE:
        vm = tl.load(vm_ptr + pid_bh * BLOCK_D + offs_d)
        out -= z[:, None] * vm[None, :]
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    o_ptr += b * sob + h * soh
    tl.store(o_ptr + offs_n[:, None] * son + offs_d[None, :] * sod, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_terms(q_ptr, q, g, gk, cos_ptr, sin_ptr, km, vm, offs_n, offs_d, scale, eps, sqn, sqd, N, D,
               HAS_ROPE: tl.constexpr, MAGNITUDE: tl.constexpr, ACC: tl.constexpr):
    """Per-query forward quantities and ``dz`` (already times ``scale``) for a block of tokens, given
    their ``q``, ``g`` and ``gk = g kv^T``."""
    z = scale * tl.sum(q * km[None, :], 1)
    qr = q
    if HAS_ROPE:
        qp = _load(q_ptr, offs_n, offs_d ^ 1, sqn, sqd, N, D, ACC)
        qr = _turn(q, qp, cos_ptr, sin_ptr, offs_n, offs_d, N, D, False, ACC)
    a, dadz = _coefs(z, eps, MAGNITUDE)
    dz = dadz * tl.sum(qr * gk, 1)
    if MAGNITUDE:
        dz -= tl.sum(g * vm[None, :], 1)
    return z, qr, a, dz * scale


@triton.jit
def _bwd_summary_kernel(
        q_ptr, g_ptr, cos_ptr, sin_ptr, kv_ptr, km_ptr, vm_ptr, dkv_ptr, dks_ptr, zg_ptr, consts_ptr,
        N, D, NH, CHUNK,
        sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd,
        HAS_ROPE: tl.constexpr, MAGNITUDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh, pid_c = tl.program_id(0), tl.program_id(1)
    scale, eps = tl.load(consts_ptr), tl.load(consts_ptr + 1)
    nchunks = tl.num_programs(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    q_ptr += b * sqb + h * sqh
    g_ptr += b * sgb + h * sgh
    offs_d = tl.arange(0, BLOCK_D)
    # kv^T, so that g @ kvt = g kv^T
    kvt = tl.load(kv_ptr + pid_bh * BLOCK_D * BLOCK_D + offs_d[None, :] * BLOCK_D + offs_d[:, None])
    km = tl.load(km_ptr + pid_bh * BLOCK_D + offs_d)
    vm = tl.load(vm_ptr + pid_bh * BLOCK_D + offs_d)
    dkv = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC)
    dks = tl.zeros((BLOCK_D,), dtype=ACC)
    zg = tl.zeros((BLOCK_D,), dtype=ACC)
    for start in range(pid_c * CHUNK, tl.minimum(pid_c * CHUNK + CHUNK, N), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        q = _load(q_ptr, offs_n, offs_d, sqn, sqd, N, D, ACC)
        g = _load(g_ptr, offs_n, offs_d, sgn, sgd, N, D, ACC)
        gk = _dot(g, kvt, ACC, PREC, False)
        z, qr, a, dz = _row_terms(q_ptr, q, g, gk, cos_ptr, sin_ptr, km, vm, offs_n, offs_d, scale, eps, sqn, sqd,
                                  N, D, HAS_ROPE, MAGNITUDE, ACC)
        dkv += _dot(tl.trans(qr * a[:, None]), g, ACC, PREC, False)
        dks += tl.sum(dz[:, None] * q, 0)
        zg += tl.sum(z[:, None] * g, 0)
    base = pid_bh * nchunks + pid_c
    tl.store(dkv_ptr + base * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :], dkv)
    tl.store(dks_ptr + base * BLOCK_D + offs_d, dks)
    tl.store(zg_ptr + base * BLOCK_D + offs_d, zg)


@triton.jit
def _bwd_rows_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, cos_ptr, sin_ptr, kv_ptr, km_ptr, vm_ptr, dkv_ptr, dks_ptr, zg_ptr,
        dq_ptr, dk_ptr, dv_ptr, consts_ptr,
        N, D, NH,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd,
        sdb, sdh, sdn, sdd,
        HAS_ROPE: tl.constexpr, MAGNITUDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, NEED_Q: tl.constexpr, NEED_KV: tl.constexpr,
):
    pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
    scale, eps = tl.load(consts_ptr), tl.load(consts_ptr + 1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
    mat = pid_bh * BLOCK_D * BLOCK_D
    vec = pid_bh * BLOCK_D + offs_d
    dst = b * sdb + h * sdh + offs_n[:, None] * sdn + offs_d[None, :] * sdd
    if NEED_Q:
        q_ptr += b * sqb + h * sqh
        g_ptr += b * sgb + h * sgh
        km = tl.load(km_ptr + vec)
        vm = tl.load(vm_ptr + vec)
        q = _load(q_ptr, offs_n, offs_d, sqn, sqd, N, D, ACC)
        g = _load(g_ptr, offs_n, offs_d, sgn, sgd, N, D, ACC)
        gk = _rows_times(g_ptr, sgn, sgd, cos_ptr, sin_ptr, kv_ptr + mat, offs_n, N, D, False, 1,
                         BLOCK_N, BLOCK_D, BLOCK_K, ACC, PREC)
        z, qr, a, dz = _row_terms(q_ptr, q, g, gk, cos_ptr, sin_ptr, km, vm, offs_n, offs_d, scale, eps, sqn, sqd,
                                  N, D, HAS_ROPE, MAGNITUDE, ACC)
        dqr = gk * a[:, None]
        if HAS_ROPE:
            dqr_p = _rows_times(g_ptr, sgn, sgd, cos_ptr, sin_ptr, kv_ptr + mat, offs_n, N, D, False, 2,
                                BLOCK_N, BLOCK_D, BLOCK_K, ACC, PREC) * a[:, None]
            dqr = _turn(dqr, dqr_p, cos_ptr, sin_ptr, offs_n, offs_d, N, D, True, ACC)
        dq = dqr + dz[:, None] * km[None, :]
        tl.store(dq_ptr + dst, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    if NEED_KV:
        k_ptr += b * skb + h * skh
        v_ptr += b * svb + h * svh
        w = scale / N
        dkr = _rows_times(v_ptr, svn, svd, cos_ptr, sin_ptr, dkv_ptr + mat, offs_n, N, D, False, 1,
                          BLOCK_N, BLOCK_D, BLOCK_K, ACC, PREC) * w
        if HAS_ROPE:
            dkr_p = _rows_times(v_ptr, svn, svd, cos_ptr, sin_ptr, dkv_ptr + mat, offs_n, N, D, False, 2,
                                BLOCK_N, BLOCK_D, BLOCK_K, ACC, PREC) * w
            dkr = _turn(dkr, dkr_p, cos_ptr, sin_ptr, offs_n, offs_d, N, D, True, ACC)
        dk = dkr + tl.load(dks_ptr + vec)[None, :] / N
        tl.store(dk_ptr + dst, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        dv = _rows_times(k_ptr, skn, skd, cos_ptr, sin_ptr, dkv_ptr + mat, offs_n, N, D, HAS_ROPE, 0,
                         BLOCK_N, BLOCK_D, BLOCK_K, ACC, PREC) * w
        if MAGNITUDE:
            dv -= tl.load(zg_ptr + vec)[None, :] / N
        tl.store(dv_ptr + dst, dv.to(dv_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers

def _num_warps(block_d: int) -> int:
    """Every product is an fp32 FMA loop and the [BD, BD] summaries live in registers: 64-token
    blocks on 4 warps spilled kilobytes in all four kernels on sm_80 and sm_90
    (tools/gpu_readiness.py); 16 tokens on 8 warps do not at BD = 64, nor on 16 warps at BD = 128
    (D = 96) once _out_kernel and _bwd_rows_kernel read their summaries in row blocks
    (``_rows_times``). Still spilling: _bwd_summary_kernel, fp32 at BD = 128 on sm_90."""
    return 8 if block_d <= 64 else 16


def _geometry(q: torch.Tensor):
    B, NH, N, D = q.shape
    block_d = max(16, triton.next_power_of_2(D))
    blocks = triton.cdiv(N, _BLOCK_N)
    nchunks = max(1, min(blocks, _TARGET_PROGRAMS // (B * NH)))
    chunk = triton.cdiv(blocks, nchunks) * _BLOCK_N
    nchunks = triton.cdiv(N, chunk)
    return B, NH, N, D, block_d, blocks, nchunks, chunk


def _consts(scale, eps, acc_torch, device):
    # a pointer rather than float arguments: Triton would round a float scalar to fp32
    return torch.tensor([scale, eps], dtype=acc_torch, device=device)


def _tables(cos, sin, acc_torch):
    if cos is None:
        return None, None
    return cos.to(acc_torch).contiguous(), sin.to(acc_torch).contiguous()


def forward(q, k, v, cos, sin, scale, eps, magnitude_aware) -> Tuple[torch.Tensor, tuple]:
    """Output (q's dtype) and the per-head statistics ``(kv, mean k, mean v)`` (fp32; fp64 for
    fp64), zero-padded to ``[B * heads, BD, BD]`` / ``[B * heads, BD]``, for the backward."""
    B, NH, N, D, bd, blocks, nchunks, chunk = _geometry(q)
    acc, acc_torch = _acc_dtype(q.dtype)
    cos, sin = _tables(cos, sin, acc_torch)
    dev = q.device
    kv = torch.empty((B * NH, nchunks, bd, bd), dtype=acc_torch, device=dev)
    ks = torch.empty((B * NH, nchunks, bd), dtype=acc_torch, device=dev)
    vs = torch.empty((B * NH, nchunks, bd), dtype=acc_torch, device=dev)
    # PREC from the accumulator dtype: every operand is upcast to it on load, so the dots are fp32
    # (fp64) ones, TF32 only where torch would use it for an fp32 matmul
    meta = dict(HAS_ROPE=cos is not None, BLOCK_N=_BLOCK_N, BLOCK_D=bd, ACC=acc, PREC=_precision(acc_torch),
                num_warps=_num_warps(bd))
    _summary_kernel[(B * NH, nchunks)](k, v, cos, sin, kv, ks, vs, N, D, NH, chunk, *k.stride(), *v.stride(), **meta)
    kv = kv.sum(1).mul_(scale / N)
    km, vm = ks.sum(1).div_(N), vs.sum(1).div_(N)
    out = torch.empty(q.shape, dtype=q.dtype, device=dev)
    _out_kernel[(B * NH, blocks)](q, cos, sin, kv, km, vm, out, _consts(scale, eps, acc_torch, dev), N, D, NH,
                                  *q.stride(), *out.stride(), MAGNITUDE=magnitude_aware, BLOCK_K=min(bd, _BLOCK_K),
                                  **meta)
    return out, (kv, km, vm)


def backward(g, q, k, v, cos, sin, stats, scale, eps, magnitude_aware, need_q=True, need_kv=True):
    """``dq, dk, dv`` in the inputs' dtype (None where not needed)."""
    B, NH, N, D, bd, blocks, nchunks, chunk = _geometry(q)
    acc, acc_torch = _acc_dtype(q.dtype)
    cos, sin = _tables(cos, sin, acc_torch)
    kv, km, vm = stats
    dev = q.device
    meta = dict(HAS_ROPE=cos is not None, MAGNITUDE=magnitude_aware, BLOCK_N=_BLOCK_N, BLOCK_D=bd, ACC=acc,
                num_warps=_num_warps(bd), PREC=_precision(acc_torch))
    consts = _consts(scale, eps, acc_torch, dev)
    dkv = dks = zg = None
    if need_kv:
        dkv = torch.empty((B * NH, nchunks, bd, bd), dtype=acc_torch, device=dev)
        dks = torch.empty((B * NH, nchunks, bd), dtype=acc_torch, device=dev)
        zg = torch.empty((B * NH, nchunks, bd), dtype=acc_torch, device=dev)
        _bwd_summary_kernel[(B * NH, nchunks)](q, g, cos, sin, kv, km, vm, dkv, dks, zg, consts, N, D, NH, chunk,
                                               *q.stride(), *g.stride(), **meta)
        dkv, dks, zg = dkv.sum(1), dks.sum(1), zg.sum(1)
    shape = q.shape
    dq = torch.empty(shape, dtype=q.dtype, device=dev) if need_q else None
    dk = torch.empty(shape, dtype=k.dtype, device=dev) if need_kv else None
    dv = torch.empty(shape, dtype=v.dtype, device=dev) if need_kv else None
    # dq / dk / dv share the output strides (all fresh and contiguous)
    _bwd_rows_kernel[(B * NH, blocks)](
        q, k, v, g, cos, sin, kv, km, vm, dkv, dks, zg, dq, dk, dv, consts, N, D, NH,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *(dq if need_q else dk).stride(),
        NEED_Q=need_q, NEED_KV=need_kv, BLOCK_K=min(bd, _BLOCK_K), **meta)
    return dq, dk, dv


# --------------------------------------------------------------------------- custom ops
# The kernels run behind two ``torch.library`` custom ops with fake (shape) and autograd
# registrations, so ``torch.compile`` traces ``linear_attention`` as two opaque nodes (as ``na2d``);
# the same ops run under TRITON_INTERPRET=1 on CPU, where they are tested. Gradients nobody asked
# for come back as empty tensors (custom ops return no None). Autocast is off inside, as the op's
# forward (``__init__``): the backward may run under autocast.

Tensor = torch.Tensor
_NONE = (0,)


@torch.library.custom_op("attnzoo::linear_attention_triton_fwd", mutates_args=())
def _linear_fwd_op(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor], scale: float,
                   eps: float, magnitude_aware: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    with _dispatch.no_autocast(q.device.type):
        out, (kv, km, vm) = forward(q, k, v, cos, sin, scale, eps, magnitude_aware)
    return out, kv, km, vm


@_linear_fwd_op.register_fake
def _(q, k, v, cos, sin, scale, eps, magnitude_aware):
    B, NH, _, D = q.shape
    bd = max(16, triton.next_power_of_2(D))
    acc = _acc_dtype(q.dtype)[1]
    return (q.new_empty(q.shape), q.new_empty((B * NH, bd, bd), dtype=acc), q.new_empty((B * NH, bd), dtype=acc),
            q.new_empty((B * NH, bd), dtype=acc))


@torch.library.custom_op("attnzoo::linear_attention_triton_bwd", mutates_args=())
def _linear_bwd_op(g: Tensor, q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
                   kv: Tensor, km: Tensor, vm: Tensor, scale: float, eps: float, magnitude_aware: bool,
                   need_q: bool, need_kv: bool) -> Tuple[Tensor, Tensor, Tensor]:
    with _dispatch.no_autocast(q.device.type):
        grads = backward(g, q, k, v, cos, sin, (kv, km, vm), scale, eps, magnitude_aware, need_q, need_kv)
    return tuple(q.new_empty(_NONE) if t is None else t for t in grads)


@_linear_bwd_op.register_fake
def _(g, q, k, v, cos, sin, kv, km, vm, scale, eps, magnitude_aware, need_q, need_kv):
    empty = q.new_empty(_NONE)
    return (q.new_empty(q.shape) if need_q else empty, q.new_empty(q.shape, dtype=k.dtype) if need_kv else empty,
            q.new_empty(q.shape, dtype=v.dtype) if need_kv else empty)


def _setup_context(ctx, inputs, output):
    q, k, v, cos, sin, scale, eps, magnitude_aware = inputs
    _, *stats = output
    ctx.mark_non_differentiable(*stats)
    ctx.save_for_backward(q, k, v, cos, sin, *stats)
    ctx.args = (scale, eps, magnitude_aware)


def _backward(ctx, g, *_dstats):
    q, k, v, cos, sin, *stats = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    if not (need_q or need_k or need_v):  # the RoPE tables get no gradient from the fast backends
        return (None,) * 8
    dq, dk, dv = _linear_bwd_op(g, q, k, v, cos, sin, *stats, *ctx.args, need_q, need_k or need_v)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None,
            None, None, None, None, None)


_linear_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_dispatch.register_compile_traceable(__name__)


# --------------------------------------------------------------------------- public

def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: Optional[torch.Tensor],
                     sin: Optional[torch.Tensor], scale: float, eps: float, magnitude_aware: bool) -> torch.Tensor:
    """Same contract as ``reference.linear_attention`` (validated arguments; see ``__init__``)."""
    return _linear_fwd_op(q, k, v, cos, sin, float(scale), float(eps), bool(magnitude_aware))[0]
