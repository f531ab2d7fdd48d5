"""PVTv2 (Pyramid Vision Transformer v2) as a plain-PyTorch backbone for detection and segmentation."""

from .backbone import BackboneOptions, PVTv2Backbone
from .classifier import (
    PVT_V2,
    PVTv2,
    build_classifier,
    pvt_v2_b0,
    pvt_v2_b1,
    pvt_v2_b2,
    pvt_v2_b2_li,
    pvt_v2_b3,
    pvt_v2_b4,
    pvt_v2_b5,
)
from .config import VARIANTS, FeatureSpec, PVTv2Config
from .detection import (
    PVTv2FPN,
    fasterrcnn_pvt_v2_fpn,
    fcos_pvt_v2_fpn,
    keypointrcnn_pvt_v2_fpn,
    maskrcnn_pvt_v2_fpn,
    pvt_fpn_backbone,
    retinanet_pvt_v2_fpn,
)
from .optim import param_groups
from .registry import create_model, list_models
from .segmentation import PVTv2Segmenter, segmentation_loss, semantic_fpn_pvt_v2
from .weights import (
    LAYOUTS,
    Architecture,
    CheckpointError,
    Conversion,
    DroppedKey,
    LoadReport,
    SaveReport,
    convert,
    detect_layout,
    from_native,
    infer_architecture,
    load_weights,
    read_checkpoint,
    save_weights,
    to_native,
)
from .weights.converter import convert_checkpoint, inspect_checkpoint

__version__ = "0.1.0"

__all__ = [
    "PVTv2Backbone",
    "PVTv2",
    "PVT_V2",
    "PVTv2Config",
    "FeatureSpec",
    "VARIANTS",
    "BackboneOptions",
    "build_classifier",
    "pvt_v2_b0",
    "pvt_v2_b1",
    "pvt_v2_b2",
    "pvt_v2_b2_li",
    "pvt_v2_b3",
    "pvt_v2_b4",
    "pvt_v2_b5",
    "load_weights",
    "save_weights",
    "read_checkpoint",
    "inspect_checkpoint",
    "convert_checkpoint",
    "LoadReport",
    "SaveReport",
    "CheckpointError",
    "DroppedKey",
    "Architecture",
    "Conversion",
    "LAYOUTS",
    "detect_layout",
    "to_native",
    "from_native",
    "convert",
    "infer_architecture",
    "PVTv2FPN",
    "pvt_fpn_backbone",
    "fasterrcnn_pvt_v2_fpn",
    "maskrcnn_pvt_v2_fpn",
    "keypointrcnn_pvt_v2_fpn",
    "retinanet_pvt_v2_fpn",
    "fcos_pvt_v2_fpn",
    "PVTv2Segmenter",
    "semantic_fpn_pvt_v2",
    "segmentation_loss",
    "param_groups",
    "list_models",
    "create_model",
    "__version__",
]
