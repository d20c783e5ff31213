"""Readable reference for the gate primitives: the test oracle.

Every backend implements the same three primitives, from which the public gates
(CBAM channel/spatial, ECA) are composed in ``__init__``:

- ``channel_pool(x, with_max)``: global average (and max) over H, W -> ``[B, C]``.
- ``spatial_pool(x, cscale)``: max and mean over C of ``x * cscale`` -> ``[B, 2, H, W]``,
  in CBAM's [max, mean] order.
- ``gate_scale(x, cscale, sscale)``: ``x * cscale[b, c] * sscale[b, h, w]``; either may be None.
"""
from typing import Optional, Tuple

import torch


def channel_pool(x: torch.Tensor, with_max: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    avg = x.mean(dim=(2, 3))
    mx = x.amax(dim=(2, 3)) if with_max else None
    return avg, mx


def spatial_pool(x: torch.Tensor, cscale: Optional[torch.Tensor] = None) -> torch.Tensor:
    if cscale is not None:
        x = x * cscale[:, :, None, None]
    return torch.stack([x.amax(dim=1), x.mean(dim=1)], dim=1)


def gate_scale(
        x: torch.Tensor,
        cscale: Optional[torch.Tensor] = None,
        sscale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if cscale is not None:
        x = x * cscale[:, :, None, None]
    if sscale is not None:
        x = x * sscale[:, None]
    return x
