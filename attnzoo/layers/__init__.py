from .bra import BiLevelRoutingAttention
from .agent import AgentAttention
from .cbam import CbamGate
from .eca import EcaGate, eca_kernel_size
from .halo import HaloAttention
from .mala import MagnitudeAwareLinearAttention, RopeSoftmaxAttention, RotaryEmbedding2d
from .neighborhood import NeighborhoodAttention2d

__all__ = ["AgentAttention", "BiLevelRoutingAttention", "CbamGate", "EcaGate", "HaloAttention",
           "MagnitudeAwareLinearAttention", "NeighborhoodAttention2d", "RopeSoftmaxAttention", "RotaryEmbedding2d",
           "eca_kernel_size"]
