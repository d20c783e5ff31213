from .cbam import CbamGate
from .eca import EcaGate, eca_kernel_size

__all__ = ["CbamGate", "EcaGate", "eca_kernel_size"]
