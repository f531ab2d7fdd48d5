"""torchvision detectors that compute mmdetection's function: the pieces where mmdet and torchvision differ.

Each class below is a torchvision module (or a subclass of one) that reproduces one definitional difference, so an
mmdet RetinaNet / Faster R-CNN / Mask R-CNN checkpoint loaded into the detectors built here gives mmdet's outputs:

=====================  ===========================================  =============================================
piece                  mmdet (3.x and 2.x)                          torchvision default it replaces
=====================  ===========================================  =============================================
``MMDetAnchors``       float base anchors ``stride * scale`` with   integer-rounded base anchors; strides from
                       ratio h/w, centre offset 0; fixed strides    padded size // map size
``MMDetBoxCoder``      deltas * stds (+ means 0), log-ratio clip    deltas / weights (same clip)
                       ``|log(16 / 1000)|``
``P6P7FromC5``         P6 = conv(C5), P7 = conv(P6), no ReLU        P7 = conv(ReLU(P6))
``MMDetRoIAlign``      ``roi_align(aligned=True, sampling_ratio=    ``aligned=False, sampling_ratio=2`` and
                       0)``; level ``floor(log2(sqrt(wh) / 56 +     ``floor(4 + log2(sqrt(wh) / 224) + 1e-6)``
                       1e-6))`` clamped to the levels
``MMDetBoxPredictor``  ``cls_score`` (K + 1) with background LAST;  background first; (K + 1) x 4 deltas
                       ``bbox_pred`` K x 4 (no background rows)
``MMDetMaskPredictor`` K mask channels                              K + 1 (background channel 0)
``MMDetRetinaNet``     boxes with w or h <= 0 removed before NMS    kept
``MMDetRPN``           per-level top-k, boxes with w or h <= 0      ``remove_small_boxes(1e-3)``, score >= 0
                       removed, NMS 0.7 per level, 1000 kept
``MMDetRoIHeads``      no small-box removal                         ``remove_small_boxes(1e-2)``
=====================  ===========================================  =============================================

Both predictors hand torchvision's layout to the rest of the model (background logit first, zero background deltas
and mask channel), so torchvision's losses train the models unchanged; mmdet's label ``k`` is output label ``k + 1``
for the R-CNNs and ``k`` for RetinaNet. Inputs follow torchvision: a list of (3, H, W) RGB float images in [0, 1];
``GeneralizedRCNNTransform`` normalises with mmdet's mean/std (``MMDET_MEAN``/``MMDET_STD`` / 255), resizes to
``min_size=800, max_size=1333`` (mmdet's ``Resize(scale=(1333, 800), keep_ratio=True)`` factor) and zero-pads to a
multiple of 32 bottom/right, as mmdet's ``DetDataPreprocessor``. mmdet resizes the uint8 image with cv2 and rounds the
new size to the nearest pixel, torchvision interpolates the float image and floors it: for bit-level agreement resize
outside and pass ``min_size``/``max_size`` equal to the image's sides (scale 1 is an exact copy).

Mask pasting is not reproduced: torchvision's ``paste_masks_in_image`` pastes the 28 x 28 probabilities into a box
grown by one pixel and rounded to integers, mmdet's ``_do_paste_mask`` samples them with ``grid_sample`` over the exact
float box, so the binary masks differ at their borders while the mask logits are equal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign, batched_nms, roi_align
from torchvision.ops import boxes as box_ops

from heads.fpn import P6P7Block

__all__ = [
    "MMDET_MEAN",
    "MMDET_STD",
    "RETINANET_SCALES",
    "RCNN_STDS",
    "MMDetAnchors",
    "MMDetBoxCoder",
    "P6P7FromC5",
    "MMDetRoIAlign",
    "MMDetBoxPredictor",
    "MMDetMaskPredictor",
    "MMDetRetinaNet",
    "MMDetRPN",
    "MMDetRoIHeads",
    "mmdet_retinanet",
    "mmdet_rcnn",
]

# mmdet's DetDataPreprocessor statistics on 0-255 RGB.
MMDET_MEAN = (123.675, 116.28, 103.53)
MMDET_STD = (58.395, 57.12, 57.375)
# RetinaNet anchors: octave_base_scale 4, scales_per_octave 3.
RETINANET_SCALES = tuple(4 * 2 ** (k / 3) for k in range(3))
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)
_RATIOS = (0.5, 1.0, 2.0)
_WH_RATIO_CLIP = 16 / 1000
_RCNN_STRIDES = (4, 8, 16, 32)
_FINEST_SCALE = 56


class MMDetAnchors(AnchorGenerator):
    """mmdet's ``AnchorGenerator``: per-level float base anchors and fixed strides -> (sum_l H_l W_l A, 4) per image.

    Level ``l`` has base size ``strides[l]``; its ``A = len(ratios) * len(scales)`` base anchors (ratios outer,
    scales inner, ratio = h / w) are ``[-w/2, -h/2, w/2, h/2]`` with ``w = stride / sqrt(r) * s``, ``h = stride *
    sqrt(r) * s``, unrounded, centred on ``(x * stride, y * stride)`` (centre offset 0).

    Example:
        >>> anchor = MMDetAnchors((8, 16), RETINANET_SCALES).cell_anchors[0][1]  # ratio 0.5, scale 4 * 2 ** (1/3)
        >>> [round(v, 3) for v in anchor.tolist()]
        [-28.509, -14.254, 28.509, 14.254]
    """

    def __init__(self, strides: Sequence[int], scales: Sequence[float], ratios: Sequence[float] = _RATIOS) -> None:
        sizes = tuple(tuple(stride * s for s in scales) for stride in strides)
        super().__init__(sizes, (tuple(ratios),) * len(strides))
        self.strides = tuple(int(s) for s in strides)
        self.cell_anchors = [self._base_anchors(stride, scales, ratios) for stride in self.strides]

    @staticmethod
    def _base_anchors(stride: int, scales: Sequence[float], ratios: Sequence[float]) -> Tensor:
        h_ratios = torch.sqrt(torch.tensor(ratios, dtype=torch.float32))
        w_ratios = 1 / h_ratios
        scale = torch.tensor(scales, dtype=torch.float32)
        ws = (stride * w_ratios[:, None] * scale[None, :]).reshape(-1)
        hs = (stride * h_ratios[:, None] * scale[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """Anchors of every level, highest resolution first, as ``AnchorGenerator.forward`` returns them."""
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for anchors of {len(self.strides)} strides")
        device = feature_maps[0].device
        self.set_cell_anchors(feature_maps[0].dtype, device)
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        levels = self.grid_anchors(grid_sizes, strides)  # type: ignore[arg-type]
        return [torch.cat(levels) for _ in image_list.image_sizes]


class MMDetBoxCoder(BoxCoder):
    """mmdet's ``DeltaXYWHBBoxCoder`` (means 0): decodes ``deltas * stds`` around each box's centre.

    Encoding (training targets) is torchvision's with ``weights = 1 / stds``, the same targets. Clipping to the image
    stays with the callers (torchvision clips every decoded box to the resized image, as mmdet's ``clip_border``).
    """

    def __init__(self, stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> None:
        self.stds = tuple(float(s) for s in stds)
        super().__init__(tuple(1 / s for s in self.stds), bbox_xform_clip=abs(math.log(_WH_RATIO_CLIP)))

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """(N, 4k) deltas and (N, 4) xyxy boxes -> (N, 4k) xyxy boxes."""
        boxes = boxes.to(rel_codes.dtype)
        deltas = rel_codes.reshape(len(rel_codes), rel_codes.shape[-1] // 4, 4) * rel_codes.new_tensor(self.stds)
        centre = ((boxes[:, :2] + boxes[:, 2:]) * 0.5)[:, None]
        size = (boxes[:, 2:] - boxes[:, :2])[:, None]
        centre = centre + size * deltas[..., :2]
        size = size * deltas[..., 2:].clamp(min=-self.bbox_xform_clip, max=self.bbox_xform_clip).exp()
        return torch.cat([centre - size * 0.5, centre + size * 0.5], dim=-1).reshape(rel_codes.shape)


class P6P7FromC5(P6P7Block):
    """mmdet's ``add_extra_convs="on_input"`` levels: P6 = conv3x3/2(C5), P7 = conv3x3/2(P6) without a ReLU between.

    Example:
        >>> block = P6P7FromC5(256, c5_channels=512)
        >>> [tuple(t.shape[-2:]) for t in block([torch.rand(1, 256, 7, 9)], [torch.rand(1, 512, 7, 9)], ["3"])[0]]
        [(7, 9), (4, 5), (2, 3)]
    """

    def __init__(self, out_channels: int, *, c5_channels: int) -> None:
        super().__init__(out_channels, source="c5", c5_channels=c5_channels)

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        """Append P6 = conv(``x[-1]``) and P7 = conv(P6) to ``results`` (FPN outputs)."""
        p6 = self.p6(x[-1])
        return [*results, p6, self.p7(p6)], [*names, "p6", "p7"]


class MMDetRoIAlign(MultiScaleRoIAlign):
    """mmdet's ``SingleRoIExtractor``: each box pooled from level ``floor(log2(sqrt(wh) / 56 + 1e-6))``, clamped.

    ``forward(features, boxes, image_shapes)`` -> (sum_i N_i, C, S, S), boxes in input-pixel xyxy, pooled with
    ``roi_align(aligned=True, sampling_ratio=0)`` at ``spatial_scale = 1 / strides[level]``.
    """

    def __init__(
        self, featmap_names: Sequence[str], output_size: int, *, strides: Sequence[int] = _RCNN_STRIDES
    ) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio=0)
        if len(strides) != len(featmap_names):
            raise ValueError(f"one stride per feature map: {list(featmap_names)} vs strides {list(strides)}")
        self.strides = tuple(int(s) for s in strides)
        self.finest_scale = _FINEST_SCALE

    def levels(self, rois: Tensor) -> Tensor:
        """(N, 5) rois (batch index, x1, y1, x2, y2) -> (N,) level indices."""
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        level = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return level.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(  # type: ignore[override]
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
        size = self.output_size if isinstance(self.output_size, (tuple, list)) else (self.output_size,) * 2
        out = features[0].new_zeros((len(rois), features[0].shape[1], *size))
        levels = self.levels(rois)
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            index = torch.where(levels == level)[0]
            if len(index):
                pooled = roi_align(feature, rois[index], size, 1 / stride, sampling_ratio=0, aligned=True)
                out[index] = pooled.to(out.dtype)
        return out


class MMDetBoxPredictor(nn.Module):
    """mmdet's ``fc_cls`` / ``fc_reg`` -> torchvision's layout: (N, rep) -> logits (N, K + 1), deltas (N, (K + 1) * 4).

    ``cls_score`` holds mmdet's K + 1 logits (background last) and ``bbox_pred`` K x 4 class-specific deltas; the
    output puts the background logit first and a zero background delta row in front, so output label ``k + 1`` is
    mmdet's class ``k``.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes  # K, without the background
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        logits = self.cls_score(x)
        deltas = self.bbox_pred(x)
        return torch.cat([logits[:, -1:], logits[:, :-1]], dim=1), torch.cat([deltas.new_zeros(len(x), 4), deltas], 1)


class MMDetMaskPredictor(nn.Module):
    """mmdet's ``FCNMaskHead`` tail: 2x2/2 deconv + ReLU, 1x1 conv to K channels; output (N, K + 1, 2S, 2S).

    Channel 0 of the output is zeros (torchvision's background channel), channel ``k + 1`` mmdet's class ``k``.
    """

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.mask_fcn_logits(F.relu(self.conv5_mask(x)))
        return torch.cat([logits.new_zeros((len(x), 1, *logits.shape[-2:])), logits], dim=1)


def _drop_empty(boxes: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """mmdet's ``min_bbox_size=0``: keep boxes with width and height > 0."""
    keep = torch.where((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))[0]
    return tuple(t[keep] for t in (boxes, *others))


class MMDetRetinaNet(RetinaNet):
    """RetinaNet with mmdet's test-time selection: per level the top ``topk_candidates`` sigmoid scores above
    ``score_thresh``, decoded and clipped; boxes with w or h <= 0 removed; class-wise NMS; ``detections_per_img``."""

    def postprocess_detections(
        self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        detections = []
        for index, (anchors_per_image, shape) in enumerate(zip(anchors, image_shapes)):
            boxes, scores, labels = [], [], []
            for deltas, logits, level_anchors in zip(
                head_outputs["bbox_regression"], head_outputs["cls_logits"], anchors_per_image
            ):
                flat = torch.sigmoid(logits[index]).flatten()
                candidates = torch.where(flat > self.score_thresh)[0]
                top, order = flat[candidates].topk(min(self.topk_candidates, len(candidates)))
                candidates = candidates[order]
                anchor_index = torch.div(candidates, logits.shape[-1], rounding_mode="floor")
                decoded = self.box_coder.decode_single(deltas[index][anchor_index], level_anchors[anchor_index])
                boxes.append(box_ops.clip_boxes_to_image(decoded, shape))
                scores.append(top)
                labels.append(candidates % logits.shape[-1])
            image_boxes, image_scores, image_labels = _drop_empty(
                torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            )
            keep = batched_nms(image_boxes, image_scores, image_labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": image_boxes[keep], "scores": image_scores[keep], "labels": image_labels[keep]})
        return detections


class MMDetRPN(RegionProposalNetwork):
    """RPN with mmdet's proposal selection: per level the top ``pre_nms_top_n`` objectness, decoded and clipped,
    boxes with w or h <= 0 removed, NMS per level, the best ``post_nms_top_n`` kept (no score threshold)."""

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [
                torch.full((n,), i, dtype=torch.int64, device=proposals.device)
                for i, n in enumerate(num_anchors_per_level)
            ]
        ).expand_as(objectness)
        top = self._get_top_n_idx(objectness, num_anchors_per_level)
        rows = torch.arange(num_images, device=proposals.device)[:, None]
        objectness, levels, proposals = objectness[rows, top], levels[rows, top], proposals[rows, top]
        final_boxes, final_scores = [], []
        for boxes, scores, level, shape in zip(proposals, torch.sigmoid(objectness), levels, image_shapes):
            boxes, scores, level = _drop_empty(box_ops.clip_boxes_to_image(boxes, shape), scores, level)
            keep = batched_nms(boxes, scores, level, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores


class MMDetRoIHeads(RoIHeads):
    """R-CNN RoI heads with mmdet's test-time selection: softmax, class-specific decode and clip, scores above
    ``score_thresh`` (background dropped), class-wise NMS, ``detections_per_img``; no small-box removal."""

    def postprocess_detections(
        self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        counts = [len(p) for p in proposals]
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, shape in zip(
            self.box_coder.decode(box_regression, proposals).split(counts),
            F.softmax(class_logits, -1).split(counts),
            image_shapes,
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, scores.shape[1], device=scores.device).repeat(len(scores))
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels


def _transform_defaults(kwargs: dict) -> dict:
    kwargs.setdefault("image_mean", [m / 255 for m in MMDET_MEAN])
    kwargs.setdefault("image_std", [s / 255 for s in MMDET_STD])
    kwargs.setdefault("min_size", 800)
    kwargs.setdefault("max_size", 1333)
    return kwargs


def mmdet_retinanet(backbone: nn.Module, num_classes: int, **kwargs: object) -> MMDetRetinaNet:
    """mmdet's published RetinaNet head and test settings on a ``PVTv2FPN`` with levels 1, 2, 3, p6, p7.

    The FPN's extra block becomes ``P6P7FromC5``; anchors are ``MMDetAnchors(strides 8..128, RETINANET_SCALES)``;
    test settings ``score_thresh=0.05``, ``topk_candidates=1000``, ``nms_thresh=0.5``, ``detections_per_img=100``
    unless given in ``kwargs`` (``RetinaNet`` options). Labels are mmdet's 0..K-1.
    """
    fpn = backbone.fpn  # type: ignore[union-attr]
    fpn.extra_blocks = P6P7FromC5(fpn.out_channels, c5_channels=fpn.in_channels[-1])
    kwargs.setdefault("anchor_generator", MMDetAnchors((8, 16, 32, 64, 128), RETINANET_SCALES))
    for key, value in (("score_thresh", 0.05), ("topk_candidates", 1000), ("nms_thresh", 0.5)):
        kwargs.setdefault(key, value)
    kwargs.setdefault("detections_per_img", 100)
    model = MMDetRetinaNet(backbone, num_classes, **_transform_defaults(kwargs))  # type: ignore[arg-type]
    model.box_coder = MMDetBoxCoder()
    return model


def _rcnn_parts(channels: int, num_classes: int, representation: int, mask_channels: int | None) -> dict:
    parts: dict[str, nn.Module] = {
        "rpn_anchor_generator": MMDetAnchors((4, 8, 16, 32, 64), (8.0,)),
        "box_roi_pool": MMDetRoIAlign(["0", "1", "2", "3"], 7),
        "box_head": TwoMLPHead(channels * 7 * 7, representation),
        "box_predictor": MMDetBoxPredictor(representation, num_classes),
    }
    if mask_channels is not None:
        parts["mask_roi_pool"] = MMDetRoIAlign(["0", "1", "2", "3"], 14)
        parts["mask_head"] = MaskRCNNHeads(channels, [mask_channels] * 4, 1)
        parts["mask_predictor"] = MMDetMaskPredictor(mask_channels, mask_channels, num_classes)
    return parts


def mmdet_rcnn(
    backbone: nn.Module,
    num_classes: int,
    *,
    representation_size: int = 1024,
    mask_channels: int | None = 256,
    **kwargs: object,
) -> FasterRCNN:
    """mmdet's published Faster R-CNN (``mask_channels=None``) or Mask R-CNN on a ``PVTv2FPN`` (levels 0-3, pool).

    ``num_classes`` is K, without the background (mmdet's ``num_classes``); output labels are 1..K. RPN: anchors
    ``MMDetAnchors(strides 4..64, scale 8)``, 1000 per level before and 1000 after NMS 0.7 at test time. R-CNN:
    ``Shared2FCBBoxHead`` (``TwoMLPHead`` of ``representation_size``), stds ``RCNN_STDS``, score 0.05, NMS 0.5, 100
    per image; mask head 4 convs of ``mask_channels``. ``kwargs`` are ``FasterRCNN`` / ``MaskRCNN`` options.
    """
    channels = int(backbone.out_channels)  # type: ignore[arg-type]
    defaults = {
        "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_test": 1000,
        "rpn_nms_thresh": 0.7,
        "box_score_thresh": 0.05,
        "box_nms_thresh": 0.5,
        "box_detections_per_img": 100,
    }
    options = {**defaults, **_rcnn_parts(channels, num_classes, representation_size, mask_channels), **kwargs}
    model_cls = FasterRCNN if mask_channels is None else MaskRCNN
    model = model_cls(backbone, None, **_transform_defaults(options))  # type: ignore[arg-type]
    model.rpn.__class__ = MMDetRPN  # same state, mmdet's proposal selection
    model.rpn.box_coder = MMDetBoxCoder()
    model.roi_heads.__class__ = MMDetRoIHeads
    model.roi_heads.box_coder = MMDetBoxCoder(RCNN_STDS)
    return model
