"""CBAM gate (Woo et al., ECCV 2018, https://arxiv.org/abs/1807.06521).

Why not timm's ``CbamModule``: its spatial branch pools [mean, max] and its MLP has
no bias by default, while the paper's code pools [max, mean] and uses biased
linear layers; the spatial BN also uses momentum 0.01 there. This module follows
the official code and runs on the fused ``cbam_gate`` op.
"""
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from ..ops.gate import cbam_gate


class CbamGate(nn.Module):
    """Channel gate (shared MLP on avg- and max-pooled features) then spatial gate
    (7x7 conv + BN on the channel-wise [max, mean] map).

    Args:
        channels: input channels.
        reduction: MLP reduction ratio (hidden = channels // reduction, as in the paper's code).
        spatial_kernel: spatial conv kernel size.
        backend: force an op backend; ``None`` picks the best that can run.
    """

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        hidden = max(channels // reduction, 1)
        self.channel = nn.Sequential(OrderedDict(
            fc1=nn.Linear(channels, hidden, **dd), act=nn.ReLU(inplace=True), fc2=nn.Linear(hidden, channels, **dd)))
        self.spatial = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False, **dd),
            bn=nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, **dd)))
        self.backend = backend
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The official init zeroes every bias and the spatial BN's weight, so the
        # spatial gate starts as a constant 0.5.
        nn.init.zeros_(self.channel.fc1.bias)
        nn.init.zeros_(self.channel.fc2.bias)
        nn.init.zeros_(self.spatial.bn.weight)
        nn.init.zeros_(self.spatial.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cbam_gate(x, self.channel, self.spatial, backend=self.backend)
