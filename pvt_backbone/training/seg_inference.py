"""Keep-ratio segmentation inference (mmseg's test protocol): whole-image or sliding-window logits, optionally
averaged over rescaled and flipped copies.

An image is rescaled, aspect kept, to fit ``scale`` (mmseg's ADE20K (2048, 512): shorter side 512, longer at most
2048) times each ratio of ``scales``; ``whole`` runs the model on it at once, ``slide`` on ``crop`` x ``crop``
windows every ``stride`` px (the last window of a row or column flush with the border, windows clipped to small
images) and averages the window logits where they overlap. Logits of every copy are resized back to the original
(H, W) bilinearly and averaged there, before any argmax.

Example:
    >>> model = semantic_fpn_pvt_v2("b0", num_classes=3, head="mlp").eval()
    >>> inference = SegmentationInference(scale=(128, 64), mode="slide", crop=64, stride=43, flip=True)
    >>> with torch.no_grad():
    ...     inference(model, torch.rand(1, 3, 50, 90)).shape
    torch.Size([1, 3, 50, 90])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from heads import resize_bilinear

from ..checks import check_choice, check_float, check_int
from .data.seg_transforms import fit_scale
from .evaluation import segmentation_logits

__all__ = ["EVAL_MODES", "slide_logits", "SegmentationInference", "InferenceView"]

EVAL_MODES = ("whole", "slide")


def _windows(length: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) windows along one axis: every ``stride`` px, the last flush with the end, clipped to it."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(count):
        end = min(i * stride + crop, length)
        spans.append((max(end - crop, 0), end))
    return spans


def slide_logits(model: nn.Module, image: Tensor, *, crop: int, stride: int) -> Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, C, H, W) logits averaged over ``crop`` x ``crop`` windows placed
    every ``stride`` px (each window's logits at the window's size).

    >>> model = nn.Conv2d(3, 2, 1).eval()
    >>> image = torch.rand(1, 3, 37, 53)
    >>> with torch.no_grad():
    ...     torch.allclose(slide_logits(model, image, crop=16, stride=11), segmentation_logits(model, image, size=None))
    True
    """
    check_int("slide_crop", crop, minimum=1)
    check_int("slide_stride", stride, minimum=1, maximum=crop)
    height, width = image.shape[-2:]
    total: Tensor | None = None
    count = image.new_zeros(1, 1, height, width)
    for top, bottom in _windows(height, crop, stride):
        for left, right in _windows(width, crop, stride):
            logits = segmentation_logits(model, image[..., top:bottom, left:right], size=None).float()
            if total is None:
                total = image.new_zeros(image.shape[0], logits.shape[1], height, width, dtype=torch.float32)
            total[..., top:bottom, left:right] += logits
            count[..., top:bottom, left:right] += 1
    assert total is not None  # at least one window per axis
    return total / count


@dataclass(frozen=True)
class SegmentationInference:
    """Keep-ratio inference settings; calling it maps a (1, 3, H, W) image in [0, 1] to (1, C, H, W) logits.

    ``scale`` is (longer, shorter) side limits; ``mode`` ``"whole"`` or ``"slide"``; ``crop``/``stride`` the
    sliding window; ``scales`` the test ratios (``(1.0,)``: single scale); ``flip`` adds mirrored copies.
    """

    scale: tuple[int, int]
    mode: str = "whole"
    crop: int = 512
    stride: int = 341
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        check_choice("eval_mode", self.mode, EVAL_MODES)
        object.__setattr__(
            self,
            "scale",
            (check_int("seg_scale[0]", self.scale[0], minimum=1), check_int("seg_scale[1]", self.scale[1], minimum=1)),
        )
        check_int("slide_crop", self.crop, minimum=1)
        check_int("slide_stride", self.stride, minimum=1, maximum=self.crop)
        scales = tuple(float(check_float("test_scales[i]", s, minimum=0.0, inclusive=False)) for s in self.scales)
        if not scales:
            raise ValueError("test_scales must hold at least one ratio, got ()")
        object.__setattr__(self, "scales", scales)

    def _logits(self, model: nn.Module, image: Tensor) -> Tensor:
        if self.mode == "slide":
            return slide_logits(model, image, crop=self.crop, stride=self.stride)
        return segmentation_logits(model, image, size=None).float()

    def __call__(self, model: nn.Module, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        total: Tensor | None = None
        copies = 0
        for ratio in self.scales:
            size = fit_scale(height, width, (self.scale[0] * ratio, self.scale[1] * ratio))
            resized = resize_bilinear(image, size) if size != (height, width) else image
            views = [(resized, False), (resized.flip(-1), True)] if self.flip else [(resized, False)]
            for view, flipped in views:
                logits = self._logits(model, view)
                logits = logits.flip(-1) if flipped else logits
                if logits.shape[-2:] != (height, width):
                    logits = resize_bilinear(logits, (height, width))
                total = logits if total is None else total + logits
                copies += 1
        assert total is not None  # scales is never empty
        return total / copies


class InferenceView:
    """A segmentation dataset together with the inference it is evaluated with (``inference``): items, length,
    classes and ignore index are the dataset's own."""

    def __init__(self, dataset: Any, inference: SegmentationInference) -> None:
        self.dataset = dataset
        self.inference = inference

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
