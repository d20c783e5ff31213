"""Channel and spatial gates: CBAM (Woo et al. 2018) and ECA (Wang et al. 2020).

A gate multiplies a feature map by the sigmoid of something computed from
pooled statistics. Pooling and scaling are memory-bound passes over the full
map; the learned part (CBAM's MLP, ECA's 1-D conv, CBAM's 7x7 conv + BN) only
sees pooled tensors, so it is passed in as a callable.

Backends:
- ``reference``: the readable composition under autograd (``reference.py``), the oracle.
- ``cpu`` / ``triton``: raw passes (``cpu.py``, ``triton.py``) driven by one
  autograd Function, ``_FusedGate`` (its docstring says why the two share it). Forward reads the map for the channel pool,
  reads it for the spatial pool of ``x * channel_scale`` (never written) and
  writes the output once. Backward keeps the small gate graphs from the forward
  (so BN statistics update once) and needs three passes: the two scale
  reductions of ``dy * x``, the channel-scale term of the spatial pool, and one
  write of ``dx`` that sums every path.

Autocast: as ``ops.linear``, the gates set their own precision. Pooling, scaling and every
backward pass run with autocast off, in x's dtype (the kernels accumulate in fp32), and the
output has x's dtype. The learned callables (CBAM's MLP, its spatial conv) are the caller's
modules and run under the caller's autocast state, as they would outside the op, on pooled
maps in x's dtype. Everything from the logits on is the op's and runs in fp32 for half maps
(fp64 for fp64): the sigmoid (a bf16 one near saturation leaves ``s (1 - s)``, its gradient,
with few correct bits), the scales and their gradients (each a sum over the map or the
channels), and ECA's 1-D conv, whose weight gradient is a sum over every channel.

Under a graph capture (ONNX export, ``torch.export``, ``torch.compile``) the dispatch
takes the reference, or under ``torch.compile`` the Triton backend, whose three primitives
are custom ops: the gate is then composed from them as the reference composes its own,
since ``_FusedGate`` keeps the learned gate callables in its ctx and cannot be traced.
"""
import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .. import _dispatch
from . import cpu, reference

__all__ = ["channel_gate", "spatial_gate", "cbam_gate", "eca_gate", "BACKENDS"]

BACKENDS = _dispatch.standard_backends(reference, cpu, __name__ + ".triton")

GateFn = Callable[[torch.Tensor], torch.Tensor]


