"""Semantic segmentation from two folders: images, and single-channel PNG masks of class ids (255 = ignore).

``images/abc.jpg`` pairs with ``masks/abc.png`` (same stem). Pairing, mask format and class ids are checked when the
dataset is built, so bad data fails before training with a ``DataError`` naming the file: an empty image folder, an
image without a mask, an unreadable image or mask, a colour mask, a mask whose size differs from its image, or a
class id outside ``[0, num_classes)`` other than 255 (without ``num_classes``: outside ``[0, 255)``), or a class-names
file whose name count differs from the class count.

Example:
    >>> from pvt_backbone.training.data import SyntheticConfig, SyntheticSegmentation, write_mask_folder
    >>> scenes = SyntheticSegmentation("val", num_images=2, config=SyntheticConfig(image_size=64))
    >>> write_mask_folder(scenes, "images", "masks")
    >>> data = SegmentationFolder("images", "masks", num_classes=4)
    >>> image, mask = data[0]  # (3, H, W) float in [0, 1]; (H, W) int64 class ids, 255 = ignore
    >>> len(data), image.shape, mask.shape, mask.dtype, data.classes[:2]
    (2, torch.Size([3, 64, 64]), torch.Size([64, 64]), torch.int64, ('class_0', 'class_1'))
    >>> _ = Path("classes.txt").write_text("# one name per class id\\nbackground\\ncircle\\nsquare\\ntriangle\\n")
    >>> SegmentationFolder("images", "masks", num_classes=4, class_names_file="classes.txt").classes
    ('background', 'circle', 'square', 'triangle')
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ...checks import check_int
from .base import IGNORE_INDEX, SegmentationDataset
from .coco import _image_size, _listing, load_image
from .errors import DataError
from .seg_transforms import reduce_zero_label as _reduce_labels

__all__ = ["SegmentationFolder", "IMAGE_SUFFIXES", "load_mask", "read_class_names"]

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


def read_class_names(path: str | Path) -> tuple[str, ...]:
    """The class names in a text file, one per line in class-id order; blank lines and lines starting with ``#``
    are skipped, surrounding whitespace is stripped. ``DataError`` if the file cannot be read, names nothing, or
    names a class twice."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "class names file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(path, f"cannot read class names ({error})") from None
    names = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not names:
        raise DataError(path, "no class names (one per line; blank lines and # comments are skipped)")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DataError(path, f"class names {twice} appear more than once")
    return names


def _pair_files(image_dir: Path, mask_dir: Path) -> tuple[list[Path], list[Path]]:
    """The images of ``image_dir`` and the ``<stem>.png`` mask of each; ``DataError`` when any is missing."""
    for folder, what in ((image_dir, "image folder"), (mask_dir, "mask folder")):
        if not folder.is_dir():
            raise DataError(folder, f"{what} not found")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(image_dir, f"empty dataset: no images with suffix {', '.join(IMAGE_SUFFIXES)}")
    masks = [mask_dir / f"{p.stem}.png" for p in images]
    missing = [(m, f"{m} (for {p.name})") for p, m in zip(images, masks) if not m.is_file()]
    if missing:
        listing = _listing([text for _, text in missing])
        raise DataError(missing[0][0], f"mask file not found; {len(missing)} images have no mask: {listing}")
    return images, masks


def _largest_class_id(image_path: Path, mask_path: Path, num_classes: int | None, reduce: bool = False) -> int:
    """Check one image/mask pair (readable, same size, ids below ``num_classes``, after the label reduction when
    ``reduce``); its largest id, -1 if none."""
    mask = _reduce_labels(load_mask(mask_path)) if reduce else load_mask(mask_path)
    width, height = _image_size(image_path)
    if (width, height) != (mask.shape[1], mask.shape[0]):
        raise DataError(
            mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} is {width}x{height}"
        )
    ids = np.unique(mask)
    ids = ids[ids != IGNORE_INDEX]
    limit = IGNORE_INDEX if num_classes is None else num_classes  # without num_classes: any id a class can have
    bad = ids[(ids < 0) | (ids >= limit)]
    if bad.size:
        setting = "" if num_classes is None else f"num_classes={num_classes}; "
        raise DataError(mask_path, f"class ids {bad.tolist()} outside [0, {limit}) ({setting}{IGNORE_INDEX} = ignore)")
    return int(ids.max()) if ids.size else -1


def _class_names(
    num_classes: int, names: Sequence[str] | None, names_file: str | Path | None, counted: str
) -> tuple[str, ...]:
    """``names``, the names in ``names_file``, or ``class_0``, ``class_1``, ...; ``counted`` says where
    ``num_classes`` came from, for the error when the file names another count."""
    if names_file is not None:
        if names is not None:
            raise ValueError("pass class_names or class_names_file, not both")
        names = read_class_names(names_file)
        if len(names) != num_classes:
            raise DataError(
                names_file, f"{len(names)} class names found, {num_classes} expected ({counted}): one name per class id"
            )
    if names is not None and len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for {num_classes} classes")
    return tuple(names) if names is not None else tuple(f"class_{i}" for i in range(num_classes))


class SegmentationFolder(SegmentationDataset):
    """Image folder + mask folder.

    Args:
        image_dir: images (``IMAGE_SUFFIXES``), not searched recursively.
        mask_dir: one ``<stem>.png`` per image.
        num_classes: class count in ``[1, 255]``; ``None`` reads every mask once and uses the largest id + 1.
        class_names: optional names, one per class (default ``class_0``, ``class_1``, ...).
        class_names_file: or a text file of them, read by :func:`read_class_names`; a ``DataError`` naming the file
            if its name count is not the class count.
        reduce_zero_label: ADE20K's label reduction (id 0 ignored, the others moved down by one) applied to every
            mask; ``num_classes`` and the id check count the reduced ids.
    """

    def __init__(
        self,
        image_dir: str | Path,
        mask_dir: str | Path,
        *,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        class_names_file: str | Path | None = None,
        reduce_zero_label: bool = False,
    ) -> None:
        if num_classes is not None:
            check_int("num_classes", num_classes, minimum=1, maximum=IGNORE_INDEX)
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        self.images, self.masks = _pair_files(self.image_dir, self.mask_dir)
        self.reduce_zero_label = reduce_zero_label
        pairs = zip(self.images, self.masks)
        largest = max(_largest_class_id(image, mask, num_classes, reduce_zero_label) for image, mask in pairs)
        counted = "num_classes" if num_classes is not None else f"the largest class id in {self.mask_dir} + 1"
        if num_classes is None:
            if largest < 0:
                raise DataError(self.mask_dir, "every mask is all-ignore (255); pass num_classes explicitly")
            num_classes = largest + 1
        self.classes = _class_names(num_classes, class_names, class_names_file, counted)

    def __len__(self) -> int:
        return len(self.images)

    def image_name(self, index: int) -> str:
        return self.images[index].name

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        mask = load_mask(self.masks[index])
        mask = _reduce_labels(mask) if self.reduce_zero_label else mask
        return load_image(self.images[index]), torch.from_numpy(mask)
