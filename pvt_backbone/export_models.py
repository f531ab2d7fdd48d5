"""Whole-model export: detectors and segmenters as one graph, normalisation and post-processing included.

:class:`ExportableDetector` wraps a torchvision detector built by :mod:`pvt_backbone.detection` (RetinaNet, FCOS,
Faster R-CNN, Mask R-CNN) and :class:`ExportableSegmenter` a :class:`~pvt_backbone.segmentation.PVTv2Segmenter`.
Both take the same input, and their graphs export with :func:`export_model_onnx` (ONNX, dynamo exporter) or
:func:`export_model_program` (``torch.export``).

Input contract: one (B, 3, H, W) float32 tensor of RGB images in [0, 1], already resized (and padded) by the caller
to the size the graph takes; height and width multiples of 32 (the detectors' padding multiple, so nothing is padded
inside). ImageNet normalisation happens inside the graph. The detectors do not resize: the wrapper is the eager
detector with its transform's resize switched off (:func:`eager_detections` runs exactly that reference).

Outputs (fixed size, K = the detector's ``detections_per_img``), sorted by descending score per image:

* ``boxes`` (B, K, 4) float xyxy in input pixels, ``scores`` (B, K) float, ``labels`` (B, K) int64,
  ``num_detections`` (B,) int64: rows at and after ``num_detections[b]`` are padding (score 0, label -1, box 0).
* Mask R-CNN adds ``masks`` (B, K, H, W) float probabilities pasted at input size (torchvision's paste: the 28x28
  mask padded by one pixel, the box enlarged to match, bilinear resize into the integer box), written here as two
  interpolation matrices per box instead of a Python loop over boxes.
* Segmenters: ``logits`` (B, num_classes, H, W) and ``labels`` (B, H, W) int64 (argmax).

What differs from the eager graph, and why: every data-dependent selection (score threshold, small-box removal,
``topk`` over however many candidates passed, NMS keeping a variable number of boxes) becomes a fixed-size tensor
plus a validity mask, so no output size depends on the data. NMS is the one operator torch cannot export as a
fixed-size computation: :func:`nms_mask` (``torch.ops.pvt_backbone.nms_mask``) is a custom operator whose eager
kernel is ``torchvision.ops.batched_nms`` and whose ONNX form is ``NonMaxSuppression`` (one class per group, invalid
candidates below its score threshold) followed by a ``ScatterND`` into the (B, N) keep mask. RoI pooling computes
every RoI at every pyramid level and keeps each RoI's own level (``torch.where``) instead of gathering a
data-dependent subset per level. Candidates beyond ``candidates`` per image are cut before the R-CNN box NMS; the
result equals the eager one whenever the eager NMS keeps ``detections_per_img`` boxes from those candidates or fewer
candidates pass the score threshold (always true at the defaults with a handful of classes).

Sizes: every wrapper exports with a dynamic batch, height and width by default, with sides from
:func:`min_dynamic_size`: torch.export needs every pyramid level at least 2x2 while tracing, so 160 px for
RetinaNet/FCOS (levels down to stride 128), 96 px for the R-CNNs (stride 64) and 64 px for segmenters. Two things make
that possible: RoI pooling takes each level's scale from the backbone's declared strides instead of dividing (symbolic)
map sizes, and ``resize_bilinear`` always interpolates while exporting instead of comparing sizes. Keypoint R-CNN is not
supported: its keypoint decoding resizes every RoI's heatmap to that box's own size, a data-dependent shape.

Example:
    >>> from pvt_backbone.detection import retinanet_pvt_v2_fpn
    >>> detector = retinanet_pvt_v2_fpn("b0", num_classes=3, min_size=64, max_size=64).eval()
    >>> boxes, scores, labels, count = ExportableDetector(detector)(torch.rand(2, 3, 64, 96))
    >>> tuple(boxes.shape), tuple(scores.shape), tuple(labels.shape), tuple(count.shape)
    ((2, 300, 4), (2, 300), (2, 300), (2,))
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign, batched_nms, roi_align
from torchvision.ops.boxes import clip_boxes_to_image
from torchvision.ops.poolers import LevelMapper

from .checks import check_float, check_int
from .detection import IMAGENET_MEAN, IMAGENET_STD
from .export import (
    DEFAULT_MIN_SIZE,
    Verification,
    _compare,
    _dynamic_shapes,
    _traceable,
    _write_atomically,
    _write_verified,
    load_program,
    onnxruntime_session,
)
from .segmentation import PVTv2Segmenter

__all__ = [
    "DETECTION_OUTPUTS",
    "MASK_OUTPUT",
    "SEGMENTATION_OUTPUTS",
    "ExportableDetector",
    "ExportableSegmenter",
    "exportable",
    "nms_mask",
    "eager_detections",
    "padded_to_list",
    "compare_detections",
    "export_model_program",
    "export_model_onnx",
    "onnx_translations",
    "output_names",
    "supports_dynamic_size",
    "verify_model_outputs",
    "export_verified_model_onnx",
    "save_verified_model_program",
    "min_dynamic_size",
]

DETECTION_OUTPUTS = ("boxes", "scores", "labels", "num_detections")
MASK_OUTPUT = "masks"
SEGMENTATION_OUTPUTS = ("logits", "labels")
# Score given to invalid candidates: below every real score (probabilities are >= 0), above nothing.
_INVALID = -1.0
_PAD_MULTIPLE = 32


@torch.library.custom_op("pvt_backbone::nms_mask", mutates_args=())
def nms_mask(
    boxes: Tensor, scores: Tensor, groups: Tensor, valid: Tensor, iou_threshold: float, num_groups: int
) -> Tensor:
    """Greedy NMS per image and group as a fixed-size mask: which of N candidates survive.

    Args:
        boxes: (B, N, 4) xyxy; scores: (B, N); groups: (B, N) int64 in ``[0, num_groups)`` (NMS runs within a group);
        valid: (B, N) bool, candidates that take part (the others neither survive nor suppress).
        iou_threshold: a candidate is dropped when its IoU with a kept, higher-scoring one exceeds this.

    Returns:
        (B, N) bool keep mask, the same set ``torchvision.ops.batched_nms`` keeps.
    """
    keep = torch.zeros_like(valid)
    for b in range(boxes.shape[0]):
        index = valid[b].nonzero().squeeze(1)
        kept = batched_nms(boxes[b, index], scores[b, index], groups[b, index], iou_threshold)
        keep[b, index[kept]] = True
    return keep


@nms_mask.register_fake
def _nms_mask_fake(
    boxes: Tensor, scores: Tensor, groups: Tensor, valid: Tensor, iou_threshold: float, num_groups: int
) -> Tensor:
    return torch.empty_like(valid)


def _nms_mask_onnx(boxes: Any, scores: Any, groups: Any, valid: Any, iou_threshold: float, num_groups: int) -> Any:
    """ONNX form of :func:`nms_mask`: ``NonMaxSuppression`` with one class per group, scattered into a mask."""
    from onnxscript import opset18 as op

    member = op.And(
        op.Cast(op.OneHot(groups, op.Constant(value_int=num_groups), [0, 1]), to=9), op.Unsqueeze(valid, [2])
    )
    class_scores = op.Transpose(
        op.Where(member, op.Unsqueeze(scores, [2]), op.Constant(value_float=_INVALID)), perm=[0, 2, 1]
    )
    limit = op.Constant(value_ints=[2**31 - 1])
    selected = op.NonMaxSuppression(
        boxes, class_scores, limit, op.Constant(value_floats=[iou_threshold]), op.Constant(value_floats=[_INVALID / 2])
    )
    shape = op.Shape(valid)
    count = op.Slice(shape, [1], [2])
    flat = op.Add(op.Mul(op.Slice(selected, [0], [1], [1]), count), op.Slice(selected, [2], [3], [1]))
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(op.Squeeze(flat, [1])))
    zeros = op.Expand(op.Constant(value_float=0.0), op.ReduceProd(shape, keepdims=1))
    return op.Cast(op.Reshape(op.ScatterND(zeros, flat, ones), shape), to=9)


def onnx_translations() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export``: the ONNX form of :func:`nms_mask`."""
    return {torch.ops.pvt_backbone.nms_mask.default: _nms_mask_onnx}


