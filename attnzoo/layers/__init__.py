from .cbam import CbamGate
from .eca import EcaGate, eca_kernel_size
from .neighborhood import NeighborhoodAttention2d

__all__ = ["CbamGate", "EcaGate", "NeighborhoodAttention2d", "eca_kernel_size"]
