"""Every model this package builds, by name: ``list_models`` and ``create_model``, as timm and torchvision offer.

Names carry the variant, one name per builder and variant (``b0`` ... ``b5``, ``b2_li``):

===================================  ==========  =====================================================
name                                 kind        builds
===================================  ==========  =====================================================
``pvt_v2_{v}_backbone``              backbone    ``PVTv2Backbone``: dict of NCHW maps, strides 4-32
``pvt_v2_{v}``                       classifier  ``PVTv2``: the reference 1000-class classifier
``fasterrcnn_pvt_v2_{v}_fpn``        detector    torchvision ``FasterRCNN`` on PVTv2 + FPN
``maskrcnn_pvt_v2_{v}_fpn``          detector    torchvision ``MaskRCNN``
``keypointrcnn_pvt_v2_{v}_fpn``      detector    torchvision ``KeypointRCNN``
``retinanet_pvt_v2_{v}_fpn``         detector    torchvision ``RetinaNet``
``fcos_pvt_v2_{v}_fpn``              detector    torchvision ``FCOS``
``semantic_fpn_pvt_v2_{v}``          segmenter   ``PVTv2Segmenter`` (``head="fpn"`` or ``"mlp"``)
===================================  ==========  =====================================================

``weights`` is what torchvision means by it, the whole model: for a backbone or classifier, a checkpoint in any
layout ``load_weights`` reads; for a detector or segmenter, a state dict of the whole model (a ``.safetensors`` file
as ``pvt-train`` writes, or a ``.pth``), loaded strictly. A published detector (an mmdet RetinaNet, Faster or Mask
R-CNN checkpoint, a ``save_detector`` file, or a published weights name of that builder;
``pvt_backbone.weights.detectors.is_detector_file`` tells them apart) goes to the builder's own ``weights=``, which
builds the detector that computes mmdet's function. Backbone-only weights for a detector or segmenter go in
``weights_backbone=``.

Example:
    >>> list_models("*b0*", kind="detector")
    ['fasterrcnn_pvt_v2_b0_fpn', 'fcos_pvt_v2_b0_fpn', 'keypointrcnn_pvt_v2_b0_fpn', 'maskrcnn_pvt_v2_b0_fpn', \
'retinanet_pvt_v2_b0_fpn']
    >>> model = create_model("pvt_v2_b0_backbone", out_indices=(2, 3))
    >>> model.channels, model.strides
    ((160, 256), (16, 32))
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from . import detection
from .backbone import PVTv2Backbone
from .classifier import build_classifier
from .config import VARIANTS
from .segmentation import semantic_fpn_pvt_v2
from .weights import WeightsSource, load_model_weights
from .weights.detectors import DETECTOR_ARCHS, is_detector_file

__all__ = ["ModelEntry", "MODELS", "KINDS", "list_models", "create_model"]

Kind = Literal["backbone", "classifier", "detector", "segmenter"]
KINDS: tuple[str, ...] = ("backbone", "classifier", "detector", "segmenter")


@dataclass(frozen=True)
class ModelEntry:
    """One registered name: what it builds and how ``weights`` reach the model."""

    name: str
    kind: Kind
    variant: str
    build: Callable[..., nn.Module]  # build(variant, **kwargs)
    weights_in_builder: bool  # True: the builder takes ``weights=`` itself (any checkpoint layout)

    def create(self, *, weights: WeightsSource | None = None, **kwargs: Any) -> nn.Module:
        """Build the model; load ``weights`` (the whole model's) if given."""
        if self.weights_in_builder or (weights is not None and self._published_detector(weights, kwargs)):
            return self.build(self.variant, weights=weights, **kwargs)
        model = self.build(self.variant, **kwargs)
        if weights is not None:
            load_model_weights(model, weights)
        return model

    def _published_detector(self, weights: WeightsSource, kwargs: dict[str, Any]) -> bool:
        """Whether ``weights`` are for the builder's own ``weights=``: an mmdet-layout detector file or dict, or a
        published weights name of this entry."""
        if self.build.__name__ not in DETECTOR_ARCHS.values():
            return False
        if isinstance(weights, str) and not os.path.exists(weights):
            from .weights.hub import list_weights  # the published-weights table; read only for a name

            return weights in list_weights(self.name)
        return is_detector_file(weights, trust_pickle=bool(kwargs.get("trust_pickle", False)))


def _backbone(variant: str, **kwargs: Any) -> PVTv2Backbone:
    return PVTv2Backbone.from_config(variant, **kwargs)


# (name template, kind, builder, builder loads weights itself); "{v}" is the variant.
_FAMILIES: tuple[tuple[str, Kind, Callable[..., nn.Module], bool], ...] = (
    ("pvt_v2_{v}_backbone", "backbone", _backbone, True),
    ("pvt_v2_{v}", "classifier", build_classifier, True),
    ("fasterrcnn_pvt_v2_{v}_fpn", "detector", detection.fasterrcnn_pvt_v2_fpn, False),
    ("maskrcnn_pvt_v2_{v}_fpn", "detector", detection.maskrcnn_pvt_v2_fpn, False),
    ("keypointrcnn_pvt_v2_{v}_fpn", "detector", detection.keypointrcnn_pvt_v2_fpn, False),
    ("retinanet_pvt_v2_{v}_fpn", "detector", detection.retinanet_pvt_v2_fpn, False),
    ("fcos_pvt_v2_{v}_fpn", "detector", detection.fcos_pvt_v2_fpn, False),
    ("semantic_fpn_pvt_v2_{v}", "segmenter", semantic_fpn_pvt_v2, False),
)

MODELS: dict[str, ModelEntry] = {
    template.format(v=variant): ModelEntry(template.format(v=variant), kind, variant, build, in_builder)
    for template, kind, build, in_builder in _FAMILIES
    for variant in VARIANTS
}


def list_models(pattern: str | None = None, *, kind: str | None = None) -> list[str]:
    """Registered names, sorted, optionally filtered by a shell-style ``pattern`` and a ``kind``.

    Example:
        >>> list_models("pvt_v2_b2*")
        ['pvt_v2_b2', 'pvt_v2_b2_backbone', 'pvt_v2_b2_li', 'pvt_v2_b2_li_backbone']
        >>> len(list_models(kind="segmenter"))
        7
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    names = (name for name, entry in MODELS.items() if kind is None or entry.kind == kind)
    return sorted(name for name in names if pattern is None or fnmatch.fnmatchcase(name, pattern))


def create_model(name: str, *, weights: WeightsSource | None = None, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name``; ``kwargs`` go to its builder, ``weights`` are the whole model's.

    Example:
        >>> model = create_model("fasterrcnn_pvt_v2_b0_fpn", num_classes=3, min_size=128, max_size=160)
        >>> type(model).__name__, model.backbone.out_channels
        ('FasterRCNN', 256)
    """
    entry = MODELS.get(name) if isinstance(name, str) else None
    if entry is None:
        close = difflib.get_close_matches(str(name), MODELS, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see list_models()"
        raise ValueError(f"unknown model {name!r}{hint}")
    return entry.create(weights=weights, **kwargs)
