"""Generic necks and heads sized from channel lists; this package never imports ``pvt_backbone``."""

from .classification import ClassificationHead

__all__ = ["ClassificationHead"]
