"""Linear attention over ``N`` tokens, plain and magnitude-aware (MALA, Fan et al., ICCV 2025).

Given non-negative features ``q = phi(Q)``, ``k = phi(K)`` (``[B, heads, N, D]``; MALA and
most linear attentions use ``phi = elu + 1``), values ``v`` and an optional RoPE:

- ``z = scale * q . mean(k)`` per query, from the features *before* RoPE;
- ``kv = (scale / N) * rope(k)^T v``, a ``[D, D]`` summary per head;
- magnitude-aware: ``out = (1 + 1/(z + eps)) * rope(q) @ kv - z * mean(v)``;
- plain: ``out = rope(q) @ kv / (z + eps)`` (the usual normalised linear attention).

Computing ``z`` before RoPE and the numerator after it is the official MALA order
(qhfan/MALA issue #5); the op owns both so callers cannot mix them up. RoPE here turns
adjacent channel pairs ``(2i, 2i+1)`` by the angle of ``cos[n, i]``, ``sin[n, i]``
(tables ``[N, D/2]``, e.g. from ``attnzoo.layers.mala.rope_tables``). The cost is
``O(N D^2)``: nothing ``N x N`` or per-token ``D x D`` is ever formed. See ``README.md``
for the maths, the backward and the numerics (``eps``).

Backends (``backend=`` or ``$ATTNZOO_BACKEND``; default: the best that can run):

- ``reference``: the readable composition under autograd (``reference.py``), the oracle.
- ``cpu``: batched matmuls, RoPE as one complex multiply, hand-written backward (``cpu.py``).
- ``triton``: fused forward and backward kernels, two passes each (``triton.py``, CUDA).

``rotate_pairs(x, cos, sin)`` is the same RoPE on its own, for callers that
need it outside the op (MAViT's softmax stages).
"""
from typing import Optional, Tuple

import torch

from .. import _checks, _dispatch
from . import cpu, reference

__all__ = ["linear_attention", "magnitude_aware_linear_attention", "rotate_pairs", "BACKENDS", "DEFAULT_EPS"]

BACKENDS = _dispatch.standard_backends(reference, cpu, __name__ + ".triton")

#: added to ``z`` before ``1/z``; the official MALA code's value (see README.md, "Numerics")
DEFAULT_EPS = 1e-6

Rope = Optional[Tuple[torch.Tensor, torch.Tensor]]


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent channel pairs ``(2i, 2i+1)`` of ``x`` by the tables ``cos, sin`` ``[N, D/2]``,
    differentiable. In eager fp32 / fp64 one complex multiply (the cpu backend's, ~8x faster on CPU
    than the reference's passes over strided even / odd views); half dtypes have no complex view,
    and graph captures and ONNX take no complex tensors: there, the reference's form."""
    if (x.dtype not in (torch.float32, torch.float64) or _dispatch.capturing() is not None
            or torch.jit.is_tracing()):
        return reference.rotate(x, cos, sin)
    return cpu.rope_turn(x, cpu.rope_table(cos, sin, x.dtype))


def _validate(op: str, q, k, v, rope: Rope, scale, eps):
    _checks.check_qkv(op, q, k, v, "[B, heads, N, D]")
    cos = sin = None
    if rope is not None:
        if not isinstance(rope, (tuple, list)) or len(rope) != 2:
            raise ValueError(f"{op}: rope must be a (cos, sin) pair of [N, D/2] tables, got {type(rope).__name__}")
        cos, sin = rope
        n, d = q.shape[-2:]
        if d % 2:
            raise ValueError(f"{op}: RoPE turns channel pairs, so D must be even; got q {tuple(q.shape)}")
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, d // 2):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{op}: rope {name} must be [N, D/2] = {(n, d // 2)} for q {tuple(q.shape)}, "
                                 f"got {got}")
            if t.device != q.device or not t.is_floating_point():
                raise ValueError(f"{op}: rope {name} must be a floating tensor on {q.device}, "
                                 f"got {t.dtype} on {t.device}")
    scale = _checks.check_scale(op, scale, q.shape[-1] ** -0.5)
    if not float(eps) > 0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")
    return cos, sin, scale, float(eps)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope = None, *,
                     magnitude_aware: bool = False, scale: Optional[float] = None, eps: float = DEFAULT_EPS,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Linear attention of ``[B, heads, N, D]`` features (any strides); returns ``[B, heads, N, D]``.

    Args:
        q, k: non-negative query / key features (``phi`` already applied), ``[B, heads, N, D]``.
        v: values, same shape.
        rope: ``(cos, sin)``, each ``[N, D/2]``, or None. Applied to q and k for the
            numerator only, after ``z`` (see the module docstring). Gets no gradient.
        magnitude_aware: MALA's ``(1 + 1/z) q kv - z mean(v)`` instead of ``q kv / z``.
        scale: ``s`` in ``z = s q.mean(k)`` and ``kv = (s/N) k^T v``; default ``D ** -0.5``.
        eps: added to ``z`` before it is inverted (MALA's ``1e-6``); must be > 0.
        backend: ``"reference" | "cpu" | "triton"``; default: the best that can run.

    Half inputs are accumulated in fp32 and returned in their dtype. Under autocast q, k, v are
    cast to its dtype first (``ops._checks.autocast_inputs``, every attention op's policy).
    """
    # the RoPE tables are not cast: backends read them in any floating dtype (validated below)
    (q, k, v), no_autocast = _checks.autocast_inputs(q, k, v)
    cos, sin, scale, eps = _validate("linear_attention", q, k, v, rope, scale, eps)
    tensors = [t for t in (q, k, v, cos, sin) if t is not None]
    chosen = _dispatch.choose_backend("linear_attention", BACKENDS, tensors, backend)
    with no_autocast:
        return chosen.impl.linear_attention(q, k, v, cos, sin, scale, eps, bool(magnitude_aware))


def magnitude_aware_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope = None, *,
                                     scale: Optional[float] = None, eps: float = DEFAULT_EPS,
                                     backend: Optional[str] = None) -> torch.Tensor:
    """Magnitude-aware linear attention (MALA, Fan et al., ICCV 2025) of ``[B, heads, N, D]`` features.

    ``out = (1 + 1/(z + eps)) * rope(q) @ kv - z * mean(v)`` with ``z = scale * q . mean(k)`` (before
    RoPE) and ``kv = (scale / N) * rope(k)^T v``: unlike ``q kv / z``, the output keeps the query's
    magnitude, which plain linear attention normalises away. Cost ``O(N D^2)``.

    Args:
        q, k: non-negative query / key features (``phi`` already applied, MALA's ``elu + 1``),
            ``[B, heads, N, D]``, any strides.
        v: values, same shape.
        rope: ``(cos, sin)``, each ``[N, D/2]`` (``attnzoo.layers.mala.rope_tables``), or None;
            turns channel pairs ``(2i, 2i+1)`` of q and k for the numerator only (the official order).
        scale: default ``D ** -0.5``. eps: MALA's ``1e-6``, must be > 0.
        backend: ``"reference" | "cpu" | "triton"``; default: the best that can run.

    Returns ``[B, heads, N, D]`` in q's dtype (half inputs accumulate in fp32). Equal to
    ``linear_attention(q, k, v, rope, magnitude_aware=True, ...)``.
    """
    return linear_attention(q, k, v, rope, magnitude_aware=True, scale=scale, eps=eps, backend=backend)
