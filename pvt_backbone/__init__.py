"""PVTv2 (Pyramid Vision Transformer v2) as a plain-PyTorch backbone for detection and segmentation.

The headline names live here; everything else is one module away: ``pvt_backbone.detection`` (torchvision detectors),
``pvt_backbone.segmentation``, ``pvt_backbone.weights`` (layouts, loading, saving), ``pvt_backbone.export``.
The training application (``pvt_backbone.training``) and the commands (``pvt_backbone.cli``) are not imported here.

Example:
    >>> model = PVTv2Backbone.b0(out_indices=(1, 2, 3))
    >>> {name: tuple(f.shape) for name, f in model(torch.rand(1, 3, 64, 64)).items()}
    {'1': (1, 64, 8, 8), '2': (1, 160, 4, 4), '3': (1, 256, 2, 2)}
    >>> create_model("maskrcnn_pvt_v2_b0_fpn", num_classes=3).__class__.__name__
    'MaskRCNN'
"""

from .backbone import PVTv2Backbone
from .classifier import PVTv2, pvt_v2_b0, pvt_v2_b1, pvt_v2_b2, pvt_v2_b2_li, pvt_v2_b3, pvt_v2_b4, pvt_v2_b5
from .config import VARIANTS, PVTv2Config
from .registry import create_model, list_models
from .version import __version__
from .weights import CheckpointError, load_weights, save_weights

__all__ = [
    "PVTv2Backbone",
    "PVTv2",
    "PVTv2Config",
    "VARIANTS",
    "list_models",
    "create_model",
    "load_weights",
    "save_weights",
    "CheckpointError",
    "pvt_v2_b0",
    "pvt_v2_b1",
    "pvt_v2_b2",
    "pvt_v2_b2_li",
    "pvt_v2_b3",
    "pvt_v2_b4",
    "pvt_v2_b5",
    "__version__",
]
