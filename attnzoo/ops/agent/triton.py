"""Triton agent attention: fused forward and backward of both stages.

Kernels (one ``(batch * head)`` per program row; ``A`` agents fit one block):

- ``_stage1_fwd`` (grid ``BH``): the agents stream over the keys with an online softmax;
  writes ``V_A`` ``[A, D]`` (fp32) and the log-sum-exp ``[A]`` only.
- ``_stage2_fwd`` (grid ``BH x N-blocks``): a block of queries against all agents; the
  whole softmax row (``A`` entries) lives in registers.
- ``_stage2_bwd`` (same grid): recomputes ``P2`` for its queries, writes ``dQ``, and adds
  its share of ``dA``, ``dV_A`` and ``dB2`` (summed over the batch) with atomics.
- ``_stage1_bwd`` (grid ``BH x M-blocks``): recomputes ``P1`` for its keys from the saved
  log-sum-exp, writes ``dK`` and ``dV``, and adds its share of ``dA`` and ``dB1``.

Neither the ``[A, M]`` nor the ``[N, A]`` probability matrix reaches global memory;
the extra memory is ``V_A``, ``dV_A``, ``dA`` (``[BH, A, D]``, fp32) and the lse ``[BH, A]``.
Products run with fp32 accumulators (fp64 for fp64 inputs); fp32 products take TF32 only where
torch would (``torch.backends.cuda.matmul.allow_tf32``, ``_triton_common.precision``).

Layers, as the other ops: ``@triton.jit`` kernels, host launchers, ``torch.library`` custom ops
(fake and autograd registrations), the public function.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _dispatch
from .._triton_common import acc_dtype as _acc_dtype, dot as _dot, precision as _precision
from .._triton_common import upcast as _upcast

# Rows per block and warps from the sm_80 / sm_90 compile matrix (tools/gpu_readiness.py): the
# [A, rows] softmax terms and the [A, D] agent tiles are live together, and 64-row blocks on 4 warps
# spilled registers in every kernel. The backward halves them at A, D = 64 (``_bwd_rows``); still
# spilling there: the half-precision stage 2 backward on sm_80, which needs the agents split
# across programs.
_BLOCK_N = 32  # queries per program in stage 2 (_WARPS)
_BLOCK_M = 32  # keys per program in the stage 1 backward (_WARPS)
_BLOCK_M_FWD = 16  # keys per step in the stage 1 forward (4 warps)
_WARPS = 8
_MAX_AGENTS = 256
_MAX_D = 256


@triton.jit
def _stage1_fwd(A_ptr, K_ptr, V_ptr, B1_ptr, VA_ptr, LSE_ptr, scale, H, M, NA, D,
                HAS_B1: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    h = bh % H
    ra = tl.arange(0, BLOCK_A)
    rd = tl.arange(0, BLOCK_D)
    rm = tl.arange(0, BLOCK_M)
    a_mask = ra < NA
    d_mask = rd < D
    a = tl.load(A_ptr + bh * NA * D + ra[:, None] * D + rd[None, :], mask=a_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_A], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_A], ACC)
    acc = tl.zeros([BLOCK_A, BLOCK_D], ACC)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + rm
        c_mask = cols < M
        kv_off = bh * M * D + cols[:, None] * D + rd[None, :]
        kv_mask = c_mask[:, None] & d_mask[None, :]
        k = tl.load(K_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V_ptr + kv_off, mask=kv_mask, other=0.0)
        s = _dot(a, tl.trans(k), ACC, PREC, UPCAST) * scale
        if HAS_B1:
            s += tl.load(B1_ptr + h * NA * M + ra[:, None] * M + cols[None, :],
                         mask=a_mask[:, None] & c_mask[None, :], other=0.0).to(ACC)
        s = tl.where(c_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, ACC, PREC, UPCAST)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(VA_ptr + bh * NA * D + ra[:, None] * D + rd[None, :], acc, mask=a_mask[:, None] & d_mask[None, :])
    tl.store(LSE_ptr + bh * NA + ra, m_i + tl.log(l_i), mask=a_mask)


@triton.jit
def _stage2_probs(q, a, B2_ptr, h, rows, r_mask, ra, a_mask, scale, N, NA, HAS_B2: tl.constexpr,
                  ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Softmax over the agents of a block of queries, in registers."""
    s = _dot(q, tl.trans(a), ACC, PREC, UPCAST) * scale
    if HAS_B2:
        s += tl.load(B2_ptr + h * N * NA + rows[:, None] * NA + ra[None, :],
                     mask=r_mask[:, None] & a_mask[None, :], other=0.0).to(ACC)
    s = tl.where(a_mask[None, :], s, float("-inf"))
    p = tl.exp(s - tl.max(s, 1)[:, None])
    return p / tl.sum(p, 1)[:, None]


