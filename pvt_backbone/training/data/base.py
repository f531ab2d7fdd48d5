"""What every dataset of this package provides, so the engine never needs to know where the data came from.

Detection datasets return torchvision's detection pair ``(image, target)``:

- ``image``: float tensor (3, H, W) in [0, 1];
- ``target``: ``boxes`` (N, 4) float32 xyxy in pixels, ``labels`` (N,) int64 in ``1..num_categories``,
  ``image_id`` (int), and when the dataset has them ``masks`` (N, H, W) uint8 and ``keypoints`` (N, K, 3) float32
  (x, y, visibility). Images without objects have N = 0.

Segmentation datasets return ``(image, mask)`` with ``mask`` an int64 (H, W) tensor of class ids, 255 = ignore.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DetectionDataset", "SegmentationDataset", "IGNORE_INDEX", "coco_from_dict"]

IGNORE_INDEX = 255


def coco_from_dict(dataset: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` index over an in-memory instances dict (its progress prints are silenced).

    Example:
        >>> coco = coco_from_dict({"images": [{"id": 1}], "annotations": [], "categories": [{"id": 3, "name": "cat"}]})
        >>> coco.getImgIds(), coco.loadCats(3)[0]["name"]
        ([1], 'cat')
    """
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class DetectionDataset(Dataset):
    """Base of the detection datasets: the (image, target) contract plus COCO-format ground truth.

    Subclasses set ``categories`` (names of labels 1..K), ``category_ids`` (the COCO id of each label, used when
    writing results for ``COCOeval``), ``keypoint_names`` (empty without keypoints), ``has_masks`` and implement
    ``__len__``, ``__getitem__``, ``coco`` and ``image_path``.
    """

    categories: tuple[str, ...]
    category_ids: tuple[int, ...]
    keypoint_names: tuple[str, ...] = ()
    has_masks: bool = False

    @property
    def num_classes(self) -> int:
        """Classes a torchvision detector needs: the categories plus background (label 0)."""
        return len(self.categories) + 1

    @property
    def coco(self) -> COCO:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_name(self, index: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError


class SegmentationDataset(Dataset):
    """Base of the semantic-segmentation datasets: (image, mask) pairs; ``classes[i]`` names class id i."""

    classes: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        """Class ids a segmenter predicts: ``0 .. num_classes - 1`` (``ignore_index`` excluded)."""
        return len(self.classes)

    def image_name(self, index: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
