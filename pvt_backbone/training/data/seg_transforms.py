"""The keep-ratio semantic-segmentation training pipeline (mmseg's ADE20K recipe) and ADE20K's label reduction.

Per sample, from a NumPy ``Generator`` seeded by the sample key: rescale to fit ``ratio`` x ``scale`` (the longer
side within ``scale[0] * ratio``, the shorter within ``scale[1] * ratio``, ratio uniform in ``ratio_range``), a
random ``crop_size`` square crop in which no class covers more than ``cat_max_ratio`` of the labelled pixels
(up to 10 tries; ignore pixels do not count), a horizontal flip with probability 0.5, photometric distortion, and
padding to ``crop_size`` (image 0, mask ``IGNORE_INDEX``). Images are (3, H, W) float in [0, 1], masks (H, W) int64.

Example:
    >>> from pvt_backbone.training.data import SyntheticConfig, SyntheticSegmentation
    >>> scenes = SyntheticSegmentation("train", num_images=2, config=SyntheticConfig(image_size=64))
    >>> view = KeepRatioSegmentation(scenes, crop_size=48, scale=(128, 48))
    >>> image, mask = view[(0, 123)]
    >>> image.shape, mask.shape, mask.dtype
    (torch.Size([3, 48, 48]), torch.Size([48, 48]), torch.int64)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ...checks import check_float, check_int
from .augment import photometric_distort
from .base import IGNORE_INDEX

__all__ = [
    "reduce_zero_label",
    "fit_scale",
    "resize_pair",
    "cat_max_crop",
    "pad_pair",
    "KeepRatioSegmentation",
]

_CROP_TRIES = 10
_NEAREST = InterpolationMode.NEAREST_EXACT  # pixel-centred nearest neighbour


def reduce_zero_label(mask: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """ADE20K's label reduction: 0 (unlabelled) becomes 255 (ignore), every other id moves down by one, 255 stays.

    >>> reduce_zero_label(torch.tensor([0, 1, 2, 150, 255])).tolist()
    [255, 0, 1, 149, 255]
    """
    shifted = mask - 1
    zero_or_ignore = (mask == 0) | (mask == IGNORE_INDEX)
    if isinstance(mask, Tensor):
        return torch.where(zero_or_ignore, torch.full_like(mask, IGNORE_INDEX), shifted)
    return np.where(zero_or_ignore, IGNORE_INDEX, shifted).astype(mask.dtype)


def fit_scale(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
    """(height, width) rescaled, aspect kept, so the longer side is at most ``max(scale)`` and the shorter at most
    ``min(scale)``, one of them reached (mmseg's ``keep_ratio`` resize).

    >>> fit_scale(375, 500, (2048, 512)), fit_scale(200, 1000, (2048, 512))
    ((512, 683), (410, 2048))
    """
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, round(height * factor)), max(1, round(width * factor))


def resize_pair(image: Tensor, mask: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """Resize a (3, H, W) image (bilinear, antialiased) and its (H, W) mask (nearest) to ``size`` = (height, width).

    >>> image, mask = resize_pair(torch.rand(3, 10, 20), torch.zeros(10, 20, dtype=torch.int64), (5, 10))
    >>> image.shape, mask.shape
    (torch.Size([3, 5, 10]), torch.Size([5, 10]))
    """
    size_list = [int(size[0]), int(size[1])]
    image = TF.resize(tv_tensors.Image(image), size_list, antialias=True).as_subclass(Tensor)
    if mask is not None:
        mask = TF.resize(tv_tensors.Mask(mask[None]), size_list, interpolation=_NEAREST).as_subclass(Tensor)[0]
    return image, mask


def _largest_share(mask: Tensor, ignore_index: int) -> tuple[int, float]:
    """(classes present, largest class share) among the labelled pixels of a mask."""
    labelled = mask[mask != ignore_index]
    if labelled.numel() == 0:
        return 0, 1.0
    counts = torch.bincount(labelled.flatten().long())
    counts = counts[counts > 0]
    return len(counts), float(counts.max()) / float(counts.sum())


def cat_max_crop(
    mask: Tensor,
    crop_size: int,
    rng: np.random.Generator,
    *,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[int, int]:
    """(top, left) of a random ``crop_size`` window of an (H, W) mask (clipped to the mask): redrawn up to 10
    times until the crop holds at least two classes and none covers ``cat_max_ratio`` or more of its labelled
    pixels; the last draw is kept when none qualifies. ``cat_max_ratio=1`` takes the first draw.

    >>> mask = torch.zeros(40, 40, dtype=torch.int64); mask[:, 30:] = 1
    >>> top, left = cat_max_crop(mask, 16, np.random.default_rng(0))
    >>> share = (mask[top:top + 16, left:left + 16] == 0).float().mean().item()
    >>> share < 0.75
    True
    """
    height, width = mask.shape[-2:]
    top = left = 0
    for _ in range(_CROP_TRIES):
        top = int(rng.integers(max(height - crop_size, 0) + 1))
        left = int(rng.integers(max(width - crop_size, 0) + 1))
        if cat_max_ratio >= 1.0:
            break
        present, share = _largest_share(mask[top : top + crop_size, left : left + crop_size], ignore_index)
        if present > 1 and share < cat_max_ratio:
            break
    return top, left


def pad_pair(image: Tensor, mask: Tensor, size: int, *, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Pad bottom and right to at least ``size`` x ``size``: the image with 0, the mask with ``ignore_index``.

    >>> image, mask = pad_pair(torch.rand(3, 5, 8), torch.zeros(5, 8, dtype=torch.int64), 8)
    >>> image.shape, mask[7].tolist()[:2]
    (torch.Size([3, 8, 8]), [255, 255])
    """
    height, width = image.shape[-2:]
    padding = [0, 0, max(0, size - width), max(0, size - height)]  # left, top, right, bottom
    if not any(padding):
        return image, mask
    image = TF.pad(tv_tensors.Image(image), padding, fill=0.0).as_subclass(Tensor)
    mask = TF.pad(tv_tensors.Mask(mask[None]), padding, fill=ignore_index).as_subclass(Tensor)[0]
    return image, mask


class KeepRatioSegmentation(Dataset):
    """Keep-ratio training view of a segmentation dataset, keyed by ``(index, aug_seed)`` (a plain index uses
    ``aug_seed = index``); every sample is a (3, ``crop_size``, ``crop_size``) image and its mask.

    Args:
        dataset: ``(image, mask)`` pairs.
        crop_size: side of the square training crop.
        scale: (longer, shorter) side limits of the rescale before the ratio jitter, mmseg's (2048, 512).
        ratio_range: (low, high) of the uniform ratio jitter.
        cat_max_ratio: largest share one class may have of a crop's labelled pixels (1 disables the check).
        photometric: apply photometric distortion.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        crop_size: int,
        scale: tuple[int, int],
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        photometric: bool = True,
    ) -> None:
        self.dataset = dataset
        self.crop_size = check_int("crop_size", crop_size, minimum=1)
        self.scale = (check_int("seg_scale[0]", scale[0], minimum=1), check_int("seg_scale[1]", scale[1], minimum=1))
        low = check_float("seg_ratio_range[0]", ratio_range[0], minimum=0.0, inclusive=False)
        self.ratio_range = (low, check_float("seg_ratio_range[1]", ratio_range[1], minimum=low))
        self.cat_max_ratio = check_float("cat_max_ratio", cat_max_ratio, minimum=0.0, maximum=1.0, inclusive=False)
        self.photometric = photometric
        self.ignore_index = getattr(dataset, "ignore_index", IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, aug_seed = (key[0], key[1]) if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(aug_seed)
        image, mask = self.dataset[index]
        ratio = float(rng.uniform(*self.ratio_range))
        target = fit_scale(*image.shape[-2:], (self.scale[0] * ratio, self.scale[1] * ratio))
        image, mask = resize_pair(image, mask, target)
        top, left = cat_max_crop(
            mask, self.crop_size, rng, cat_max_ratio=self.cat_max_ratio, ignore_index=self.ignore_index
        )
        image = image[:, top : top + self.crop_size, left : left + self.crop_size]
        mask = mask[top : top + self.crop_size, left : left + self.crop_size]
        if rng.random() < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        if self.photometric:
            image = photometric_distort(image, rng)
        return pad_pair(image.contiguous(), mask.contiguous(), self.crop_size, ignore_index=self.ignore_index)