def _padded_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` of (B, M) scores for any M: padded with invalid entries, indices clamped into ``[0, M)``."""
    padding = scores.new_full((scores.shape[0], k), _INVALID)
    values, index = torch.cat([scores, padding], dim=1).topk(k, dim=1)
    return values, index.clamp(max=scores.shape[1] - 1)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """(B, M, D) rows picked by (B, k) indices -> (B, k, D)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _clip(boxes: Tensor, height: int, width: int) -> Tensor:
    return clip_boxes_to_image(boxes, (height, width))


def _not_small(boxes: Tensor, min_size: float) -> Tensor:
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def _select(
    boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor, *, iou: float, num_groups: int, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """NMS within each label, then the ``k`` best survivors per image, padded (see the module docstring)."""
    keep = nms_mask(boxes, scores, labels, valid, iou, num_groups)
    values, index = _padded_topk(torch.where(keep, scores, _INVALID), k)
    found = values > _INVALID
    out_boxes = torch.where(found.unsqueeze(-1), _gather(boxes, index), 0.0)
    out_labels = torch.where(found, torch.gather(labels, 1, index), -1)
    return out_boxes, torch.where(found, values, 0.0), out_labels, found.sum(dim=1)


class ExportableDetector(nn.Module):
    """A torchvision detector as a fixed-output graph: (B, 3, H, W) RGB in [0, 1] -> ``boxes`` (B, K, 4),
    ``scores`` (B, K), ``labels`` (B, K), ``num_detections`` (B,) [, ``masks`` (B, K, H, W)] (module docstring).

    Args:
        detector: RetinaNet, FCOS, Faster R-CNN or Mask R-CNN (eval mode); its thresholds and limits are used.
        candidates: most class-box candidates per image entering the R-CNN box NMS.
    """

    def __init__(self, detector: nn.Module, *, candidates: int = 4096) -> None:
        super().__init__()
        if not isinstance(detector, (RetinaNet, FCOS, FasterRCNN)):
            raise TypeError(
                f"detector must be RetinaNet, FCOS, Faster R-CNN or Mask R-CNN, got {type(detector).__name__}"
            )
        if isinstance(detector, FasterRCNN) and getattr(detector.roi_heads, "keypoint_predictor", None) is not None:
            raise TypeError("Keypoint R-CNN is not exportable as a whole model; export its backbone instead")
        check_int("candidates", candidates, minimum=1)
        self.detector = detector
        self.candidates = candidates
        self.has_masks = isinstance(detector, MaskRCNN)
        transform = detector.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, -1, 1, 1), persistent=False)

    @property
    def dense(self) -> bool:
        """RetinaNet or FCOS (dense heads); otherwise an R-CNN."""
        return isinstance(self.detector, (RetinaNet, FCOS))

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        x = (images - self.mean) / self.std
        features = list(self.detector.backbone(x).values())
        if self.dense:
            return self._dense(x, features)
        return self._rcnn(x, features)

    def _anchors(self, generator: nn.Module, x: Tensor, features: list[Tensor]) -> Tensor:
        """(sum_l H_l W_l A, 4) anchors of one image (every image of the batch has the same size and anchors)."""
        image_list = ImageList(x[:1], [(x.shape[-2], x.shape[-1])])
        return generator(image_list, [f[:1] for f in features])[0]

    def _dense(self, x: Tensor, features: list[Tensor]) -> tuple[Tensor, ...]:
        det = self.detector
        head = det.head(features)
        per_location = det.anchor_generator.num_anchors_per_location()[0]
        counts = [f.shape[2] * f.shape[3] * per_location for f in features]
        anchors = self._anchors(det.anchor_generator, x, features).split(counts)
        logits = head["cls_logits"].split(counts, dim=1)
        deltas = head["bbox_regression"].split(counts, dim=1)
        ctrness = head["bbox_ctrness"].split(counts, dim=1) if "bbox_ctrness" in head else [None] * len(counts)
        parts = [self._dense_level(*level, x) for level in zip(logits, deltas, ctrness, anchors)]
        boxes, scores, labels, valid = (torch.cat(part, dim=1) for part in zip(*parts))
        num_classes = head["cls_logits"].shape[-1]
        return _select(
            boxes, scores, labels, valid, iou=det.nms_thresh, num_groups=num_classes, k=det.detections_per_img
        )

    def _dense_level(
        self, logits: Tensor, deltas: Tensor, ctrness: Tensor | None, anchors: Tensor, x: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One pyramid level: the ``topk_candidates`` best (anchor, class) pairs, decoded and clipped."""
        det = self.detector
        num_classes = logits.shape[-1]
        probs = torch.sigmoid(logits)
        if ctrness is not None:  # FCOS
            probs = torch.sqrt(probs * torch.sigmoid(ctrness))
        scores, index = _padded_topk(probs.flatten(1), det.topk_candidates)
        anchor_index = torch.div(index, num_classes, rounding_mode="floor")
        picked = _gather(deltas, anchor_index)
        picked_anchors = anchors[anchor_index]
        if isinstance(det, FCOS):
            boxes = det.box_coder.decode(picked, picked_anchors)
        else:
            boxes = det.box_coder.decode_single(picked.reshape(-1, 4), picked_anchors.reshape(-1, 4))
            boxes = boxes.reshape(picked.shape)
        boxes = _clip(boxes, x.shape[-2], x.shape[-1])
        return boxes, scores, index % num_classes, scores > det.score_thresh

    def _rcnn(self, x: Tensor, features: list[Tensor]) -> tuple[Tensor, ...]:
        heads = self.detector.roi_heads
        proposals, valid = self._proposals(x, features)
        named = dict(zip(self.detector.backbone.names, features))
        batch, count = proposals.shape[:2]
        pooled = self._roi_pool(heads.box_roi_pool, named, proposals, x)
        class_logits, regression = heads.box_predictor(heads.box_head(pooled))
        num_classes = class_logits.shape[-1]
        boxes = heads.box_coder.decode_single(regression, proposals.reshape(-1, 4)).reshape(
            batch, count, num_classes, 4
        )
        boxes = _clip(boxes, x.shape[-2], x.shape[-1])[:, :, 1:].reshape(batch, -1, 4)
        scores = F.softmax(class_logits, -1).reshape(batch, count, num_classes)[:, :, 1:].reshape(batch, -1)
        labels = torch.arange(1, num_classes, device=x.device).repeat(count).expand(batch, -1)
        ok = (valid.unsqueeze(-1).expand(-1, -1, num_classes - 1).reshape(batch, -1)) & (scores > heads.score_thresh)
        ok = ok & _not_small(boxes, 1e-2)
        top, index = _padded_topk(torch.where(ok, scores, _INVALID), min(self.candidates, scores.shape[1]))
        outputs = _select(
            _gather(boxes, index),
            top,
            torch.gather(labels, 1, index),
            top > _INVALID,
            iou=heads.nms_thresh,
            num_groups=num_classes,
            k=heads.detections_per_img,
        )
        if not self.has_masks:
            return outputs
        return (*outputs, self._masks(named, outputs[0], outputs[2], x))

    def _proposals(self, x: Tensor, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """RPN: (B, post_nms_top_n, 4) proposals and their (B, post_nms_top_n) validity."""
        rpn = self.detector.rpn
        objectness, deltas = rpn.head(features)
        anchors = self._anchors(rpn.anchor_generator, x, features)
        batch = x.shape[0]
        per_location = rpn.anchor_generator.num_anchors_per_location()[0]
        counts = [f.shape[2] * f.shape[3] * per_location for f in features]
        flat_scores = torch.cat([o.permute(0, 2, 3, 1).reshape(batch, -1) for o in objectness], dim=1)
        flat_deltas = torch.cat(
            [
                d.view(batch, per_location, 4, d.shape[2], d.shape[3]).permute(0, 3, 4, 1, 2).reshape(batch, -1, 4)
                for d in deltas
            ],
            dim=1,
        )
        boxes = rpn.box_coder.decode_single(flat_deltas.reshape(-1, 4), anchors.repeat(batch, 1)).reshape(batch, -1, 4)
        parts = []
        for level, (probs, level_boxes) in enumerate(
            zip(torch.sigmoid(flat_scores).split(counts, 1), boxes.split(counts, 1))
        ):
            top, index = _padded_topk(probs, rpn._pre_nms_top_n["testing"])
            picked = _clip(_gather(level_boxes, index), x.shape[-2], x.shape[-1])
            ok = (top > _INVALID) & _not_small(picked, rpn.min_size) & (top >= rpn.score_thresh)
            parts.append((picked, top, torch.full_like(index, level), ok))
        boxes, scores, levels, ok = (torch.cat(part, dim=1) for part in zip(*parts))
        keep = nms_mask(boxes, scores, levels, ok, rpn.nms_thresh, len(counts))
        top, index = _padded_topk(torch.where(keep, scores, _INVALID), rpn._post_nms_top_n["testing"])
        return _gather(boxes, index), top > _INVALID

    def _roi_pool(self, pool: MultiScaleRoIAlign, named: dict[str, Tensor], boxes: Tensor, x: Tensor) -> Tensor:
        """(B, R, 4) boxes -> (B * R, C, S, S): every RoI pooled at every level, each keeping its FPN level's."""
        maps = [named[name] for name in pool.featmap_names]
        # 1 / stride, from the backbone's declared strides: what MultiScaleRoIAlign infers from the map sizes, but
        # without arithmetic on (possibly symbolic) sizes, so the graph holds for every input size
        strides = dict(zip(self.detector.backbone.names, self.detector.backbone.strides))
        scales = [1.0 / strides[name] for name in pool.featmap_names]
        k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
        mapper = LevelMapper(k_min, k_max, canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)
        flat = boxes.reshape(-1, 4)
        image_index = torch.arange(boxes.shape[0], device=x.device).repeat_interleave(boxes.shape[1])
        rois = torch.cat([image_index.unsqueeze(1).to(flat.dtype), flat], dim=1)
        levels = mapper([flat]).view(-1, 1, 1, 1)
        result = None
        for level, (feature, scale) in enumerate(zip(maps, scales)):
            pooled = roi_align(feature, rois, pool.output_size, spatial_scale=scale, sampling_ratio=pool.sampling_ratio)
            result = pooled if result is None else torch.where(levels == level, pooled, result)
        assert result is not None
        return result

    def _masks(self, named: dict[str, Tensor], boxes: Tensor, labels: Tensor, x: Tensor) -> Tensor:
        """(B, K, H, W) mask probabilities of each detection's class, pasted at input size."""
        heads = self.detector.roi_heads
        batch, count = boxes.shape[:2]
        logits = heads.mask_predictor(heads.mask_head(self._roi_pool(heads.mask_roi_pool, named, boxes, x)))
        index = labels.clamp(min=0).reshape(-1, 1, 1, 1).expand(-1, 1, logits.shape[-2], logits.shape[-1])
        probs = torch.gather(logits, 1, index).sigmoid()[:, 0]
        return _paste_masks(probs, boxes.reshape(-1, 4), x.shape[-2], x.shape[-1]).reshape(
            batch, count, x.shape[-2], x.shape[-1]
        )


def _paste_axis(low: Tensor, high: Tensor, size: int, mask_size: int, device: torch.device) -> Tensor:
    """(R, size, mask_size) bilinear weights that resize a mask axis into the integer span [low, high] of an image axis.

    Matches ``F.interpolate(mode="bilinear", align_corners=False)`` onto the span (source clamped at 0, last index
    repeated), zero outside it.
    """
    length = (high - low + 1).clamp(min=1).to(torch.float32)
    offset = torch.arange(size, device=device).unsqueeze(0) - low.unsqueeze(1)
    source = ((offset.to(torch.float32) + 0.5) * (mask_size / length).unsqueeze(1) - 0.5).clamp(min=0.0)
    first = source.floor()
    weight = source - first
    first_index = first.to(torch.int64).clamp(max=mask_size - 1)
    second_index = (first_index + 1).clamp(max=mask_size - 1)
    columns = torch.arange(mask_size, device=device).view(1, 1, -1)
    matrix = (columns == first_index.unsqueeze(-1)).to(torch.float32) * (1 - weight).unsqueeze(-1)
    matrix = matrix + (columns == second_index.unsqueeze(-1)).to(torch.float32) * weight.unsqueeze(-1)
    inside = (offset >= 0) & (offset < length.to(torch.int64).unsqueeze(1))
    return matrix * inside.unsqueeze(-1).to(torch.float32)


def _paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """(R, M, M) probabilities in (R, 4) boxes -> (R, H, W), torchvision's ``paste_masks_in_image`` as matmuls."""
    size = masks.shape[-1]
    padded = F.pad(masks, (1, 1, 1, 1))
    scale = (size + 2) / size
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    center_x, center_y = (boxes[:, 2] + boxes[:, 0]) * 0.5, (boxes[:, 3] + boxes[:, 1]) * 0.5
    x0, x1 = (center_x - half_w).to(torch.int64), (center_x + half_w).to(torch.int64)
    y0, y1 = (center_y - half_h).to(torch.int64), (center_y + half_h).to(torch.int64)
    rows = _paste_axis(y0, y1, height, size + 2, masks.device)
    cols = _paste_axis(x0, x1, width, size + 2, masks.device)
    return rows @ padded @ cols.transpose(1, 2)


class ExportableSegmenter(nn.Module):
    """A :class:`PVTv2Segmenter` with ImageNet normalisation inside: (B, 3, H, W) RGB in [0, 1] -> ``logits``
    (B, num_classes, H, W) and ``labels`` (B, H, W) int64 (argmax of the stride-4 logits resized to H x W)."""

    def __init__(
        self, segmenter: PVTv2Segmenter, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        if not isinstance(segmenter, PVTv2Segmenter):
            raise TypeError(f"segmenter must be a PVTv2Segmenter, got {type(segmenter).__name__}")
        self.segmenter = segmenter
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.segmenter((images - self.mean) / self.std)
        return logits, logits.argmax(dim=1)


def exportable(model: nn.Module, *, candidates: int = 4096) -> nn.Module:
    """The whole-model wrapper of a detector or segmenter (eval mode); other modules are returned unchanged."""
    if isinstance(model, (ExportableDetector, ExportableSegmenter)):
        return model
    if isinstance(model, PVTv2Segmenter):
        return ExportableSegmenter(model).eval()
    if isinstance(model, (RetinaNet, FCOS, FasterRCNN)):
        return ExportableDetector(model.eval(), candidates=candidates).eval()
    return model


def output_names(wrapper: nn.Module) -> list[str]:
    """The graph output names of a wrapper from :func:`exportable`."""
    if isinstance(wrapper, ExportableSegmenter):
        return list(SEGMENTATION_OUTPUTS)
    if isinstance(wrapper, ExportableDetector):
        return [*DETECTION_OUTPUTS, *([MASK_OUTPUT] if wrapper.has_masks else [])]
    raise TypeError(f"expected an ExportableDetector or ExportableSegmenter, got {type(wrapper).__name__}")


def min_dynamic_size(wrapper: nn.Module) -> int:
    """Smallest side a dynamic-size export of ``wrapper`` takes: the smallest multiple of 32 whose coarsest pyramid
    level (the detector backbone's largest declared stride) is at least 2 wide; 64 for segmenters.

    Example:
        >>> from pvt_backbone.detection import fasterrcnn_pvt_v2_fpn, retinanet_pvt_v2_fpn
        >>> builders = (retinanet_pvt_v2_fpn, fasterrcnn_pvt_v2_fpn)
        >>> [min_dynamic_size(exportable(build("b0", num_classes=3))) for build in builders]
        [160, 96]
    """
    if not isinstance(wrapper, ExportableDetector):
        return DEFAULT_MIN_SIZE
    coarsest = max(wrapper.detector.backbone.strides)
    return (coarsest // _PAD_MULTIPLE + 1) * _PAD_MULTIPLE


def supports_dynamic_size(wrapper: nn.Module) -> bool:
    """Whether the wrapper exports with a dynamic height and width: every detector and segmenter wrapper does."""
    return isinstance(wrapper, (ExportableDetector, ExportableSegmenter))


def _check_whole_example(wrapper: nn.Module, example: Tensor) -> None:
    if not isinstance(example, Tensor) or example.dim() != 4 or example.shape[1] != 3:
        shape = tuple(example.shape) if isinstance(example, Tensor) else type(example).__name__
        raise ValueError(f"example must be a (B, 3, H, W) tensor of RGB images in [0, 1], got {shape}")
    if isinstance(wrapper, ExportableDetector) and (
        example.shape[-2] % _PAD_MULTIPLE or example.shape[-1] % _PAD_MULTIPLE
    ):
        raise ValueError(
            f"detector inputs must have a height and width that are multiples of {_PAD_MULTIPLE}, got "
            f"{example.shape[-2]}x{example.shape[-1]}: resize or pad the images to such a size"
        )


def export_model_program(
    model: nn.Module,
    example: Tensor,
    *,
    dynamic_batch: bool = True,
    dynamic_size: bool | None = None,
    min_size: int | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export`` a detector or segmenter through :func:`exportable`.

    ``dynamic_size`` (height and width together) defaults to :func:`supports_dynamic_size`; ``example`` is a
    (B, 3, H, W) batch of RGB images in [0, 1], H and W multiples of 32 for detectors. ``min_size``, the smallest
    dynamic side, defaults to :func:`min_dynamic_size` (trace at that size or above).
    """
    wrapper = exportable(model)
    _check_whole_example(wrapper, example)
    dynamic = supports_dynamic_size(wrapper) if dynamic_size is None else dynamic_size
    if min_size is None:
        min_size = min_dynamic_size(wrapper)
    shapes = _dynamic_shapes(
        example, dynamic_batch=dynamic_batch, dynamic_height=dynamic, dynamic_width=dynamic, min_size=min_size
    )
    return torch.export.export(wrapper, (_traceable(example, dynamic_batch),), dynamic_shapes=shapes)


def export_model_onnx(
    model: nn.Module,
    example: Tensor,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    dynamic_size: bool | None = None,
    min_size: int | None = None,
) -> Path:
    """Export a detector or segmenter (through :func:`exportable`) to ONNX at ``path`` (``.onnx``, written atomically).

    Input ``image``; outputs named by :func:`output_names`. Uses torch's dynamo exporter with
    :func:`onnx_translations` for the NMS operator (``NonMaxSuppression``, opset 18).
    """
    onnx_program = _model_onnx_program(
        model, example, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size, min_size=min_size
    )
    return _write_atomically(path, ".onnx", onnx_program.save)


def _model_onnx_program(
    model: nn.Module, example: Tensor, *, dynamic_batch: bool, dynamic_size: bool | None, min_size: int | None
) -> Any:
    """The ONNX program of :func:`export_model_program`'s graph: input ``image``, :func:`output_names`, NMS
    translated by :func:`onnx_translations`."""
    program = export_model_program(
        model, example, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size, min_size=min_size
    )
    return torch.onnx.export(
        program,
        dynamo=True,
        input_names=["image"],
        output_names=output_names(exportable(model)),
        custom_translation_table=onnx_translations(),
        verbose=False,
    )


@contextlib.contextmanager
def _no_resize(detector: nn.Module, height: int, width: int) -> Iterator[None]:
    """The detector's transform set so that (height, width) images keep their size (scale factor exactly 1)."""
    transform = detector.transform
    saved = (transform.min_size, transform.max_size, getattr(transform, "fixed_size", None))
    transform.min_size, transform.max_size, transform.fixed_size = (min(height, width),), max(height, width), None
    try:
        yield
    finally:
        transform.min_size, transform.max_size, transform.fixed_size = saved


def eager_detections(detector: nn.Module, images: Tensor) -> list[dict[str, Tensor]]:
    """The eager detector's output on a (B, 3, H, W) batch at its own size (no resize): the reference an export
    of :class:`ExportableDetector` matches. One dict per image (``boxes``, ``scores``, ``labels`` [, ``masks``])."""
    if isinstance(detector, ExportableDetector):
        detector = detector.detector
    with torch.no_grad(), _no_resize(detector, images.shape[-2], images.shape[-1]):
        return detector.eval()(list(images))


def padded_to_list(outputs: Sequence[Any]) -> list[dict[str, Tensor]]:
    """Fixed-size detector outputs (``boxes``, ``scores``, ``labels``, ``num_detections`` [, ``masks``], any array
    type) -> torchvision's list of per-image dicts, ``masks`` as (N, 1, H, W)."""
    tensors = [torch.as_tensor(o) for o in outputs]
    boxes, scores, labels, counts = tensors[:4]
    result = []
    for b in range(boxes.shape[0]):
        n = int(counts[b])
        item = {"boxes": boxes[b, :n], "scores": scores[b, :n], "labels": labels[b, :n]}
        if len(tensors) > 4:
            item["masks"] = tensors[4][b, :n].unsqueeze(1)
        result.append(item)
    return result


def _match(want: dict[str, Tensor], got: dict[str, Tensor], atol: float) -> Tensor | None:
    """For each expected detection, the actual one with the same label and a score within ``atol`` whose box is
    nearest (equal scores may come out in either order); ``None`` when some detection has no partner."""
    close = (want["scores"].view(-1, 1) - got["scores"].view(1, -1)).abs() <= atol
    close &= want["labels"].view(-1, 1) == got["labels"].view(1, -1)
    distance = (want["boxes"].unsqueeze(1) - got["boxes"].unsqueeze(0)).abs().amax(dim=-1)
    match = torch.where(close, distance, float("inf")).argmin(dim=1)
    if not bool(close.gather(1, match.unsqueeze(1)).all()) or match.unique().numel() != match.numel():
        return None
    return match


def compare_detections(
    expected: list[dict[str, Tensor]], actual: list[dict[str, Tensor]], *, atol: float = 1e-3
) -> Verification:
    """Largest difference between two per-image detection lists (``boxes``, ``scores`` [, ``masks``]).

    Counts and labels must agree (else the difference is ``inf``); each expected detection is compared with the
    actual one of the same label and score (within ``atol``) whose box is nearest, since tied scores may be ordered
    differently.
    """
    check_float("atol", atol, minimum=0.0)
    worst = 0.0
    for want, got in zip(expected, actual, strict=True):
        want = {k: v.float() if v.is_floating_point() else v for k, v in want.items()}
        got = {
            k: torch.as_tensor(v).float() if torch.as_tensor(v).is_floating_point() else torch.as_tensor(v)
            for k, v in got.items()
        }
        if len(want["boxes"]) != len(got["boxes"]):
            return Verification((len(expected),), float("inf"), atol)
        if len(want["boxes"]) == 0:
            continue
        match = _match(want, got, atol)
        if match is None:
            return Verification((len(expected),), float("inf"), atol)
        for key in ("boxes", "scores", "masks"):
            if key in want:
                worst = max(worst, (want[key] - got[key][match]).abs().max().item())
    return Verification((len(expected),), worst, atol)


def verify_model_outputs(model: nn.Module, x: Tensor, outputs: Sequence[Any], *, atol: float = 1e-3) -> Verification:
    """Compare an export's outputs on ``x`` (in :func:`output_names` order, any array type) with the eager model:
    detectors through :func:`eager_detections` and :func:`compare_detections`, segmenters by their logits."""
    wrapper = exportable(model)
    if isinstance(wrapper, ExportableDetector):
        result = compare_detections(eager_detections(wrapper.detector, x), padded_to_list(outputs), atol=atol)
        return Verification(tuple(x.shape), result.max_abs_diff, atol)
    if isinstance(wrapper, ExportableSegmenter):
        with torch.no_grad():
            expected = wrapper(x)[0]
        return _compare([expected], [torch.as_tensor(outputs[0])], tuple(x.shape), atol)
    raise TypeError(f"expected a detector or segmenter, got {type(model).__name__}")


def export_verified_model_onnx(
    model: nn.Module,
    example: Tensor,
    x: Tensor,
    path: str | os.PathLike[str],
    *,
    atol: float = 1e-3,
    threads: int | None = None,
    dynamic_batch: bool = True,
    dynamic_size: bool | None = None,
    min_size: int | None = None,
) -> Verification:
    """:func:`export_model_onnx`, the file checked in onnxruntime on ``x`` (:func:`verify_model_outputs`) before it
    is renamed onto ``path``; a failed check leaves ``path`` as it was. Returns the check."""
    check_float("atol", atol, minimum=0.0)
    onnx_program = _model_onnx_program(
        model, example, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size, min_size=min_size
    )

    def verify(name: str) -> Verification:
        session = onnxruntime_session(name, threads=threads)
        return verify_model_outputs(model, x, session.run(None, {"image": x.numpy()}), atol=atol)

    return _write_verified(path, ".onnx", onnx_program.save, verify)


def save_verified_model_program(
    program: torch.export.ExportedProgram,
    path: str | os.PathLike[str],
    model: nn.Module,
    x: Tensor,
    *,
    atol: float = 1e-3,
) -> Verification:
    """Write a whole-model ``program`` to ``path`` (``.pt2``) only if the written file, loaded back, matches the
    eager ``model`` on ``x`` (:func:`verify_model_outputs`)."""
    check_float("atol", atol, minimum=0.0)

    def verify(name: str) -> Verification:
        with torch.no_grad():
            outputs = load_program(name).module()(x)
        return verify_model_outputs(model, x, outputs, atol=atol)

    return _write_verified(path, ".pt2", lambda name: torch.export.save(program, name), verify)
