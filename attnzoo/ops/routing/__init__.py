"""Bi-level routing attention (BRA, BiFormer: Zhu et al., CVPR 2023).

The map is cut into ``num_regions x num_regions`` regions. Region-mean q and k give a
region affinity; every query region keeps its ``topk`` most affine key regions
(routing, not differentiated, as in the official code), and each of its queries
attends the union of those regions' tokens. Sizes that are not multiples of the grid
are zero-padded at the bottom / right (the official ``auto_pad``) and cropped back,
with the padded tokens masked out of the region means and of the attention. See
``README.md`` in this folder for the maths.

Backends (``backend=`` or ``$ATTNZOO_BACKEND``; default: the best that can run):

- ``reference``: the official ``expand`` + ``gather`` (``topk`` copies of K/V), the oracle.
- ``cpu``: chunked index_select + fused flash attention with its own backward that
  ``index_add_``s dK/dV; never holds the ``topk`` copies (``cpu.py``).
- ``triton``: block-sparse flash forward / backward kernels that read each selected
  K/V region through the routing index (``triton.py``, CUDA). Imported only when chosen.

Routing (``reference.route``) runs once here, so every backend attends the same
regions; each backend module exposes ``bra(q, k, v, idx, num_regions, scale)``.
"""
from typing import Optional, Sequence, Union

import torch

from .. import _checks, _dispatch
from . import cpu, reference

__all__ = ["bra", "BACKENDS"]

BACKENDS = _dispatch.standard_backends(reference, cpu, __name__ + ".triton")


def _validate(q, k, v, num_regions, topk, scale):
    _checks.check_qkv("bra", q, k, v, "[B, H, W, heads, D]")
    nr = _checks.as_pair("bra", "num_regions", num_regions, minimum=1)
    nR = nr[0] * nr[1]
    if isinstance(topk, bool) or not isinstance(topk, int) or not (topk == -1 or topk >= 1):
        raise ValueError(f"bra: topk must be -1 (dense) or >= 1, got {topk!r}")
    topk = nR if topk == -1 else min(topk, nR)
    # official: qk_dim ** -0.5 over all heads
    return nr, topk, _checks.check_scale("bra", scale, (q.shape[-2] * q.shape[-1]) ** -0.5)


def bra(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_regions: Union[int, Sequence[int]], topk: int,
        scale: Optional[float] = None, backend: Optional[str] = None, return_index: bool = False):
    """Bi-level routing attention.

    Args:
        q, k, v: ``[B, H, W, heads, D]`` (any strides).
        num_regions: regions per side (official ``n_win``), int or ``(nh, nw)``; a grid larger
            than the map leaves whole regions of padding, which are never preferred.
        topk: key regions per query region; ``-1`` or ``>= nh * nw``: dense attention.
        scale: logit scale, default ``(heads * D) ** -0.5`` (the official ``qk_dim ** -0.5``).
        backend: ``"reference" | "cpu" | "triton"``; default: the best that can run.
        return_index: also return the routing ``[B, nh * nw, topk]`` (row-major region ids).

    Returns ``[B, H, W, heads, D]`` in q's dtype, and the routing index if asked. Half inputs
    are accumulated in fp32. Under autocast q, k, v are cast to its dtype first and the routing
    and the attention run in it (``ops._checks.autocast_inputs``, every attention op's policy).
    """
    (q, k, v), no_autocast = _checks.autocast_inputs(q, k, v)
    nr, topk, scale = _validate(q, k, v, num_regions, topk, scale)
    chosen = _dispatch.choose_backend("bra", BACKENDS, [q, k, v], backend)
    # the routing matmul too runs with autocast off, in the inputs' dtype, so every backend
    # attends the same regions; the backends' own backward disables autocast likewise
    with no_autocast:
        idx = reference.route(q, k, nr, topk)
        out = chosen.impl.bra(q, k, v, idx, nr, scale)
    return (out, idx) if return_index else out
