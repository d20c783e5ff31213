"""Readable agent attention: two plain softmax attentions through the agent tokens.

The oracle of the other backends; plain differentiable torch with no data-dependent
control flow, so it also serves ONNX export and ``torch.compile`` tracing.
"""
from typing import Optional

import torch


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agent_tokens: torch.Tensor,
                    agent_bias: Optional[torch.Tensor], query_bias: Optional[torch.Tensor],
                    scale: float) -> torch.Tensor:
    """q ``[B, h, N, D]``, k / v ``[B, h, M, D]``, agent_tokens ``[B, h, A, D]``,
    agent_bias ``[h, A, M]``, query_bias ``[h, N, A]`` (either may be None)."""
    # 1) the agents gather the values: V_A = softmax(A K^T s + B1) V
    logits = (agent_tokens * scale) @ k.transpose(-2, -1)
    if agent_bias is not None:
        logits = logits + agent_bias
    agent_v = logits.softmax(dim=-1) @ v
    # 2) the queries read the agents: out = softmax(Q A^T s + B2) V_A
    logits = (q * scale) @ agent_tokens.transpose(-2, -1)
    if query_bias is not None:
        logits = logits + query_bias
    return logits.softmax(dim=-1) @ agent_v
