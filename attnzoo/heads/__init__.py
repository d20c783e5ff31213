"""Task heads and the dense-prediction backbone.

Classification uses timm's ``ClassifierHead``, which every attnzoo model carries. Detection and
segmentation heads come from mmdet / mmseg: ``import attnzoo.heads.mm`` registers ``AttnZooBackbone``
in their ``MODELS`` registries.
"""
from timm.layers import ClassifierHead

from .backbone import AttnZooBackbone, feature_channels, stage_info

__all__ = ["ClassifierHead", "AttnZooBackbone", "feature_channels", "stage_info"]
