"""mmdetection detector checkpoints <-> our torchvision detectors: literal key tables and pure functions over dicts.

Every neck and head key of an mmdet (2.x or 3.x) PVTv2 RetinaNet, Faster R-CNN or Mask R-CNN is one row of
``NECK_HEAD_RULES``: an mmdet module prefix and the module of ours holding the same tensor (identical shapes: mmdet's
``fc_cls`` keeps the background last and ``fc_reg`` has no background rows; ``pvt_backbone.mmdet_compat`` gives the
modules those layouts). Backbone keys (``backbone.*``) go through ``pvt_backbone.weights.layouts`` (mmdet's own PVTv2
layout or the authors' ``pvt`` layout of whai362/PVT detection checkpoints) and become ``backbone.body.*``.

Keys matching no row and no backbone rule are an error; the mask head of a Mask R-CNN file converted for a Faster
R-CNN is dropped and reported.

================================  ==========================================  ============
mmdet prefix                      ours                                        detectors
================================  ==========================================  ============
``neck.lateral_convs.{i}.conv.``  ``backbone.fpn.inner_blocks.{i}.0.``        all
``neck.fpn_convs.{i}.conv.``      ``backbone.fpn.layer_blocks.{i}.0.``        all (i < levels)
``neck.fpn_convs.{3,4}.conv.``    ``backbone.fpn.extra_blocks.p6.`` / ``p7.``  RetinaNet
``bbox_head.cls_convs.{i}.conv.`` ``head.classification_head.conv.{i}.0.``    RetinaNet
``bbox_head.reg_convs.{i}.conv.`` ``head.regression_head.conv.{i}.0.``        RetinaNet
``bbox_head.retina_cls.`` / reg   ``head.classification_head.cls_logits.`` /  RetinaNet
                                  ``head.regression_head.bbox_reg.``
``rpn_head.rpn_{conv,cls,reg}.``  ``rpn.head.{conv.0.0,cls_logits,bbox_pred}.``  R-CNNs
``roi_head.bbox_head.shared_fcs``  ``roi_heads.box_head.fc6/fc7.``             R-CNNs
``roi_head.bbox_head.fc_{cls,reg}``  ``roi_heads.box_predictor.{cls_score,bbox_pred}.``  R-CNNs
``roi_head.mask_head.*``          ``roi_heads.mask_head.{i}.0.``,             Mask R-CNN
                                  ``roi_heads.mask_predictor.*``
================================  ==========================================  ============

Example:
    >>> sd = {"neck.lateral_convs.0.conv.weight": torch.zeros(4, 8, 1, 1), "bbox_head.retina_cls.bias": torch.zeros(9)}
    >>> neck_head_to_ours(sd, "retinanet").state_dict.keys()
    dict_keys(['backbone.fpn.inner_blocks.0.0.weight', 'head.classification_head.cls_logits.bias'])
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from .layouts import SHOWN, CheckpointError, DroppedKey

__all__ = [
    "DETECTOR_ARCHS",
    "DetectorRule",
    "NECK_HEAD_RULES",
    "DetectorConversion",
    "detector_arch",
    "neck_head_to_ours",
    "neck_head_to_mmdet",
]

DETECTOR_ARCHS = ("retinanet", "fasterrcnn", "maskrcnn")
_ALL = frozenset(DETECTOR_ARCHS)
_RCNN = frozenset({"fasterrcnn", "maskrcnn"})
_RETINA = frozenset({"retinanet"})
_MASK = frozenset({"maskrcnn"})


@dataclass(frozen=True)
class DetectorRule:
    """One module: mmdet prefix <-> our prefix (``{i}`` = an index kept as is), for the listed detectors."""

    mmdet: str
    ours: str
    archs: frozenset[str]


NECK_HEAD_RULES: tuple[DetectorRule, ...] = (
    DetectorRule("neck.lateral_convs.{i}.conv.", "backbone.fpn.inner_blocks.{i}.0.", _ALL),
    DetectorRule("neck.fpn_convs.3.conv.", "backbone.fpn.extra_blocks.p6.", _RETINA),
    DetectorRule("neck.fpn_convs.4.conv.", "backbone.fpn.extra_blocks.p7.", _RETINA),
    DetectorRule("neck.fpn_convs.{i}.conv.", "backbone.fpn.layer_blocks.{i}.0.", _ALL),
    DetectorRule("bbox_head.cls_convs.{i}.conv.", "head.classification_head.conv.{i}.0.", _RETINA),
    DetectorRule("bbox_head.reg_convs.{i}.conv.", "head.regression_head.conv.{i}.0.", _RETINA),
    DetectorRule("bbox_head.retina_cls.", "head.classification_head.cls_logits.", _RETINA),
    DetectorRule("bbox_head.retina_reg.", "head.regression_head.bbox_reg.", _RETINA),
    DetectorRule("rpn_head.rpn_conv.", "rpn.head.conv.0.0.", _RCNN),
    DetectorRule("rpn_head.rpn_cls.", "rpn.head.cls_logits.", _RCNN),
    DetectorRule("rpn_head.rpn_reg.", "rpn.head.bbox_pred.", _RCNN),
    DetectorRule("roi_head.bbox_head.shared_fcs.0.", "roi_heads.box_head.fc6.", _RCNN),
    DetectorRule("roi_head.bbox_head.shared_fcs.1.", "roi_heads.box_head.fc7.", _RCNN),
    DetectorRule("roi_head.bbox_head.fc_cls.", "roi_heads.box_predictor.cls_score.", _RCNN),
    DetectorRule("roi_head.bbox_head.fc_reg.", "roi_heads.box_predictor.bbox_pred.", _RCNN),
    DetectorRule("roi_head.mask_head.convs.{i}.conv.", "roi_heads.mask_head.{i}.0.", _MASK),
    DetectorRule("roi_head.mask_head.upsample.", "roi_heads.mask_predictor.conv5_mask.", _MASK),
    DetectorRule("roi_head.mask_head.conv_logits.", "roi_heads.mask_predictor.mask_fcn_logits.", _MASK),
)
# In a Mask R-CNN file read for a Faster R-CNN these are dropped (and reported), not an error.
_MASK_PREFIX = "roi_head.mask_head."
_PARAMS = ("weight", "bias")


def _regex(template: str) -> re.Pattern[str]:
    body = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(body + r"(?P<param>weight|bias)$")


_FORWARD = tuple((_regex(rule.mmdet), rule) for rule in NECK_HEAD_RULES)
_BACKWARD = tuple((_regex(rule.ours), rule) for rule in NECK_HEAD_RULES)


@dataclass(frozen=True)
class DetectorConversion:
    """Neck and head tensors renamed for the other side, plus the file entries left out and why."""

    state_dict: dict[str, Tensor]
    dropped: tuple[DroppedKey, ...] = ()


def detector_arch(keys: Mapping[str, object] | list[str]) -> str:
    """``"retinanet"``, ``"maskrcnn"`` or ``"fasterrcnn"`` from an mmdet detector's keys (backbone excluded).

    Raises:
        CheckpointError: keys of none of these detectors.
    """
    names = list(keys)
    if any(k.startswith("bbox_head.retina_cls.") for k in names):
        return "retinanet"
    if any(k.startswith("roi_head.bbox_head.") for k in names):
        return "maskrcnn" if any(k.startswith(_MASK_PREFIX) for k in names) else "fasterrcnn"
    shown = ", ".join(names[:SHOWN]) or "none"
    raise CheckpointError(
        "not an mmdet RetinaNet / Faster R-CNN / Mask R-CNN checkpoint: no 'bbox_head.retina_cls.*' nor "
        f"'roi_head.bbox_head.*' keys (neck/head keys: {shown})"
    )


def _rename(key: str, table: tuple, arch: str, *, to_ours: bool) -> str | None:
    for pattern, rule in table:
        match = pattern.fullmatch(key)
        if match and arch in rule.archs:
            target = rule.ours if to_ours else rule.mmdet
            if "{i}" in target:
                target = target.replace("{i}", match["i"])
            return target + match["param"]
    return None


def _unmapped_error(keys: list[str], arch: str, direction: str) -> CheckpointError:
    shown = ", ".join(keys[:SHOWN]) + (" ..." if len(keys) > SHOWN else "")
    return CheckpointError(f"{len(keys)} {direction} key(s) match no row of the {arch} key table: {shown}")


def neck_head_to_ours(state_dict: Mapping[str, Tensor], arch: str) -> DetectorConversion:
    """mmdet neck/head keys (``neck.*``, ``bbox_head.*``, ``rpn_head.*``, ``roi_head.*``) -> our detector keys.

    ``arch`` is the detector built (``DETECTOR_ARCHS``); for ``"fasterrcnn"`` a file's ``roi_head.mask_head.*`` are
    dropped. Tensors are passed through unchanged (the same objects).

    Raises:
        CheckpointError: a key no row maps for ``arch``.
    """
    out, dropped, unmapped = {}, [], []
    for key, tensor in state_dict.items():
        target = _rename(key, _FORWARD, arch, to_ours=True)
        if target is not None:
            out[target] = tensor
        elif arch == "fasterrcnn" and key.startswith(_MASK_PREFIX):
            dropped.append(DroppedKey(key, "mask head of a Mask R-CNN file; a Faster R-CNN has none"))
        else:
            unmapped.append(key)
    if unmapped:
        raise _unmapped_error(unmapped, arch, "mmdet")
    return DetectorConversion(out, tuple(dropped))


def neck_head_to_mmdet(state_dict: Mapping[str, Tensor], arch: str) -> DetectorConversion:
    """Our detector's neck/head keys (everything but ``backbone.body.*``) -> mmdet keys; inverse of the above.

    Raises:
        CheckpointError: a key no row maps for ``arch``.
    """
    out, unmapped = {}, []
    for key, tensor in state_dict.items():
        target = _rename(key, _BACKWARD, arch, to_ours=False)
        if target is None:
            unmapped.append(key)
        else:
            out[target] = tensor
    if unmapped:
        raise _unmapped_error(unmapped, arch, "torchvision")
    return DetectorConversion(out)
