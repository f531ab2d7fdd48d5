"""Generic necks and heads sized from channel lists; this package never imports ``pvt_backbone``."""

from .classification import ClassificationHead
from .fpn import FPN, P6P7Block
from .segmentation import MLPSegHead, SemanticFPNHead, group_norm, resize_bilinear

__all__ = ["ClassificationHead", "FPN", "P6P7Block", "SemanticFPNHead", "MLPSegHead", "group_norm", "resize_bilinear"]
