"""ECA gate (Wang et al., CVPR 2020, https://arxiv.org/abs/1910.03151)."""
import math
from typing import Optional

import torch
from torch import nn

from ..ops.gate import eca_gate


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """The paper's adaptive kernel size, |log2(C)/gamma + b/gamma| rounded to the odd number above.

    The released checkpoints do not all follow it (ECANet issue #46): the
    backbones set their kernel sizes explicitly.
    """
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class EcaGate(nn.Module):
    """``x * sigmoid(conv1d_k(avgpool(x)))`` over the channel axis.

    Parameter names match the official ``eca_layer`` (``conv.weight``, shape ``[1, 1, k]``).
    """

    def __init__(self, channels: int, kernel_size: Optional[int] = None, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        k = kernel_size or eca_kernel_size(channels)
        if k % 2 == 0:
            raise ValueError(f"EcaGate: kernel_size must be odd, got {k}")
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return eca_gate(x, self.conv.weight, backend=self.backend)
