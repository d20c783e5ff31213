"""CPU agent attention: both stages as batched GEMMs with a hand-written backward.

Against the eager formulation (official code) it saves the work autograd cannot:
the scale is folded into the small agent matrix once (not into Q), the biases are
added in place and broadcast over the batch instead of ``repeat``-ed (their
gradient is one sum over the batch), both softmax backwards run in place with
their row sums taken over ``D`` (``rowsum(dP * P) = rowsum(dO * O)``, as in
FlashAttention) instead of over the softmax axis, and gradients nobody asked
for are skipped.
The two probability matrices ``[B, h, A, M]`` and ``[B, h, N, A]`` are the only
saved activations besides the inputs, ``V_A`` and the output.

Half inputs are computed in fp32 and the results cast back (as the Triton kernels'
accumulators and ``ops.linear``): each softmax backward subtracts two ~1 terms,
``dP - rowsum(dP * P)``, whose bf16 roundings swamp a small gradient; fp64 stays fp64.
"""
from typing import Optional

import torch

from .. import _dispatch


class _AgentAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, agent_tokens, agent_bias, query_bias, scale):
        ctx.dtype = q.dtype
        compute = torch.promote_types(q.dtype, torch.float32)
        q, k, v, agent_tokens, agent_bias, query_bias = (
            t.to(compute) if t is not None else None for t in (q, k, v, agent_tokens, agent_bias, query_bias))
        a = agent_tokens * scale  # [B, h, A, D]: scaling the agents scales both stages' logits
        logits = torch.matmul(a, k.transpose(-2, -1))
        if agent_bias is not None:
            logits.add_(agent_bias)
        p1 = torch.softmax(logits, dim=-1)
        del logits
        agent_v = torch.matmul(p1, v)
        logits = torch.matmul(q, a.transpose(-2, -1))
        if query_bias is not None:
            logits.add_(query_bias)
        p2 = torch.softmax(logits, dim=-1)
        del logits
        out = torch.matmul(p2, agent_v)
        ctx.save_for_backward(q, k, v, a, p1, p2, agent_v, out)
        ctx.scale = scale
        ctx.has_bias = (agent_bias is not None, query_bias is not None)
        return out.to(ctx.dtype)

    @staticmethod
    def backward(ctx, dout):
        # the op's precision, as in the forward (``__init__``): backward may run under autocast
        with _dispatch.no_autocast(dout.device.type):
            return _AgentAttention._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        q, k, v, a, p1, p2, agent_v, out = ctx.saved_tensors
        need_q, need_k, need_v, need_a, need_b1, need_b2, _ = ctx.needs_input_grad
        dq = dk = dv = da = db1 = db2 = None
        dout = dout.to(q.dtype).contiguous()
        # stage 2: out = P2 V_A, P2 = softmax(Q A_s^T + B2)
        d_agent_v = torch.matmul(p2.transpose(-2, -1), dout)
        if need_q or need_a or need_b2:
            # softmax backward in place: dS = P * (dP - rowsum(dP * P)), rowsum(dP2 * P2) = rowsum(dO * out)
            delta = (dout * out).sum(-1, keepdim=True)
            ds2 = torch.matmul(dout, agent_v.transpose(-2, -1)).sub_(delta).mul_(p2)
            if need_q:
                dq = torch.matmul(ds2, a)
            if need_a:
                da = torch.matmul(ds2.transpose(-2, -1), q)
            if need_b2 and ctx.has_bias[1]:
                db2 = ds2.sum(0)
            del ds2
        # stage 1: V_A = P1 V, P1 = softmax(A_s K^T + B1)
        if need_v:
            dv = torch.matmul(p1.transpose(-2, -1), d_agent_v)
        if need_k or need_a or need_b1:
            delta = (d_agent_v * agent_v).sum(-1, keepdim=True)  # = rowsum(dP1 * P1), over D not M
            ds1 = torch.matmul(d_agent_v, v.transpose(-2, -1)).sub_(delta).mul_(p1)
            if need_k:
                dk = torch.matmul(ds1.transpose(-2, -1), a)
            if need_a:
                da = da + torch.matmul(ds1, k)
            if need_b1 and ctx.has_bias[0]:
                db1 = ds1.sum(0)
        if da is not None:
            da = da * ctx.scale  # A_s = A * scale
        grads = (t.to(ctx.dtype) if t is not None else None for t in (dq, dk, dv, da, db1, db2))
        return (*grads, None)


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agent_tokens: torch.Tensor,
                    agent_bias: Optional[torch.Tensor], query_bias: Optional[torch.Tensor],
                    scale: float) -> torch.Tensor:
    """Same arguments and result as ``reference.agent_attention``."""
    return _AgentAttention.apply(q, k, v, agent_tokens, agent_bias, query_bias, scale)
