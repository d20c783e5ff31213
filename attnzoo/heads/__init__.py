"""Task heads. Classification uses timm's ``ClassifierHead``, which every attnzoo model carries."""
from timm.layers import ClassifierHead

__all__ = ["ClassifierHead"]