@triton.jit
def _stage2_fwd(Q_ptr, A_ptr, VA_ptr, B2_ptr, O_ptr, scale, H, N, NA, D,
                HAS_B2: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    h = bh % H
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ra = tl.arange(0, BLOCK_A)
    rd = tl.arange(0, BLOCK_D)
    r_mask, a_mask, d_mask = rows < N, ra < NA, rd < D
    q_off = bh * N * D + rows[:, None] * D + rd[None, :]
    q_mask = r_mask[:, None] & d_mask[None, :]
    ad_off = bh * NA * D + ra[:, None] * D + rd[None, :]
    ad_mask = a_mask[:, None] & d_mask[None, :]
    q = tl.load(Q_ptr + q_off, mask=q_mask, other=0.0)
    a = tl.load(A_ptr + ad_off, mask=ad_mask, other=0.0)
    va = tl.load(VA_ptr + ad_off, mask=ad_mask, other=0.0)
    p = _stage2_probs(q, a, B2_ptr, h, rows, r_mask, ra, a_mask, scale, N, NA, HAS_B2, ACC, PREC, UPCAST)
    out = _dot(p, va, ACC, PREC, UPCAST)
    tl.store(O_ptr + q_off, out.to(O_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _stage2_bwd(Q_ptr, A_ptr, VA_ptr, B2_ptr, DO_ptr, DQ_ptr, DA_ptr, DVA_ptr, DB2_ptr, scale, H, N, NA, D,
                HAS_B2: tl.constexpr, NEED_B2: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    h = bh % H
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ra = tl.arange(0, BLOCK_A)
    rd = tl.arange(0, BLOCK_D)
    r_mask, a_mask, d_mask = rows < N, ra < NA, rd < D
    q_off = bh * N * D + rows[:, None] * D + rd[None, :]
    q_mask = r_mask[:, None] & d_mask[None, :]
    ad_off = bh * NA * D + ra[:, None] * D + rd[None, :]
    ad_mask = a_mask[:, None] & d_mask[None, :]
    q = tl.load(Q_ptr + q_off, mask=q_mask, other=0.0)
    a = tl.load(A_ptr + ad_off, mask=ad_mask, other=0.0)
    va = tl.load(VA_ptr + ad_off, mask=ad_mask, other=0.0)
    do = tl.load(DO_ptr + q_off, mask=q_mask, other=0.0).to(ACC)
    p = _stage2_probs(q, a, B2_ptr, h, rows, r_mask, ra, a_mask, scale, N, NA, HAS_B2, ACC, PREC, UPCAST)
    p = tl.where(r_mask[:, None], p, 0.0)  # rows past N add nothing to dV_A / dA / dB2
    dp = _dot(do, tl.trans(va), ACC, PREC, UPCAST)
    ds = p * (dp - tl.sum(p * dp, 1)[:, None])
    dq = _dot(ds.to(a.dtype), a, ACC, PREC, UPCAST) * scale
    tl.store(DQ_ptr + q_off, dq.to(DQ_ptr.dtype.element_ty), mask=q_mask)
    tl.atomic_add(DA_ptr + ad_off, _dot(tl.trans(ds).to(q.dtype), q, ACC, PREC, UPCAST) * scale,
                  mask=ad_mask)
    tl.atomic_add(DVA_ptr + ad_off, _dot(tl.trans(p), do, ACC, PREC, UPCAST), mask=ad_mask)
    if NEED_B2:
        tl.atomic_add(DB2_ptr + h * N * NA + rows[:, None] * NA + ra[None, :], ds,
                      mask=r_mask[:, None] & a_mask[None, :])


@triton.jit
def _stage1_bwd(A_ptr, K_ptr, V_ptr, B1_ptr, VA_ptr, LSE_ptr, DVA_ptr, DK_ptr, DV_ptr, DA_ptr, DB1_ptr,
                scale, H, M, NA, D, HAS_B1: tl.constexpr, NEED_B1: tl.constexpr, BLOCK_A: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    h = bh % H
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ra = tl.arange(0, BLOCK_A)
    rd = tl.arange(0, BLOCK_D)
    c_mask, a_mask, d_mask = cols < M, ra < NA, rd < D
    ad_off = bh * NA * D + ra[:, None] * D + rd[None, :]
    ad_mask = a_mask[:, None] & d_mask[None, :]
    kv_off = bh * M * D + cols[:, None] * D + rd[None, :]
    kv_mask = c_mask[:, None] & d_mask[None, :]
    a = tl.load(A_ptr + ad_off, mask=ad_mask, other=0.0)
    va = tl.load(VA_ptr + ad_off, mask=ad_mask, other=0.0)
    dva = tl.load(DVA_ptr + ad_off, mask=ad_mask, other=0.0)
    lse = tl.load(LSE_ptr + bh * NA + ra, mask=a_mask, other=0.0)
    k = tl.load(K_ptr + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V_ptr + kv_off, mask=kv_mask, other=0.0)
    s = _dot(a, tl.trans(k), ACC, PREC, UPCAST) * scale
    if HAS_B1:
        s += tl.load(B1_ptr + h * NA * M + ra[:, None] * M + cols[None, :],
                     mask=a_mask[:, None] & c_mask[None, :], other=0.0).to(ACC)
    p = tl.where(a_mask[:, None] & c_mask[None, :], tl.exp(s - lse[:, None]), 0.0)
    delta = tl.sum(dva * va, 1)  # rowsum(dP1 * P1) = rowsum(dV_A * V_A)
    dv = _dot(tl.trans(p), dva, ACC, PREC, UPCAST)
    tl.store(DV_ptr + kv_off, dv.to(DV_ptr.dtype.element_ty), mask=kv_mask)
    dp = _dot(dva, tl.trans(v.to(ACC)), ACC, PREC, UPCAST)
    ds = p * (dp - delta[:, None])
    dk = _dot(tl.trans(ds).to(a.dtype), a, ACC, PREC, UPCAST) * scale
    tl.store(DK_ptr + kv_off, dk.to(DK_ptr.dtype.element_ty), mask=kv_mask)
    tl.atomic_add(DA_ptr + ad_off, _dot(ds.to(k.dtype), k, ACC, PREC, UPCAST) * scale, mask=ad_mask)
    if NEED_B1:
        tl.atomic_add(DB1_ptr + h * NA * M + ra[:, None] * M + cols[None, :], ds,
                      mask=a_mask[:, None] & c_mask[None, :])


def _blocks(A: int, D: int):
    return max(16, triton.next_power_of_2(A)), max(16, triton.next_power_of_2(D))


# --------------------------------------------------------------------------- launchers

def _bwd_rows(rows: int, block_a: int, block_d: int) -> int:
    """Rows per backward program: at most 16 once the [A, D] agent tiles reach 64 x 64 (A = 49 in
    Agent-PVT), where 32 rows spilled 172-700 bytes in both half-precision backward kernels."""
    return min(rows, 16) if block_a * block_d >= 64 * 64 else rows


def _consts(dtype: torch.dtype) -> dict:
    # PREC from the accumulator dtype: V_A, dV_A and the softmax terms are fp32 operands even for
    # half inputs, and take TF32 only where torch would for an fp32 matmul
    acc, acc_torch = _acc_dtype(dtype)
    return dict(ACC=acc, PREC=_precision(acc_torch), UPCAST=_upcast(dtype))


def _operands(q, k, v, agent_tokens, agent_bias, query_bias):
    q, k, v, a = (t.contiguous() for t in (q, k, v, agent_tokens))
    b1 = agent_bias.contiguous() if agent_bias is not None else q  # dummy pointer when absent
    b2 = query_bias.contiguous() if query_bias is not None else q
    return q, k, v, a, b1, b2


def forward(q, k, v, agent_tokens, agent_bias, query_bias, scale):
    """Output (q's dtype), ``V_A`` ``[B * heads, A, D]`` and the stage-1 log-sum-exp ``[B * heads, A]``
    (fp32; fp64 for fp64)."""
    B, H, N, D = q.shape
    M, A = k.shape[2], agent_tokens.shape[2]
    q, k, v, a, b1, b2 = _operands(q, k, v, agent_tokens, agent_bias, query_bias)
    BA, BD = _blocks(A, D)
    acc = _acc_dtype(q.dtype)[1]
    va = torch.empty(B * H, A, D, device=q.device, dtype=acc)
    lse = torch.empty(B * H, A, device=q.device, dtype=acc)
    out = torch.empty_like(q)
    consts = _consts(q.dtype)
    _stage1_fwd[(B * H,)](a, k, v, b1, va, lse, scale, H, M, A, D, HAS_B1=agent_bias is not None,
                          BLOCK_A=BA, BLOCK_M=_BLOCK_M_FWD, BLOCK_D=BD, **consts)
    _stage2_fwd[(B * H, triton.cdiv(N, _BLOCK_N))](q, a, va, b2, out, scale, H, N, A, D,
                                                   HAS_B2=query_bias is not None, BLOCK_A=BA,
                                                   BLOCK_N=_BLOCK_N, BLOCK_D=BD, num_warps=_WARPS, **consts)
    return out, va, lse


def backward(dout, q, k, v, agent_tokens, agent_bias, query_bias, va, lse, scale, need_b1, need_b2):
    """``dq, dk, dv, d(agent_tokens)`` in the inputs' dtype and the biases' gradients (None where
    absent or not needed)."""
    B, H, N, D = q.shape
    M, A = k.shape[2], agent_tokens.shape[2]
    q, k, v, a, b1, b2 = _operands(q, k, v, agent_tokens, agent_bias, query_bias)
    BA, BD = _blocks(A, D)
    acc = _acc_dtype(q.dtype)[1]
    need_b1 = agent_bias is not None and need_b1
    need_b2 = query_bias is not None and need_b2
    dout = dout.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    da = torch.zeros(B * H, A, D, device=q.device, dtype=acc)
    dva = torch.zeros(B * H, A, D, device=q.device, dtype=acc)
    db1 = torch.zeros(H, A, M, device=q.device, dtype=acc) if need_b1 else da
    db2 = torch.zeros(H, N, A, device=q.device, dtype=acc) if need_b2 else da
    consts = _consts(q.dtype)
    bn, bm = _bwd_rows(_BLOCK_N, BA, BD), _bwd_rows(_BLOCK_M, BA, BD)
    _stage2_bwd[(B * H, triton.cdiv(N, bn))](
        q, a, va, b2, dout, dq, da, dva, db2, scale, H, N, A, D, HAS_B2=query_bias is not None, NEED_B2=need_b2,
        BLOCK_A=BA, BLOCK_N=bn, BLOCK_D=BD, num_warps=_WARPS, **consts)
    _stage1_bwd[(B * H, triton.cdiv(M, bm))](
        a, k, v, b1, va, lse, dva, dk, dv, da, db1, scale, H, M, A, D, HAS_B1=agent_bias is not None,
        NEED_B1=need_b1, BLOCK_A=BA, BLOCK_M=bm, BLOCK_D=BD, num_warps=_WARPS, **consts)
    da = da.view(B, H, A, D).to(q.dtype)
    return dq, dk, dv, da, db1.to(b1.dtype) if need_b1 else None, db2.to(b2.dtype) if need_b2 else None


# --------------------------------------------------------------------------- custom ops
# The kernels run behind two ``torch.library`` custom ops with fake (shape) and autograd
# registrations, so ``torch.compile`` traces ``agent_attention`` as two opaque nodes (as ``na2d``);
# the same ops run under TRITON_INTERPRET=1 on CPU, where they are tested. Gradients nobody
# asked for come back as empty tensors (custom ops return no None). Autocast is off inside,
# as the op's forward (``__init__``): the backward may run under autocast.

Tensor = torch.Tensor
_NONE = (0,)


@torch.library.custom_op("attnzoo::agent_triton_fwd", mutates_args=())
def _agent_fwd_op(q: Tensor, k: Tensor, v: Tensor, agent_tokens: Tensor, agent_bias: Optional[Tensor],
                  query_bias: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    with _dispatch.no_autocast(q.device.type):
        return forward(q, k, v, agent_tokens, agent_bias, query_bias, scale)


@_agent_fwd_op.register_fake
def _(q, k, v, agent_tokens, agent_bias, query_bias, scale):
    B, H, _, D = q.shape
    A = agent_tokens.shape[2]
    acc = _acc_dtype(q.dtype)[1]
    return q.new_empty(q.shape), q.new_empty((B * H, A, D), dtype=acc), q.new_empty((B * H, A), dtype=acc)


@torch.library.custom_op("attnzoo::agent_triton_bwd", mutates_args=())
def _agent_bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, agent_tokens: Tensor, agent_bias: Optional[Tensor],
                  query_bias: Optional[Tensor], va: Tensor, lse: Tensor, scale: float, need_b1: bool,
                  need_b2: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _dispatch.no_autocast(q.device.type):
        grads = backward(dout, q, k, v, agent_tokens, agent_bias, query_bias, va, lse, scale, need_b1, need_b2)
    return tuple(q.new_empty(_NONE) if g is None else g for g in grads)


@_agent_bwd_op.register_fake
def _(dout, q, k, v, agent_tokens, agent_bias, query_bias, va, lse, scale, need_b1, need_b2):
    empty = q.new_empty(_NONE)
    db1 = agent_bias.new_empty(agent_bias.shape) if agent_bias is not None and need_b1 else empty
    db2 = query_bias.new_empty(query_bias.shape) if query_bias is not None and need_b2 else empty
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            agent_tokens.new_empty(agent_tokens.shape, dtype=q.dtype), db1, db2)


def _setup_context(ctx, inputs, output):
    q, k, v, agent_tokens, agent_bias, query_bias, scale = inputs
    out, va, lse = output
    ctx.mark_non_differentiable(va, lse)
    ctx.save_for_backward(q, k, v, agent_tokens, agent_bias, query_bias, va, lse)
    ctx.scale = scale


def _backward(ctx, dout, _dva, _dlse):
    q, k, v, a, b1, b2, va, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = _agent_bwd_op(dout, q, k, v, a, b1, b2, va, lse, ctx.scale, need[4], need[5])
    return (*(g if n else None for g, n in zip(grads, need[:6])), None)


_agent_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_dispatch.register_compile_traceable(__name__)


# --------------------------------------------------------------------------- public

def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agent_tokens: torch.Tensor,
                    agent_bias: Optional[torch.Tensor], query_bias: Optional[torch.Tensor],
                    scale: float) -> torch.Tensor:
    """Same arguments and result as ``reference.agent_attention``; ``A <= 256``, ``D <= 256``."""
    A, D = agent_tokens.shape[2], q.shape[3]
    if A > _MAX_AGENTS or D > _MAX_D:
        raise ValueError(f"agent_attention (triton): at most {_MAX_AGENTS} agents and head dim {_MAX_D}, "
                         f"got agent_tokens {tuple(agent_tokens.shape)} and q {tuple(q.shape)}")
    return _agent_fwd_op(q, k, v, agent_tokens, agent_bias, query_bias, float(scale))[0]