def _check_map(op: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: expected a feature map [B, C, H, W], got shape {shape}")
    if not x.is_floating_point():
        # checked here: torch's own error (from the mean) names neither the op nor the argument
        raise ValueError(f"{op}: x must be a floating-point feature map, got dtype {x.dtype} "
                         f"(shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{op}: got an empty feature map of shape {tuple(x.shape)}")


def _as_caller(fn: Optional[GateFn], device_type: str) -> Optional[GateFn]:
    """``fn`` run under the caller's autocast state from inside the op's autocast-off region."""
    if fn is None or not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return fn
    dtype, cache = torch.get_autocast_dtype(device_type), torch.is_autocast_cache_enabled()

    def under_caller_autocast(pooled):
        with torch.autocast(device_type, dtype=dtype, cache_enabled=cache):
            return fn(pooled)

    return under_caller_autocast


def _check_out(op: str, name: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} returned shape {tuple(t.shape)}, expected {tuple(shape)}")


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the gate scales (sigmoid outputs): fp32 for half maps, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _channel_logits(op, gate_fn, avg, mx):
    # one call of the learned gate on [avg; max] instead of two
    pooled = avg if mx is None else torch.cat([avg, mx], dim=0)
    logits = gate_fn(pooled)
    _check_out(op, "gate_fn", logits, pooled.shape)
    logits = logits.to(_scale_dtype(pooled.dtype))
    return logits if mx is None else logits[: avg.shape[0]] + logits[avg.shape[0]:]


def _spatial_logits(op, gate_fn, pooled):
    B, _, H, W = pooled.shape
    logits = gate_fn(pooled)
    _check_out(op, "spatial_fn", logits, (B, 1, H, W))
    return logits[:, 0].to(_scale_dtype(pooled.dtype))


def _reference(op, x, channel_fn, use_max, spatial_fn, prims=reference):
    """The gate composed from a backend's three primitives (``prims``), under autograd."""
    cs = ss = None
    if channel_fn is not None:
        cs = torch.sigmoid(_channel_logits(op, channel_fn, *prims.channel_pool(x, use_max)))
    if spatial_fn is not None:
        # the spatial gate sees x's dtype, as from the fused backends (fp32 cscale promotes the pool)
        ss = torch.sigmoid(_spatial_logits(op, spatial_fn, prims.spatial_pool(x, cs).to(x.dtype)))
    return prims.gate_scale(x, cs, ss).to(x.dtype)


class _FusedGate(torch.autograd.Function):
    """The cpu and triton backends' autograd Function, generic over their raw passes (``kernels``:
    the backend module). Why one Function for two backends, unlike the other ops: the learned gate
    callables run inside it (their small graphs are built in forward and differentiated in
    backward, so BN statistics update once), and that logic is the same whatever computes the
    memory-bound passes; each backend supplies only the six passes. ``keep_graph=False`` (nothing
    needs a gradient) keeps no gate graph and no argmax indices."""

    @staticmethod
    def forward(ctx, x, kernels, op, channel_fn, use_max, spatial_fn, n_channel_params, keep_graph, *params):
        B = x.shape[0]
        cs = ss = cidx = sidx = None
        training = keep_graph
        ctx.saved_params = params
        ctx.pooled_c = ctx.cs_graph = ctx.pooled_s = ctx.ss_graph = None
        # The small gate graphs are built here and kept for backward (retained, so a
        # retain_graph backward can run twice; they die with ctx). Not under no_grad.
        with torch.enable_grad() if training else contextlib.nullcontext():
            if channel_fn is not None:
                avg, mx, cidx = kernels.pool_channels(x, use_max, training)
                ctx.pooled_c = torch.cat([avg, mx]) if mx is not None else avg
                ctx.pooled_c = ctx.pooled_c.detach().requires_grad_()
                avg_l, mx_l = (ctx.pooled_c[:B], ctx.pooled_c[B:]) if mx is not None else (ctx.pooled_c, None)
                ctx.cs_graph = torch.sigmoid(_channel_logits(op, channel_fn, avg_l, mx_l))
                cs = ctx.cs_graph.detach()
            if spatial_fn is not None:
                pooled, sidx = kernels.pool_spatial(x, cs, training)
                ctx.pooled_s = pooled.detach().requires_grad_()
                ctx.ss_graph = torch.sigmoid(_spatial_logits(op, spatial_fn, ctx.pooled_s))
                ss = ctx.ss_graph.detach()
        ctx.kernels, ctx.use_max, ctx.n_channel_params = kernels, use_max, n_channel_params
        ctx.save_for_backward(x, cs, ss, cidx, sidx)
        return kernels.scale(x, cs, ss)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        with _dispatch.no_autocast(dy.device.type):  # as the forward's own passes (backward may run under autocast)
            return _FusedGate._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, cs, ss, cidx, sidx = ctx.saved_tensors
        k, B = ctx.kernels, x.shape[0]
        params = ctx.saved_params
        ch_params, sp_params = params[:ctx.n_channel_params], params[ctx.n_channel_params:]
        dy = dy.contiguous() if not (dy.is_contiguous() or dy.is_contiguous(memory_format=torch.channels_last)) else dy
        dcs, dss = k.scale_grads(dy, x, cs, ss, cs is not None, ss is not None)
        # in the scales' dtype, as the gate graphs (the raw passes return fp32 for half maps already)
        dcs = dcs.to(cs.dtype) if cs is not None else None
        d_params_c, d_params_s = [None] * len(ch_params), [None] * len(sp_params)
        dpooled_s = davg = dmax = None
        if ss is not None:
            dpooled_s, *d_params_s = torch.autograd.grad(
                ctx.ss_graph, [ctx.pooled_s, *sp_params], dss.to(ss.dtype), allow_unused=True, retain_graph=True)
            if cs is not None:
                dcs = dcs + k.pool_spatial_cs_grad(x, dpooled_s, sidx).to(cs.dtype)
        if cs is not None:
            dpooled_c, *d_params_c = torch.autograd.grad(
                ctx.cs_graph, [ctx.pooled_c, *ch_params], dcs, allow_unused=True, retain_graph=True)
            davg, dmax = (dpooled_c[:B], dpooled_c[B:]) if ctx.use_max else (dpooled_c, None)
        dx = k.input_grad(dy, cs, ss, davg, dmax, cidx, dpooled_s, sidx)
        return (dx, None, None, None, None, None, None, None, *d_params_c, *d_params_s)


def _trainable(fn, extra: Sequence[torch.Tensor] = ()) -> list:
    params = list(fn.parameters()) if isinstance(fn, nn.Module) else []
    return [p for p in params + list(extra) if p.requires_grad]


def _gate(op, x, channel_fn, use_max, spatial_fn, backend, channel_params=(), spatial_params=(),
          caller_autocast=True):
    _check_map(op, x)
    chosen = _dispatch.choose_backend(op, BACKENDS, [x], backend)
    ch = _trainable(channel_fn, channel_params) if channel_fn is not None else []
    sp = _trainable(spatial_fn, spatial_params) if spatial_fn is not None else []
    device = x.device.type
    if caller_autocast:
        channel_fn, spatial_fn = _as_caller(channel_fn, device), _as_caller(spatial_fn, device)
    with _dispatch.no_autocast(device):
        if chosen.name == "reference":
            return _reference(op, x, channel_fn, use_max, spatial_fn)
        if _dispatch.capturing() is not None:
            # a fast backend under a graph capture (Triton under torch.compile): its primitives are
            # custom ops; _FusedGate, which keeps the gate callables in its ctx, cannot be traced
            return _reference(op, x, channel_fn, use_max, spatial_fn, prims=chosen.impl)
        if not torch.is_grad_enabled() or not (x.requires_grad or ch or sp):
            with torch.no_grad():
                return _FusedGate.apply(x, chosen.impl, op, channel_fn, use_max, spatial_fn, len(ch), False)
        return _FusedGate.apply(x, chosen.impl, op, channel_fn, use_max, spatial_fn, len(ch), True, *ch, *sp)



def channel_gate(x: torch.Tensor, gate_fn: GateFn, use_max: bool = True, backend: Optional[str] = None,
                 params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``x * sigmoid(gate_fn(avgpool(x)) + gate_fn(maxpool(x)))``.

    Args:
        x: ``[B, C, H, W]``.
        gate_fn: maps pooled ``[N, C]`` to logits ``[N, C]`` (CBAM's shared MLP). Its
            trainable tensors are found when it is an ``nn.Module``; otherwise pass them in ``params``
            (the fused backends return gradients only for the tensors they know of).
        use_max: add the max-pooled branch (CBAM); without it this is an SE/ECA-style gate.
        backend: ``"reference" | "cpu" | "triton"``; default: the best that can run.

    Returns ``x``'s shape and dtype; ``x`` must be floating point.
    """
    return _gate("channel_gate", x, gate_fn, use_max, None, backend, channel_params=params)


def spatial_gate(x: torch.Tensor, gate_fn: GateFn, backend: Optional[str] = None,
                 params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """``x * sigmoid(gate_fn([max_c(x), mean_c(x)]))``; ``gate_fn``: ``[B, 2, H, W] -> [B, 1, H, W]``,
    its trainable tensors found as ``channel_gate``'s."""
    return _gate("spatial_gate", x, None, True, gate_fn, backend, spatial_params=params)


def cbam_gate(x: torch.Tensor, channel_fn: GateFn, spatial_fn: GateFn, backend: Optional[str] = None,
              channel_params: Sequence[torch.Tensor] = (), spatial_params: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """CBAM: the channel gate followed by the spatial gate.

    Equal to ``spatial_gate(channel_gate(x, channel_fn), spatial_fn)``; the
    fused backends never write the channel-gated map. The callables' trainable tensors are
    found when they are ``nn.Module``s; otherwise pass them in ``channel_params`` / ``spatial_params``.
    """
    return _gate("cbam_gate", x, channel_fn, True, spatial_fn, backend, channel_params, spatial_params)


def eca_gate(x: torch.Tensor, weight: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """ECA: ``x * sigmoid(conv1d_k(avgpool(x)))`` across channels, no bias, 'same' padding.

    Args:
        x: ``[B, C, H, W]``.
        weight: the ``Conv1d(1, 1, k)`` weight, shape ``[1, 1, k]`` with odd ``k``.
    """
    _check_map("eca_gate", x)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[:2] != (1, 1) \
            or weight.shape[2] % 2 == 0:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"eca_gate: weight must be [1, 1, k] with odd k, got shape {got}")
    if not weight.is_floating_point() or weight.device != x.device:
        raise ValueError(f"eca_gate: weight must be a floating-point tensor on x's device {x.device}, "
                         f"got {weight.dtype} on {weight.device}")

    def conv(pooled):
        acc = _scale_dtype(pooled.dtype)
        return F.conv1d(pooled.to(acc).unsqueeze(1), weight.to(acc), padding=weight.shape[2] // 2).squeeze(1)

    # the conv is the op's own (not a caller's module): fp32 for half maps, autocast off
    return _gate("eca_gate", x, conv, False, None, backend, channel_params=(weight,), caller_autocast=False)
