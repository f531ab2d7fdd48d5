"""Exported whole models (``pvt-export --checkpoint RUN --model ...``) behind the eager models' call conventions, so
that :func:`~pvt_backbone.training.inference.predict` runs them unchanged (``pvt-predict --runtime``).

An export takes (N, 3, H, W) RGB in [0, 1] at the size it was exported at (see :mod:`pvt_backbone.export_models`).
:class:`ExportedDetector` fits each image into that size keeping its aspect ratio, padded at the bottom and right with
the ImageNet mean (zero once the graph normalises, as torchvision's batching pads normalised images), and maps boxes
(clipped to the input) and masks back to the input's pixels. An image that the eager detector resizes to the
exported size (e.g. an export at the run's square image size, of square scenes) gives the eager detector's
detections; where padding is needed they come close but not equal, because the graph clips proposals and boxes to
its padded input where the eager model clips them to the image. :class:`ExportedSegmenter` takes
ImageNet-normalised images as ``PVTv2Segmenter`` does and returns logits at their size.

Example:
    A tiny Faster R-CNN exported to ONNX at 64x64, then called like the eager detector on a 50x70 image:

    >>> from pvt_backbone.detection import fasterrcnn_pvt_v2_fpn
    >>> from pvt_backbone.export_models import export_model_onnx
    >>> eager = fasterrcnn_pvt_v2_fpn("b0", num_classes=3, min_size=64, max_size=64).eval()
    >>> path = export_model_onnx(eager, torch.rand(1, 3, 64, 64), "det.onnx", dynamic_size=False)
    >>> model = ExportedDetector(load_runtime(path, runtime="onnxruntime"), size=(64, 64))
    >>> detections = model([torch.rand(3, 50, 70)])[0]
    >>> sorted(detections), detections["boxes"].shape[-1]
    (['boxes', 'labels', 'scores'], 4)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image

from ..detection import IMAGENET_MEAN, IMAGENET_STD
from ..runtime import Runtime, load_runtime

__all__ = ["ExportedDetector", "ExportedSegmenter", "load_exported"]


def _fit(image: Tensor, size: tuple[int, int]) -> tuple[Tensor, float]:
    """(3, h, w) RGB -> (3, H, W): resized by one factor to fit ``size``, padded at the bottom and right with the
    ImageNet mean (what the eager detector's zero padding of the normalised image is in RGB)."""
    height, width = image.shape[-2:]
    scale = min(size[0] / height, size[1] / width)
    inner = (min(size[0], round(height * scale)), min(size[1], round(width * scale)))
    resized = F.interpolate(image[None].float(), size=inner, mode="bilinear", align_corners=False)[0]
    fitted = resized.new_tensor(IMAGENET_MEAN).view(3, 1, 1).repeat(1, *size)
    fitted[:, : inner[0], : inner[1]] = resized
    return fitted, scale


class ExportedDetector(nn.Module):
    """An exported detector called like a torchvision one in eval mode: a list of (3, h, w) images in [0, 1] ->
    one dict per image with ``boxes`` (n, 4) xyxy in input pixels, ``scores``, ``labels`` [, ``masks`` (n, 1, h, w)].
    ``label_offset`` is added to the labels (1 for an export of a RetinaNet that labels mmdet's 0..K-1)."""

    def __init__(self, runtime: Runtime, *, size: tuple[int, int], label_offset: int = 0) -> None:
        super().__init__()
        self.runtime, self.size, self.label_offset = runtime, tuple(size), label_offset

    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        fitted = [_fit(image, self.size) for image in images]  # type: ignore[arg-type]
        outputs = self.runtime(torch.stack([batch for batch, _ in fitted]))
        results = []
        for image, (_, scale), output in zip(images, fitted, outputs):
            height, width = image.shape[-2:]
            boxes = clip_boxes_to_image(output["boxes"] / scale, (height, width))  # boxes in the padding reach past it
            result = {"boxes": boxes, "scores": output["scores"]}
            result["labels"] = output["labels"] + self.label_offset
            if "masks" in output:
                inner = (round(height * scale), round(width * scale))
                masks = output["masks"][..., : inner[0], : inner[1]].float()
                result["masks"] = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
            results.append(result)
        return results


class ExportedSegmenter(nn.Module):
    """An exported segmenter called like ``PVTv2Segmenter``: (B, 3, h, w) ImageNet-normalised -> (B, K, h, w)
    logits (the export, which normalises inside, sees the images back in [0, 1] resized to its size)."""

    def __init__(self, runtime: Runtime, *, size: tuple[int, int]) -> None:
        super().__init__()
        self.runtime, self.size = runtime, tuple(size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        rgb = images * self.std + self.mean
        rgb = F.interpolate(rgb, size=self.size, mode="bilinear", align_corners=False)
        logits = self.runtime(rgb)
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)


def load_exported(
    path: str, *, runtime: str, task: str, size: tuple[int, int], label_offset: int = 0
) -> ExportedDetector | ExportedSegmenter:
    """The export at ``path`` run by ``runtime`` (``"onnxruntime"``, ``"openvino"`` or ``"torch"`` for ``.pt2``),
    wrapped for ``task`` (``"segmentation"`` or a detection task) at its exported ``size`` (height, width)."""
    loaded = load_runtime(path, runtime=runtime)
    if task == "segmentation":
        return ExportedSegmenter(loaded, size=size).eval()
    return ExportedDetector(loaded, size=size, label_offset=label_offset).eval()
