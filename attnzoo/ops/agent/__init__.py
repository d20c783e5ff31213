"""Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and
Linear Attention", ECCV 2024, https://arxiv.org/abs/2312.08874).

A small set of ``A`` agent tokens (pooled from the queries by the layer) first
gathers the values with one softmax attention, then every query reads the agents
with a second one::

    V_A = softmax(A K^T s + B1) V          B1 = agent_bias [heads, A, M]
    out = softmax(Q A^T s + B2) V_A        B2 = query_bias [heads, N, A]

Global at ``O(N A)`` cost. The layer (``attnzoo.layers.agent``) builds the agents,
the biases and adds the depthwise-conv term; see ``README.md`` here for the maths.

Backends (``backend=`` or ``$ATTNZOO_BACKEND``; default: the best that can run):

- ``reference``: two plain softmax attentions (``reference.py``), the oracle.
- ``cpu``: batched GEMMs with a hand-written backward (``cpu.py``).
- ``triton``: fused forward and backward kernels (``triton.py``, CUDA); neither
  ``[N, A]`` nor ``[A, N]`` probability matrix reaches global memory.

Autocast, as ``ops.linear``: the op sets its own precision. Every backend runs with autocast
off, forward and backward, in the inputs' dtype (half inputs accumulate in fp32), and returns
that dtype; under autocast the layer hands it the dtype its projections produced.
"""
from typing import Optional

import torch

from .. import _dispatch
from . import cpu, reference

__all__ = ["agent_attention", "BACKENDS"]

BACKENDS = _dispatch.standard_backends(reference, cpu, __name__ + ".triton")


def _validate(q, k, v, agent_tokens, agent_bias, query_bias, scale) -> float:
    op = "agent_attention"
    for name, t in (("q", q), ("k", k), ("v", v), ("agent_tokens", agent_tokens)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a [B, heads, tokens, D] tensor, got {got}")
    B, heads, N, D = q.shape
    M, A = k.shape[2], agent_tokens.shape[2]
    if k.shape != v.shape or k.shape[:2] != (B, heads) or k.shape[3] != D:
        raise ValueError(f"{op}: k and v must be [B, heads, M, D] = [{B}, {heads}, M, {D}] like q {tuple(q.shape)}, "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if agent_tokens.shape != (B, heads, A, D):
        raise ValueError(f"{op}: agent_tokens must be [B, heads, A, D] = [{B}, {heads}, A, {D}] like q "
                         f"{tuple(q.shape)}, got {tuple(agent_tokens.shape)}")
    if min(N, M, A, D) == 0:
        raise ValueError(f"{op}: empty inputs: q {tuple(q.shape)}, k {tuple(k.shape)}, agents {A}")
    tensors = (q, k, v, agent_tokens)
    if len({t.dtype for t in tensors}) != 1 or not q.is_floating_point():
        raise ValueError(f"{op}: q, k, v, agent_tokens must share one floating dtype, got "
                         f"{[t.dtype for t in tensors]}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{op}: q, k, v, agent_tokens must be on one device, got {[t.device for t in tensors]}")
    for name, t, expect, layout in (("agent_bias", agent_bias, (heads, A, M), "[heads, A, M]"),
                                    ("query_bias", query_bias, (heads, N, A), "[heads, N, A]")):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expect:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be {layout} = {expect} for q {tuple(q.shape)}, k {tuple(k.shape)} "
                             f"and {A} agents, got {got}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{op}: {name} must be {q.dtype} on {q.device} like q, got {t.dtype} on {t.device}")
    return float(D ** -0.5 if scale is None else scale)


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agent_tokens: torch.Tensor,
                    agent_bias: Optional[torch.Tensor] = None, query_bias: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Agent attention.

    Args:
        q: queries ``[B, heads, N, D]``.
        k, v: keys and values ``[B, heads, M, D]`` (``M != N`` after a spatial reduction).
        agent_tokens: ``[B, heads, A, D]``.
        agent_bias: ``B1`` ``[heads, A, M]`` added to the agent-to-key logits, or None.
        query_bias: ``B2`` ``[heads, N, A]`` added to the query-to-agent logits, or None.
        scale: logit scale ``s`` of both stages, default ``D ** -0.5``.
        backend: ``"reference" | "cpu" | "triton"``; default: the best that can run.

    Returns ``[B, heads, N, D]`` in q's dtype, also under autocast. Every input (biases
    included) is differentiable.
    """
    scale = _validate(q, k, v, agent_tokens, agent_bias, query_bias, scale)
    tensors = [t for t in (q, k, v, agent_tokens, agent_bias, query_bias) if t is not None]
    chosen = _dispatch.choose_backend("agent_attention", BACKENDS, tensors, backend)
    # autocast would round the GEMMs' results to bf16 / fp16 between the two stages and leave
    # the saved tensors in another dtype than the backward's inputs
    with _dispatch.no_autocast(q.device.type):
        return chosen.impl.agent_attention(q, k, v, agent_tokens, agent_bias, query_bias, scale)
