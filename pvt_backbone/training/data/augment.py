"""Geometric and photometric detection augmentation on ``torchvision.transforms.v2`` kernels and ``tv_tensors``.

Every random choice is drawn from a NumPy ``Generator`` the caller seeds from the sample key, so a sample's
augmentation is a pure function of ``(index, aug_seed)``. Images are (3, H, W) float in [0, 1]; targets follow the
detection contract of :mod:`.base`: ``boxes`` (N, 4) xyxy pixels, ``masks`` (N, H, W) uint8 and ``keypoints``
(N, K, 3) (x, y, visibility) move with the image. Policies (``DETECTION_AUGMENTS``):

- ``none``: the image as loaded; ``flip``: horizontal flip with probability 0.5;
- ``multiscale``: flip, then the shorter side resized to one of ``sizes`` with the longer side at most ``max_size``
  (mmdet's 3x schedule: 480..800 step 32, longer side <= 1333);
- ``detr``: flip, then either a multi-scale resize or (probability 0.5) a resize of the shorter side to 0.5, 0.625
  or 0.75 x ``max(sizes)``, a random crop of 0.48..0.75 x ``max(sizes)`` per side, and a multi-scale resize
  (DETR's 400/500/600 and 384..600 at ``max(sizes)`` = 800);
- ``lsj``: large-scale jitter: resize to fit ``ratio`` x (``lsj_size``, ``lsj_size``) with ratio in 0.1..2.0, a
  random ``lsj_size`` square crop, flip, and zero padding to ``lsj_size`` x ``lsj_size``.

``photometric=True`` adds photometric distortion (brightness, contrast, saturation, hue) after the geometry.

Example:
    >>> augment = DetectionAugment("multiscale", sizes=(32, 48), max_size=80)
    >>> target = {"boxes": torch.tensor([[4.0, 4.0, 20.0, 12.0]]), "labels": torch.tensor([1])}
    >>> image, out = augment(torch.rand(3, 40, 60), target, np.random.default_rng(0))
    >>> min(image.shape[-2:]) in (32, 48), out["boxes"].shape
    (True, torch.Size([1, 4]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ...checks import check_choice, check_int

# Pixel-centred nearest neighbour: a mask stays within half a pixel of its box at any scale.
_NEAREST = InterpolationMode.NEAREST_EXACT

__all__ = [
    "DETECTION_AUGMENTS",
    "keypoint_flip_permutation",
    "hflip_detection",
    "MULTISCALE_SIZES",
    "DetectionAugment",
    "keep_ratio_size",
    "resize_detection",
    "crop_detection",
    "pad_detection",
    "photometric_distort",
]

DETECTION_AUGMENTS = ("none", "flip", "multiscale", "detr", "lsj")
MULTISCALE_SIZES = tuple(range(480, 801, 32))
# DETR's crop branch at a largest scale of 800: resize the shorter side to 400/500/600, crop 384..600 per side.
_DETR_PRESCALE = (0.5, 0.625, 0.75)
_DETR_CROP = (0.48, 0.75)
_LSJ_RATIO = (0.1, 2.0)


def keypoint_flip_permutation(names: Sequence[str]) -> list[int]:
    """Where keypoint k moves under a horizontal flip: names with ``left`` and ``right`` swapped (COCO style).

    >>> keypoint_flip_permutation(["top", "right", "bottom", "left"])
    [0, 3, 2, 1]
    """
    lookup = {name: i for i, name in enumerate(names)}
    perm = []
    for name in names:
        mirrored = name.replace("left", "\0").replace("right", "left").replace("\0", "right")
        perm.append(lookup.get(mirrored, lookup[name]))
    return perm


def hflip_detection(
    image: Tensor, target: dict[str, Any], flip_perm: Sequence[int] | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Mirror a (3, H, W) image and its target (boxes (N, 4) xyxy, masks (N, H, W), keypoints (N, K, 3) reordered
    by ``flip_perm``) left to right.

    Example:
        >>> image, target = hflip_detection(torch.zeros(3, 4, 10), {"boxes": torch.tensor([[1.0, 0.0, 3.0, 4.0]])})
        >>> target["boxes"].tolist()
        [[7.0, 0.0, 9.0, 4.0]]
    """
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        points = target["keypoints"].clone()
        points[..., 0] = width - points[..., 0]
        if flip_perm is not None:
            points = points[:, list(flip_perm)]
        target["keypoints"] = points
    return image.flip(-1), target


def keep_ratio_size(height: int, width: int, shorter: float, longer: float | None = None) -> tuple[int, int]:
    """(height, width) with the shorter side at ``shorter`` and, when given, the longer side at most ``longer``.

    >>> keep_ratio_size(480, 640, 800), keep_ratio_size(480, 1280, 800, 1333)
    ((800, 1067), (500, 1333))
    """
    scale = shorter / min(height, width)
    if longer is not None:
        scale = min(scale, longer / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _boxes(target: dict[str, Any], height: int, width: int) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))


def _masks(target: dict[str, Any]) -> tv_tensors.Mask:
    return tv_tensors.Mask(target["masks"])


