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
from typing import Optional, Sequence, Tuple, Union

import torch

from .. import _dispatch
from .._dispatch import no_autocast
from . import cpu, reference

__all__ = ["bra", "BACKENDS"]

BACKENDS = _dispatch.standard_backends(reference, cpu, __name__ + ".triton")


def _regions(value) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        out = (value, value)
    else:
        try:
            out = tuple(value)
        except TypeError:
            out = ()
    if len(out) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in out):
        raise ValueError(f"bra: num_regions must be an int >= 1 or a pair of them, got {value!r}")
    return out


def _validate(q, k, v, num_regions, topk, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"bra: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 5:
            raise ValueError(f"bra: {name} must be [B, H, W, heads, D], got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"bra: q, k, v must have the same shape, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"bra: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"bra: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.numel() == 0:
        raise ValueError(f"bra: got empty inputs of shape {tuple(q.shape)}")
    nr = _regions(num_regions)
    nR = nr[0] * nr[1]
    if isinstance(topk, bool) or not isinstance(topk, int) or not (topk == -1 or topk >= 1):
        raise ValueError(f"bra: topk must be -1 (dense) or >= 1, got {topk!r}")
    topk = nR if topk == -1 else min(topk, nR)
    if scale is None:
        scale = (q.shape[-2] * q.shape[-1]) ** -0.5  # official: qk_dim ** -0.5 over all heads
    return nr, topk, float(scale)


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
    are accumulated in fp32; autocast is off inside the op (as ``attnzoo.ops.linear``), so
    under ``torch.autocast`` the routing and the attention run in the inputs' dtype.
    """
    nr, topk, scale = _validate(q, k, v, num_regions, topk, scale)
    chosen = _dispatch.choose_backend("bra", BACKENDS, [q, k, v], backend)
    # autocast would round the routing matmul (and the reference's einsums) to bf16 / fp16 and
    # change which regions are chosen; the backends' own backward disables it likewise
    with no_autocast(q.device.type):
        idx = reference.route(q, k, nr, topk)
        out = chosen.impl.bra(q, k, v, idx, nr, scale)
    return (out, idx) if return_index else out
