"""Channel and spatial gates: CBAM (Woo et al. 2018) and ECA (Wang et al. 2020).

A gate multiplies a feature map by a sigmoid of something computed from pooled
statistics. The pooling and the final scaling are memory-bound passes over the
full map; those are the backend primitives (see ``reference.py``). The small
learned part (CBAM's MLP, ECA's 1-D conv, CBAM's 7x7 conv + BN) acts on pooled
tensors only, so it is passed in as a callable and runs under ordinary autograd.

The fused CBAM path reads the input three times and writes it once: channel
pool, spatial pool of ``x * channel_scale`` without materialising it, and one
scale by both gates.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import _dispatch
from . import cpu, reference

__all__ = ["channel_gate", "spatial_gate", "cbam_gate", "eca_gate", "BACKENDS"]

BACKENDS = _dispatch.standard_backends(reference, cpu, __name__ + ".triton")


def _check_map(op: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: expected a feature map [B, C, H, W], got shape {shape}")
    if x.numel() == 0:
        raise ValueError(f"{op}: got an empty feature map of shape {tuple(x.shape)}")


def _check_out(op: str, name: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} returned shape {tuple(t.shape)}, expected {tuple(shape)}")


def _channel_scale(op, impl, x, gate_fn, use_max):
    B, C = x.shape[:2]
    avg, mx = impl.channel_pool(x, use_max)
    # one call of the learned gate on [avg; max] instead of two
    pooled = avg if mx is None else torch.cat([avg, mx], dim=0)
    logits = gate_fn(pooled)
    _check_out(op, "gate_fn", logits, pooled.shape)
    if mx is not None:
        logits = logits[:B] + logits[B:]
    return torch.sigmoid(logits)


def _spatial_scale(op, impl, x, gate_fn, cscale=None):
    B, _, H, W = x.shape
    logits = gate_fn(impl.spatial_pool(x, cscale))
    _check_out(op, "spatial_fn", logits, (B, 1, H, W))
    return torch.sigmoid(logits[:, 0])


def channel_gate(
        x: torch.Tensor,
        gate_fn: Callable[[torch.Tensor], torch.Tensor],
        use_max: bool = True,
        backend: Optional[str] = None,
) -> torch.Tensor:
    """``x * sigmoid(gate_fn(avgpool(x)) + gate_fn(maxpool(x)))``.

    Args:
        x: ``[B, C, H, W]``.
        gate_fn: maps pooled ``[N, C]`` to logits ``[N, C]`` (CBAM's shared MLP).
        use_max: add the max-pooled branch (CBAM); without it this is an SE/ECA-style gate.
        backend: ``"reference" | "cpu" | "triton"``; default: the best that can run.
    """
    _check_map("channel_gate", x)
    impl = _dispatch.choose_backend("channel_gate", BACKENDS, [x], backend).impl
    cscale = _channel_scale("channel_gate", impl, x, gate_fn, use_max)
    return impl.gate_scale(x, cscale, None)


def spatial_gate(
        x: torch.Tensor,
        gate_fn: Callable[[torch.Tensor], torch.Tensor],
        backend: Optional[str] = None,
) -> torch.Tensor:
    """``x * sigmoid(gate_fn([max_c(x), mean_c(x)]))``; ``gate_fn``: ``[B, 2, H, W] -> [B, 1, H, W]``."""
    _check_map("spatial_gate", x)
    impl = _dispatch.choose_backend("spatial_gate", BACKENDS, [x], backend).impl
    return impl.gate_scale(x, None, _spatial_scale("spatial_gate", impl, x, gate_fn))


def cbam_gate(
        x: torch.Tensor,
        channel_fn: Callable[[torch.Tensor], torch.Tensor],
        spatial_fn: Callable[[torch.Tensor], torch.Tensor],
        backend: Optional[str] = None,
) -> torch.Tensor:
    """CBAM: the channel gate followed by the spatial gate, fused.

    Equal to ``spatial_gate(channel_gate(x, channel_fn), spatial_fn)`` but the
    channel-gated map is never written: the spatial pool reads ``x`` and the
    channel scale, and one final pass applies both scales.
    """
    _check_map("cbam_gate", x)
    impl = _dispatch.choose_backend("cbam_gate", BACKENDS, [x], backend).impl
    cscale = _channel_scale("cbam_gate", impl, x, channel_fn, True)
    sscale = _spatial_scale("cbam_gate", impl, x, spatial_fn, cscale)
    return impl.gate_scale(x, cscale, sscale)


def eca_gate(x: torch.Tensor, weight: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """ECA: ``x * sigmoid(conv1d_k(avgpool(x)))`` across channels, no bias, 'same' padding.

    Args:
        x: ``[B, C, H, W]``.
        weight: the ``Conv1d(1, 1, k)`` weight, shape ``[1, 1, k]`` with odd ``k``.
    """
    _check_map("eca_gate", x)
    if weight.dim() != 3 or weight.shape[:2] != (1, 1) or weight.shape[2] % 2 == 0:
        raise ValueError(f"eca_gate: weight must be [1, 1, k] with odd k, got shape {tuple(weight.shape)}")

    def conv(pooled):
        return F.conv1d(pooled.unsqueeze(1), weight.to(pooled.dtype), padding=weight.shape[2] // 2).squeeze(1)

    return channel_gate(x, conv, use_max=False, backend=backend)