def resize_detection(image: Tensor, target: dict[str, Any], size: tuple[int, int]) -> tuple[Tensor, dict[str, Any]]:
    """Resize a (3, H, W) image (bilinear, antialiased) and its target to ``size`` = (height, width); masks by
    pixel-centred nearest neighbour.

    >>> boxes = torch.tensor([[2.0, 1.0, 6.0, 5.0]])
    >>> image, target = resize_detection(torch.rand(3, 10, 20), {"boxes": boxes}, (20, 40))
    >>> image.shape, target["boxes"].tolist()
    (torch.Size([3, 20, 40]), [[4.0, 2.0, 12.0, 10.0]])
    """
    height, width = image.shape[-2:]
    size_list = [int(size[0]), int(size[1])]
    target = dict(target)
    target["boxes"] = TF.resize(_boxes(target, height, width), size_list).as_subclass(Tensor)
    if "masks" in target:
        target["masks"] = TF.resize(_masks(target), size_list, interpolation=_NEAREST).as_subclass(Tensor)
    if "keypoints" in target:
        points = target["keypoints"].clone()
        points[..., 0] *= size_list[1] / width
        points[..., 1] *= size_list[0] / height
        target["keypoints"] = points
    image = TF.resize(tv_tensors.Image(image), size_list, antialias=True).as_subclass(Tensor)
    return image, target


def crop_detection(
    image: Tensor, target: dict[str, Any], top: int, left: int, height: int, width: int
) -> tuple[Tensor, dict[str, Any]]:
    """Crop the window ``[top, top + height) x [left, left + width)``; boxes are clipped to it and objects whose box
    keeps less than 1 px of width or height are dropped; keypoints outside the window become invisible (v = 0).

    >>> target = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0], [8.0, 8.0, 10.0, 10.0]]), "labels": torch.tensor([1, 2])}
    >>> image, out = crop_detection(torch.rand(3, 10, 10), target, 2, 2, 5, 5)
    >>> image.shape, out["boxes"].tolist(), out["labels"].tolist()
    (torch.Size([3, 5, 5]), [[0.0, 0.0, 2.0, 2.0]], [1])
    """
    full_h, full_w = image.shape[-2:]
    target = dict(target)
    boxes = TF.crop(_boxes(target, full_h, full_w), top, left, height, width)
    target["boxes"] = TF.clamp_bounding_boxes(boxes).as_subclass(Tensor)
    if "masks" in target:
        target["masks"] = TF.crop(_masks(target), top, left, height, width).as_subclass(Tensor)
    if "keypoints" in target:
        points = target["keypoints"].clone()
        points[..., 0] -= left
        points[..., 1] -= top
        outside = (points[..., 0] < 0) | (points[..., 0] >= width) | (points[..., 1] < 0) | (points[..., 1] >= height)
        points[..., 2] = torch.where(outside, torch.zeros_like(points[..., 2]), points[..., 2])
        target["keypoints"] = points
    image = TF.crop(tv_tensors.Image(image), top, left, height, width).as_subclass(Tensor)
    return image, _drop_empty(target)


def _drop_empty(target: dict[str, Any]) -> dict[str, Any]:
    """Keep the objects whose box is at least 1 px wide and tall (every per-object field filtered alike)."""
    boxes = target["boxes"]
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    if bool(keep.all()):
        return target
    count = len(boxes)
    return {k: v[keep] if isinstance(v, Tensor) and v.dim() and len(v) == count else v for k, v in target.items()}


def pad_detection(image: Tensor, target: dict[str, Any], height: int, width: int) -> tuple[Tensor, dict[str, Any]]:
    """Zero-pad bottom and right to at least ``height`` x ``width`` (boxes and keypoints stay where they are).

    >>> pad_detection(torch.rand(3, 5, 7), {"boxes": torch.zeros(0, 4)}, 8, 8)[0].shape
    torch.Size([3, 8, 8])
    """
    full_h, full_w = image.shape[-2:]
    padding = [0, 0, max(0, width - full_w), max(0, height - full_h)]  # left, top, right, bottom
    if not any(padding):
        return image, target
    target = dict(target)
    if "masks" in target:
        target["masks"] = TF.pad(_masks(target), padding, fill=0).as_subclass(Tensor)
    return TF.pad(tv_tensors.Image(image), padding, fill=0.0).as_subclass(Tensor), target


