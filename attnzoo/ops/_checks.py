"""Argument checks shared by the attention ops (neighborhood, routing, agent, linear).

Each raises ``ValueError`` naming the op, the argument and the shapes, before any backend
runs, so every backend refuses the same inputs with the same words.
"""
import math
from typing import Optional, Sequence, Tuple

import torch

from . import _dispatch


def shape_of(t) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_qkv(op: str, q, k, v, layout: str, same_shape: bool = True) -> None:
    """q, k, v: tensors of ``layout``'s rank (e.g. ``"[B, heads, N, D]"``), one floating dtype, one
    device, not empty; with ``same_shape`` also one shape (ops whose k/v differ check theirs)."""
    rank = len(layout.split(","))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")
    if same_shape and not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k, v must have the same shape {layout}, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"{op}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if min(q.numel(), k.numel(), v.numel()) == 0:
        shapes = f"of shape {tuple(q.shape)}" if q.shape == k.shape == v.shape else \
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        raise ValueError(f"{op}: got empty inputs {shapes}")


def check_scale(op: str, scale, default: float) -> float:
    """``default`` for None, else a finite real number: inf / nan would silently turn every logit
    into nan, while 0 and negative scales are well defined (uniform / reversed attention)."""
    if scale is None:
        return float(default)
    try:
        value = float(scale)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{op}: scale must be a real number, got {scale!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{op}: scale must be finite, got {value}")
    return value


def check_bias(op: str, name: str, t, q: torch.Tensor, expect: Sequence[int], layout: str,
               context: str = "") -> None:
    """An additive logit term: a tensor of shape ``expect`` with q's device and dtype. The dtype is
    not promoted: backends would disagree (promote, cast or fail); the caller picks the precision."""
    expect = tuple(expect)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != expect:
        raise ValueError(f"{op}: {name} must have shape {layout} = {expect} for q {tuple(q.shape)}{context}, "
                         f"got {shape_of(t)}")
    if t.device != q.device or not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating tensor on {q.device}, got {t.dtype} on {t.device}")
    if t.dtype != q.dtype:
        under = " (after autocast's cast)" if _dispatch.autocast_dtype(q.device.type) is not None else ""
        raise ValueError(f"{op}: {name} must have q's dtype {q.dtype}{under}, got {t.dtype}")


def autocast_inputs(q, *tensors) -> Tuple[tuple, object]:
    """The attention ops' autocast policy: ``((q, *tensors), context)``.

    Under autocast, as ``torch.amp.custom_fwd(cast_inputs=)`` and as torch's own SDPA: floating
    tensors are cast to the autocast dtype (float64 left alone), and the backend then runs with
    autocast off, forward and backward, so it sees one dtype throughout (autocast would round some
    of its matmuls to half and not others, and leave saved tensors in another dtype than the
    backward's); half inputs accumulate in fp32 inside every backend. Without autocast: the inputs
    as given and autocast off all the same (a no-op). Non-tensors pass through to validation.
    The gates (``ops.gate``) are memory-bound pointwise passes and keep x's dtype, as torch's
    autocast leaves pointwise ops alone.
    """
    if not isinstance(q, torch.Tensor):
        return (q, *tensors), _dispatch.no_autocast("cpu")
    dtype = _dispatch.autocast_dtype(q.device.type)
    if dtype is not None:
        q, *tensors = (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                       and t.dtype != torch.float64 else t for t in (q, *tensors))
    return (q, *tensors), _dispatch.no_autocast(q.device.type)


def as_pair(op: str, name: str, value, n: int = 2, minimum: Optional[int] = None) -> Tuple[int, ...]:
    """An int or a sequence of ``n`` ints (bools refused) as an ``n``-tuple, each ``>= minimum``."""
    bad = ValueError(f"{op}: {name} must be an int or a tuple of {n} ints"
                     f"{f', each >= {minimum}' if minimum is not None else ''}, got {value!r}")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, int):
        out = (value,) * n
    else:
        try:
            out = tuple(value)
        except TypeError:
            raise bad from None
    if len(out) != n or not all(isinstance(x, int) and not isinstance(x, bool) for x in out):
        raise bad
    if minimum is not None and any(x < minimum for x in out):
        raise bad
    return out
