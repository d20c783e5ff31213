"""Neighborhood attention (NAT, Hassani et al. 2023), dilated (DiNAT) and strided (GNA).

Every query attends the ``kernel_size`` keys around it inside its dilation sub-grid;
windows are clamped inside the map at the borders (NATTEN semantics), and with a
stride every query of an ``s x s`` group uses the window of the group's centre query.
An optional relative positional bias ``rpb`` ``[heads, 2k-1, 2k-1]`` is added to the
logits (NATTEN <= 0.17 indexing, so NAT / DiNAT checkpoints keep their meaning) and is
differentiable. See ``README.md`` in this folder for the exact semantics and the maths.

Backends (``backend=`` or ``$ATTNZOO_BACKEND``; default: the best that can run):

- ``reference``: brute-force gather of every neighborhood (``reference.py``), the oracle.
- ``cpu``: tiled attention over zero-copy key halos with its own backward (``cpu.py``).
- ``triton``: fused flash-style forward and backward kernels (``triton.py``, CUDA); the
  ``[N, k^2]`` attention matrix never reaches global memory. Imported only when chosen.

Every backend module exposes ``na2d(q, k, v, kernel_size, dilation, stride, rpb, scale,
border, rel_h, rel_w, query_stride)`` with validated arguments and per-axis tuples, and implements all of
it (HaloNet's ``border="zero_pad"`` and per-query ``rel_h`` / ``rel_w`` included), so the
dispatch chooses by device alone; 1-D attention runs as 2-D (see ``na1d``). One exception:
the Triton kernels have no query stride, and their ``can_run`` says so.

Autocast: like ``torch.amp.custom_fwd(cast_inputs=...)``, the op casts its floating
(non-float64) inputs once to the autocast dtype and runs the backend with autocast off, so
every backend sees one dtype in its forward and backward and returns that dtype; gradients
flow back to the callers' dtypes through the casts.
"""
import dataclasses
from typing import Optional, Sequence, Tuple, Union

import torch

from .. import _checks, _dispatch
from . import cpu, reference

__all__ = ["na1d", "na2d", "BACKENDS", "BORDERS"]

BORDERS = ("clamp", "zero_pad")

_TRITON_MODULE = __name__ + ".triton"


def _can_run_triton(tensors, forced: bool = False) -> Optional[str]:
    """The Triton kernels take queries at key resolution only (q's shape is k's): a query stride
    is not in their tile plans (the dK / dV kernel's inverse neighborhoods assume it)."""
    reason = _dispatch.can_run_triton(tensors, forced)
    if reason is None and tensors[0].shape != tensors[1].shape:
        return (f"triton backend does not implement query_stride > 1 (q {tuple(tensors[0].shape)} on a "
                f"coarser grid than k {tuple(tensors[1].shape)})")
    return reason


BACKENDS = [dataclasses.replace(b, can_run=_can_run_triton) if b.name == "triton" else b
            for b in _dispatch.standard_backends(reference, cpu, _TRITON_MODULE)]

IntOrPair = Union[int, Tuple[int, int], Sequence[int]]