def photometric_distort(image: Tensor, rng: np.random.Generator) -> Tensor:
    """Random photometric distortion of a (3, H, W) float image in [0, 1], each change with probability 0.5:
    brightness x 0.875..1.125 (about +-32/255), contrast x 0.5..1.5 (before or after the colour changes),
    saturation x 0.5..1.5, hue +-0.05 turns (+-18 degrees). The result stays in [0, 1].

    >>> out = photometric_distort(torch.rand(3, 8, 8), np.random.default_rng(0))
    >>> out.shape, bool(out.min() >= 0) and bool(out.max() <= 1)
    (torch.Size([3, 8, 8]), True)
    """
    draws = rng.random(5)
    factors = rng.uniform((0.875, 0.5, 0.5, -0.05), (1.125, 1.5, 1.5, 0.05))
    contrast_first = bool(rng.integers(2))
    out = tv_tensors.Image(image)
    if draws[0] < 0.5:
        out = TF.adjust_brightness(out, float(factors[0]))
    if contrast_first and draws[1] < 0.5:
        out = TF.adjust_contrast(out, float(factors[1]))
    if draws[2] < 0.5:
        out = TF.adjust_saturation(out, float(factors[2]))
    if draws[3] < 0.5:
        out = TF.adjust_hue(out, float(factors[3]))
    if not contrast_first and draws[1] < 0.5:
        out = TF.adjust_contrast(out, float(factors[1]))
    return out.as_subclass(Tensor).clamp(0.0, 1.0)


@dataclass(frozen=True)
class DetectionAugment:
    """One detection augmentation policy (see the module docstring); call it with ``(image, target, rng)``.

    ``sizes`` are the shorter sides of ``multiscale``/``detr``, ``max_size`` their longer-side cap, ``lsj_size``
    the square canvas of ``lsj``, ``flip_perm`` the keypoint order after a horizontal flip.
    """

    mode: str = "flip"
    sizes: tuple[int, ...] = MULTISCALE_SIZES
    max_size: int = 1333
    lsj_size: int = 1024
    photometric: bool = False
    flip_perm: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_choice("augment", self.mode, DETECTION_AUGMENTS)
        object.__setattr__(self, "sizes", tuple(int(size) for size in self.sizes))
        if not self.sizes:
            raise ValueError("multiscale_sizes must hold at least one size, got ()")
        for size in self.sizes:
            check_int("multiscale_sizes[i]", size, minimum=1)
        check_int("max_size", self.max_size, minimum=max(self.sizes))
        check_int("lsj_size", self.lsj_size, minimum=1)

    def __call__(
        self, image: Tensor, target: dict[str, Any], rng: np.random.Generator
    ) -> tuple[Tensor, dict[str, Any]]:
        if self.mode == "lsj":
            image, target = self._jitter(image, target, rng)
        elif self.mode != "none":
            if rng.random() < 0.5:
                image, target = hflip_detection(image, target, self.flip_perm)
            if self.mode == "detr" and rng.random() < 0.5:
                image, target = self._detr_crop(image, target, rng)
            if self.mode in ("multiscale", "detr"):
                image, target = self._multiscale(image, target, rng)
        if self.photometric and self.mode != "none":
            image = photometric_distort(image, rng)
        return image, target

    def _multiscale(self, image: Tensor, target: dict[str, Any], rng: np.random.Generator) -> tuple[Tensor, dict]:
        shorter = self.sizes[int(rng.integers(len(self.sizes)))]
        return resize_detection(image, target, keep_ratio_size(*image.shape[-2:], shorter, self.max_size))

    def _detr_crop(self, image: Tensor, target: dict[str, Any], rng: np.random.Generator) -> tuple[Tensor, dict]:
        """DETR's resize + random-size crop, drawn at the resized scale and cut from the original image: the
        multi-scale resize that follows sets the final size, so one resampling replaces two."""
        largest = max(self.sizes)
        height, width = image.shape[-2:]
        shorter = largest * _DETR_PRESCALE[int(rng.integers(len(_DETR_PRESCALE)))]
        scaled_h, scaled_w = keep_ratio_size(height, width, shorter)
        low = max(1, round(largest * _DETR_CROP[0]))
        high = max(low, round(largest * _DETR_CROP[1]))
        crop_h = int(rng.integers(min(low, scaled_h), min(high, scaled_h) + 1))
        crop_w = int(rng.integers(min(low, scaled_w), min(high, scaled_w) + 1))
        top = int(rng.integers(scaled_h - crop_h + 1)) * height / scaled_h
        left = int(rng.integers(scaled_w - crop_w + 1)) * width / scaled_w
        top_px, left_px = min(round(top), height - 1), min(round(left), width - 1)
        crop_h_px = min(max(1, round(crop_h * height / scaled_h)), height - top_px)
        crop_w_px = min(max(1, round(crop_w * width / scaled_w)), width - left_px)
        return crop_detection(image, target, top_px, left_px, crop_h_px, crop_w_px)

    def _jitter(self, image: Tensor, target: dict[str, Any], rng: np.random.Generator) -> tuple[Tensor, dict]:
        side = self.lsj_size * float(rng.uniform(*_LSJ_RATIO))
        height, width = image.shape[-2:]
        image, target = resize_detection(image, target, keep_ratio_size(height, width, side, side))
        height, width = image.shape[-2:]
        crop_h, crop_w = min(height, self.lsj_size), min(width, self.lsj_size)
        top, left = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
        image, target = crop_detection(image, target, top, left, crop_h, crop_w)
        if rng.random() < 0.5:
            image, target = hflip_detection(image, target, self.flip_perm)
        return pad_detection(image, target, self.lsj_size, self.lsj_size)
