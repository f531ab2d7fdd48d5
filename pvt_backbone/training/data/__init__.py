"""Datasets for PVTv2 detectors and segmenters: built-in synthetic scenes, COCO-format data, mask folders."""

from .base import IGNORE_INDEX, DetectionDataset, SegmentationDataset
from .coco import CocoDetection, load_image
from .errors import DataError, DataWarning
from .folder import SegmentationFolder
from .synthetic import (
    SHAPES,
    SyntheticConfig,
    SyntheticSegmentation,
    SyntheticShapes,
    render_scene,
    write_coco,
    write_mask_folder,
)

__all__ = [
    "DataError",
    "DataWarning",
    "DetectionDataset",
    "SegmentationDataset",
    "IGNORE_INDEX",
    "CocoDetection",
    "SegmentationFolder",
    "SyntheticConfig",
    "SyntheticShapes",
    "SyntheticSegmentation",
    "SHAPES",
    "render_scene",
    "write_coco",
    "write_mask_folder",
    "load_image",
]