def _validate(op: str, q, k, v, kernel_size, dilation, stride, rpb, scale, n: int, border: str = "clamp",
              query_stride=1):
    """Checks shared by na1d (n=1) and na2d (n=2); returns (kernel, dilation, stride, scale, query_stride).
    An axis of length 1 gets query stride 1 (its one query sits at 0 either way), so q's shape
    differs from k's exactly when a query stride is in effect."""
    if border not in BORDERS:
        raise ValueError(f"{op}: border must be one of {BORDERS}, got {border!r}")
    layout = "[B, L, heads, D]" if n == 1 else "[B, H, W, heads, D]"
    _checks.check_qkv(op, q, k, v, layout, same_shape=False)
    qs = _checks.as_pair(op, "query_stride", query_stride, n)
    if any(x < 1 for x in qs):
        raise ValueError(f"{op}: query_stride must be >= 1, got {query_stride}")
    spatial = tuple(k.shape[1:1 + n])
    q_spatial = tuple(-(-size // x) for size, x in zip(spatial, qs))
    if k.shape != v.shape or tuple(q.shape) != (k.shape[0],) + q_spatial + tuple(k.shape[1 + n:]):
        want = "the same shape" if q_spatial == spatial else \
            f"k, v of one shape and q of shape {(k.shape[0],) + q_spatial + tuple(k.shape[1 + n:])} " \
            f"(the map {spatial} at query_stride {qs}: ceil(size / query_stride))"
        raise ValueError(f"{op}: q, k, v must have {want}, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    qs = tuple(1 if size == 1 else x for size, x in zip(spatial, qs))
    ks = _checks.as_pair(op, "kernel_size", kernel_size, n)
    dil = _checks.as_pair(op, "dilation", dilation, n)
    st = _checks.as_pair(op, "stride", stride, n)
    zero_pad = border == "zero_pad"
    # zero_pad windows are never clamped, so even kernels (HaloNet: b + 2h with even b) are fine
    if any(x < 1 or (x % 2 == 0 and not zero_pad) for x in ks):
        raise ValueError(f"{op}: kernel_size must be odd and >= 1, got {kernel_size}")
    if any(x < 1 for x in dil):
        raise ValueError(f"{op}: dilation must be >= 1, got {dilation}")
    if zero_pad and any(x != 1 for x in dil):
        raise ValueError(f"{op}: border='zero_pad' supports dilation 1 only, got dilation {dilation}")
    if any(x < 1 for x in st):
        raise ValueError(f"{op}: stride must be >= 1, got {stride}")
    if any(s > kk for s, kk in zip(st, ks)):
        raise ValueError(f"{op}: stride must not exceed kernel_size (NATTEN's rule), "
                         f"got stride {stride} and kernel_size {kernel_size}")
    if not zero_pad and any(size < kk * d for size, kk, d in zip(spatial, ks, dil)):
        need = tuple(kk * d for kk, d in zip(ks, dil))
        raise ValueError(f"{op}: the map {spatial} of k {tuple(k.shape)} is smaller than kernel_size * dilation "
                         f"{need} (kernel_size {kernel_size}, dilation {dilation}); pad it first")
    heads = q.shape[-2]
    if rpb is not None:
        _checks.check_bias(op, "rpb", rpb, q, (heads,) + tuple(2 * kk - 1 for kk in ks),
                    f"[heads, 2k-1{', 2k-1' if n == 2 else ''}]", f" and kernel_size {kernel_size}")
    return ks, dil, st, _checks.check_scale(op, scale, q.shape[-1] ** -0.5), qs


def _validate_rel(op: str, name: str, rel, q: torch.Tensor, kk: int):
    if rel is not None:
        _checks.check_bias(op, name, rel, q, tuple(q.shape[:-1]) + (kk,), "[B, H, W, heads, k]")


def na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1,
         stride: IntOrPair = 1, rpb: Optional[torch.Tensor] = None, scale: Optional[float] = None,
         backend: Optional[str] = None, border: str = "clamp", rel_h: Optional[torch.Tensor] = None,
         rel_w: Optional[torch.Tensor] = None, query_stride: IntOrPair = 1) -> torch.Tensor:
    """2-D neighborhood attention.

    Args:
        q, k, v: ``[B, H, W, heads, D]`` (NATTEN's layout; any strides); with a query stride
            q is ``[B, ceil(H / qh), ceil(W / qw), heads, D]``.
        kernel_size: odd window size, int or ``(kh, kw)`` (any size >= 1 with ``border="zero_pad"``).
        dilation: sub-grid step, int or pair; ``H >= kh * dh`` and ``W >= kw * dw`` (clamp only).
        stride: queries of an ``sh x sw`` group share the group centre's window; ``<= kernel_size``.
        rpb: relative positional bias ``[heads, 2kh-1, 2kw-1]`` or None.
        scale: logit scale, default ``D ** -0.5``; any finite number.
        backend: ``"reference" | "cpu" | "triton"``; default: the best that can run.
        border: ``"clamp"`` (NATTEN: windows shifted inside the map) or ``"zero_pad"``
            (HaloNet: windows centred on the stride group, ``start = g + s//2 - k//2``,
            never clamped; keys outside the map are zeros that take part in the softmax;
            any map size; dilation 1 only). HaloNet block ``b``, halo ``h``:
            ``stride=b, kernel_size=b + 2h``.
        rel_h, rel_w: per-query logit biases ``[B, H, W, heads, kh]`` / ``[B, H, W, heads, kw]``
            by window row / column: ``logit[q, (i, j)] += rel_h[q, i] + rel_w[q, j]``
            (not scaled); differentiable. HaloNet's relative position embedding is mapped onto
            them by ``attnzoo.layers.halo.HaloPosEmbedRel`` (derivation: README.md, section
            "HaloNet mode", "Relation to timm's HaloAttn").
        query_stride: ``(qh, qw)``, int or pair: queries on a coarser grid than the keys; query
            ``(i, j)`` sits at key-map position ``(i * qh, j * qw)`` and attends its window
            (HaloNet's stride-2 blocks: ``stride=b, query_stride=2``, q from a strided conv).
            rel_h, rel_w and the output are on q's grid. Not in the Triton kernels (its
            ``can_run`` says so; the cpu backend runs it).
        rpb, rel_h, rel_w must have q's dtype (under autocast all are cast to its dtype first).

    Returns q's shape ``[B, Hq, Wq, heads, D]`` in q's dtype (the autocast dtype under autocast).
    """
    (q, k, v, rpb, rel_h, rel_w), no_autocast = _checks.autocast_inputs(q, k, v, rpb, rel_h, rel_w)
    ks, dil, st, scale, qs = _validate("na2d", q, k, v, kernel_size, dilation, stride, rpb, scale, 2, border,
                                       query_stride)
    _validate_rel("na2d", "rel_h", rel_h, q, ks[0])
    _validate_rel("na2d", "rel_w", rel_w, q, ks[1])
    chosen = _dispatch.choose_backend("na2d", BACKENDS, [t for t in (q, k, v, rpb, rel_h, rel_w) if t is not None],
                                      backend)
    with no_autocast:
        return chosen.impl.na2d(q, k, v, ks, dil, st, rpb, scale, border, rel_h, rel_w, qs)


def na1d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1,
         stride: IntOrPair = 1, rpb: Optional[torch.Tensor] = None, scale: Optional[float] = None,
         backend: Optional[str] = None) -> torch.Tensor:
    """1-D neighborhood attention over ``[B, L, heads, D]``; ``rpb``: ``[heads, 2k-1]``.

    Runs as ``na2d`` on an ``L x 1`` map with kernel ``(k, 1)`` (the sequence on the
    height axis, whose key halos the CPU backend never copies).
    """
    (q, k, v, rpb), no_autocast = _checks.autocast_inputs(q, k, v, rpb)
    ks, dil, st, scale, _ = _validate("na1d", q, k, v, kernel_size, dilation, stride, rpb, scale, 1)
    chosen = _dispatch.choose_backend("na1d", BACKENDS, [t for t in (q, k, v, rpb) if t is not None], backend)
    with no_autocast:
        out = chosen.impl.na2d(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), (ks[0], 1), (dil[0], 1), (st[0], 1),
                               None if rpb is None else rpb.unsqueeze(-1), scale, "clamp", None, None, (1, 1))
    return out.squeeze(2)
