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

Autocast: the attention ops' one policy (``ops._checks.autocast_inputs``): under autocast the
inputs, biases included, are cast to its dtype and the backend runs with autocast off, forward
and backward (half inputs accumulate in fp32).
"""
from typing import Optional

import torch

from .. import _checks, _dispatch
from . import cpu, reference

__all__ = ["agent_attention", "BACKENDS"]

BACKENDS = _dispatch.standard_backends(reference, cpu, __name__ + ".triton")


def _validate(q, k, v, agent_tokens, agent_bias, query_bias, scale) -> float:
    op = "agent_attention"
    _checks.check_qkv(op, q, k, v, "[B, heads, tokens, D]", same_shape=False)
    if not isinstance(agent_tokens, torch.Tensor) or agent_tokens.dim() != 4:
        raise ValueError(f"{op}: agent_tokens must be a [B, heads, A, D] tensor, got {_checks.shape_of(agent_tokens)}")
    B, heads, N, D = q.shape
    A = agent_tokens.shape[2]
    if k.shape != v.shape or k.shape[:2] != (B, heads) or k.shape[3] != D:
        raise ValueError(f"{op}: k and v must be [B, heads, M, D] = [{B}, {heads}, M, {D}] like q {tuple(q.shape)}, "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    M = k.shape[2]
    if agent_tokens.shape != (B, heads, A, D) or A == 0:
        raise ValueError(f"{op}: agent_tokens must be [B, heads, A, D] = [{B}, {heads}, A >= 1, {D}] like q "
                         f"{tuple(q.shape)}, got {tuple(agent_tokens.shape)}")
    if agent_tokens.dtype != q.dtype or agent_tokens.device != q.device:
        raise ValueError(f"{op}: agent_tokens must be {q.dtype} on {q.device} like q, "
                         f"got {agent_tokens.dtype} on {agent_tokens.device}")
    for name, t, expect, layout in (("agent_bias", agent_bias, (heads, A, M), "[heads, A, M]"),
                                    ("query_bias", query_bias, (heads, N, A), "[heads, N, A]")):
        if t is not None:
            _checks.check_bias(op, name, t, q, expect, layout, f", k {tuple(k.shape)} and {A} agents")
    return _checks.check_scale(op, scale, D ** -0.5)


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

    Returns ``[B, heads, N, D]`` in q's dtype (the autocast dtype under autocast). Every input
    (biases included) is differentiable.
    """
    (q, k, v, agent_tokens, agent_bias, query_bias), no_autocast = _checks.autocast_inputs(
        q, k, v, agent_tokens, agent_bias, query_bias)
    scale = _validate(q, k, v, agent_tokens, agent_bias, query_bias, scale)
    tensors = [t for t in (q, k, v, agent_tokens, agent_bias, query_bias) if t is not None]
    chosen = _dispatch.choose_backend("agent_attention", BACKENDS, tensors, backend)
    with no_autocast:
        return chosen.impl.agent_attention(q, k, v, agent_tokens, agent_bias, query_bias, scale)
