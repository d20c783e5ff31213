"""attnzoo: attention backbones for computer vision, registered with timm.

``import attnzoo`` registers every model, so ``timm.create_model("cbam_resnet50")`` works.
"""
from . import backbones  # noqa: F401  (registers the models)
from ._registry import list_models

__version__ = "0.1.0"
__all__ = ["list_models", "__version__"]
