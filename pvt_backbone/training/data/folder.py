"""Semantic segmentation from two folders: images, and single-channel PNG masks of class ids (255 = ignore).

``images/abc.jpg`` pairs with ``masks/abc.png`` (same stem). Pairing, mask format and class ids are checked when the
dataset is built, so bad data fails before training with a ``DataError`` naming the file: an empty image folder, an
image without a mask, an unreadable image or mask, a colour mask, a mask whose size differs from its image, or a
class id outside ``[0, num_classes)`` other than 255.

Example:
    >>> data = SegmentationFolder("data/images", "data/masks", num_classes=3)
    >>> image, mask = data[0]  # (3, H, W) float in [0, 1]; (H, W) int64 class ids, 255 = ignore
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .base import IGNORE_INDEX, SegmentationDataset
from .coco import _listing, load_image
from .errors import DataError

__all__ = ["SegmentationFolder", "IMAGE_SUFFIXES", "load_mask"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_SINGLE_CHANNEL = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")


def load_mask(path: str | Path) -> np.ndarray:
    """Read a single-channel PNG of class ids as an (H, W) int64 array."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "mask file not found")
    try:
        with Image.open(path) as mask:
            if mask.mode not in _SINGLE_CHANNEL:
                raise DataError(path, f"mask must be a single-channel image of class ids, got mode {mask.mode}")
            return np.asarray(mask, dtype=np.int64)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(path, f"cannot read mask ({error})") from None


class SegmentationFolder(SegmentationDataset):
    """Image folder + mask folder.

    Args:
        image_dir: images (``IMAGE_SUFFIXES``), not searched recursively.
        mask_dir: one ``<stem>.png`` per image.
        num_classes: class count; ``None`` reads every mask once and uses the largest id + 1.
        class_names: optional names, one per class.
    """

    def __init__(
        self,
        image_dir: str | Path,
        mask_dir: str | Path,
        *,
        num_classes: int | None = None,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for folder, what in ((self.image_dir, "image folder"), (self.mask_dir, "mask folder")):
            if not folder.is_dir():
                raise DataError(folder, f"{what} not found")
        self.images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise DataError(self.image_dir, f"empty dataset: no images with suffix {', '.join(IMAGE_SUFFIXES)}")
        self.masks = [self.mask_dir / f"{p.stem}.png" for p in self.images]
        missing = [f"{m} (for {p.name})" for p, m in zip(self.images, self.masks) if not m.is_file()]
        if missing:
            raise DataError(
                self.masks[[m.is_file() for m in self.masks].index(False)],
                f"mask file not found; {len(missing)} images have no mask: {_listing(missing)}",
            )
        if num_classes is not None and (isinstance(num_classes, bool) or not 1 <= num_classes <= IGNORE_INDEX):
            raise ValueError(f"num_classes must be an int in [1, {IGNORE_INDEX}], got {num_classes!r}")
        largest = -1
        for image_path, mask_path in zip(self.images, self.masks):
            mask = load_mask(mask_path)
            try:
                with Image.open(image_path) as image:
                    size = image.size
            except (UnidentifiedImageError, OSError, ValueError) as error:
                raise DataError(image_path, f"cannot read image ({error})") from None
            if size != (mask.shape[1], mask.shape[0]):
                raise DataError(
                    mask_path,
                    f"mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} is {size[0]}x{size[1]}",
                )
            ids = np.unique(mask)
            ids = ids[ids != IGNORE_INDEX]
            if num_classes is not None:
                bad = ids[(ids < 0) | (ids >= num_classes)]
                if bad.size:
                    raise DataError(
                        mask_path,
                        f"class ids {bad.tolist()} outside [0, {num_classes}) "
                        f"(num_classes={num_classes}; {IGNORE_INDEX} = ignore)",
                    )
            if ids.size:
                largest = max(largest, int(ids.max()))
        if num_classes is None:
            if largest < 0:
                raise DataError(self.mask_dir, "every mask is all-ignore (255); pass num_classes explicitly")
            num_classes = largest + 1
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.classes = (
            tuple(class_names) if class_names is not None else tuple(f"class_{i}" for i in range(num_classes))
        )

    def __len__(self) -> int:
        return len(self.images)

    def image_name(self, index: int) -> str:
        return self.images[index].name

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return load_image(self.images[index]), torch.from_numpy(load_mask(self.masks[index]))
