"""COCO-format detection, instance segmentation and keypoints: an image folder plus an instances JSON.

Everything that can be checked without decoding pixels is checked when the dataset is built, so a bad file fails
before training starts, with a ``DataError`` naming the file and the problem: a missing or unreadable annotation
file, an empty image list, an annotation pointing at an unknown image or category, a degenerate box, a missing or
unreadable image, an image whose size differs from the JSON. Images without annotations are valid (empty targets).

COCO category ids may be sparse (1..90); labels are their rank (1..K) and ``category_ids`` maps them back.
Crowd annotations (``iscrowd=1``) are left out of the training targets and kept in the ground truth for COCOeval.

Example:
    >>> from pvt_backbone.training.data import SyntheticConfig, SyntheticShapes, write_coco
    >>> scenes = SyntheticShapes("val", num_images=2, config=SyntheticConfig(image_size=64))
    >>> write_coco(scenes, "images", "instances.json")
    >>> data = CocoDetection("images", "instances.json", masks=True)
    >>> image, target = data[0]  # image (3, H, W) in [0, 1]; target boxes (N, 4) xyxy, labels (N,), masks (N, H, W)
    >>> image.shape, target["boxes"].shape[1], target["masks"].shape[1:], data.categories
    (torch.Size([3, 64, 64]), 4, torch.Size([64, 64]), ('circle', 'square', 'triangle'))
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor

from .base import DetectionDataset, coco_from_dict
from .errors import DataError

__all__ = ["CocoDetection", "load_image"]

_SHOWN = 5  # how many offenders an error message lists


def load_image(path: str | Path) -> Tensor:
    """Read an image file as a float (3, H, W) RGB tensor in [0, 1]; ``DataError`` if it is missing or unreadable.

    Example:
        >>> from PIL import Image
        >>> Image.new("RGB", (5, 3), (255, 0, 0)).save("red.png")
        >>> image = load_image("red.png")
        >>> image.shape, image[:, 0, 0].tolist()
        (torch.Size([3, 3, 5]), [1.0, 0.0, 0.0])
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "image file not found")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(path, f"cannot read image ({error})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(path, f"cannot read image ({error})") from None


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return "; ".join(items[:_SHOWN]) + more


class CocoDetection(DetectionDataset):
    """A COCO instances file over an image folder.

    Args:
        image_dir: folder the ``file_name`` entries are relative to.
        annotation_file: COCO instances JSON (``images``, ``annotations``, ``categories``).
        masks: return instance masks (``segmentation`` becomes required on every non-crowd annotation).
        keypoints: return keypoints (categories must declare ``keypoints`` names; annotations carry 3K numbers).
        check_images: open every image header at construction (existence is always checked).
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        *,
        masks: bool = False,
        keypoints: bool = False,
        check_images: bool = True,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.has_masks = masks
        source = self.annotation_file
        if not self.image_dir.is_dir():
            raise DataError(self.image_dir, "image folder not found")
        if not source.is_file():
            raise DataError(source, "annotation file not found")
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(source, f"cannot read annotation JSON ({error})") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
            raise DataError(source, "not a COCO instances file: expected lists 'images' and 'categories'")
        data.setdefault("annotations", [])
        if not data["images"]:
            raise DataError(source, "empty dataset: 'images' lists no image")
        if not data["categories"]:
            raise DataError(source, "no categories: 'categories' is empty")

        self._images = self._check_images(source, data["images"])
        categories = self._check_categories(source, data["categories"])
        self.category_ids = tuple(sorted(categories))
        self.categories = tuple(str(categories[i].get("name", i)) for i in self.category_ids)
        self._label_of = {cid: label for label, cid in enumerate(self.category_ids, start=1)}
        if keypoints:
            names = {tuple(c.get("keypoints") or ()) for c in categories.values()}
            if len(names) != 1 or not next(iter(names)):
                raise DataError(
                    source,
                    "keypoints requested but the categories do not all declare the same "
                    "non-empty 'keypoints' name list",
                )
            self.keypoint_names = tuple(str(n) for n in next(iter(names)))
        self._annotations = self._check_annotations(source, data["annotations"], categories)
        self._check_files(check_images)
        self._data = data

    # -- validation ------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_images(source: Path, images: list[Any]) -> list[dict[str, Any]]:
        seen: set[int] = set()
        for entry in images:
            if not isinstance(entry, dict) or not {"id", "file_name"} <= entry.keys():
                raise DataError(source, f"image entry {entry!r} lacks 'id' or 'file_name'")
            if entry["id"] in seen:
                raise DataError(source, f"image id {entry['id']} appears twice in 'images'")
            seen.add(entry["id"])
        return images

    @staticmethod
    def _check_categories(source: Path, categories: list[Any]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for entry in categories:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
                raise DataError(source, f"category entry {entry!r} lacks an integer 'id'")
            if entry["id"] in out:
                raise DataError(source, f"category id {entry['id']} appears twice in 'categories'")
            out[entry["id"]] = entry
        return out

    def _check_annotations(
        self, source: Path, annotations: list[Any], categories: dict[int, dict[str, Any]]
    ) -> dict[int, list[dict[str, Any]]]:
        by_image: dict[int, list[dict[str, Any]]] = {entry["id"]: [] for entry in self._images}
        for position, ann in enumerate(annotations):
            name = f"annotation id {ann.get('id', '?')}" if isinstance(ann, dict) else f"annotation #{position}"
            if not isinstance(ann, dict):
                raise DataError(source, f"{name} is not an object: {ann!r}")
            if ann.get("image_id") not in by_image:
                raise DataError(source, f"{name} refers to unknown image_id {ann.get('image_id')!r}")
            if ann.get("category_id") not in categories:
                raise DataError(
                    source,
                    f"{name} refers to unknown category_id {ann.get('category_id')!r} (known: {sorted(categories)})",
                )
            box = ann.get("bbox")
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                raise DataError(source, f"{name} has no valid 'bbox' [x, y, width, height]: {box!r}")
            if not all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
                raise DataError(source, f"{name} has a degenerate box {box} (width and height must be > 0)")
            crowd = bool(ann.get("iscrowd", 0))
            if self.has_masks and not crowd and not ann.get("segmentation"):
                raise DataError(source, f"{name} has no 'segmentation' but masks were requested")
            if self.keypoint_names and not crowd:
                points = ann.get("keypoints")
                if not isinstance(points, list) or len(points) != 3 * len(self.keypoint_names):
                    raise DataError(
                        source,
                        f"{name} needs 'keypoints' with {3 * len(self.keypoint_names)} numbers "
                        f"({len(self.keypoint_names)} keypoints x (x, y, v)), got {points!r}",
                    )
            by_image[ann["image_id"]].append(ann)
        return by_image

    def _check_files(self, check_images: bool) -> None:
        missing = [
            str(self.image_dir / e["file_name"])
            for e in self._images
            if not (self.image_dir / e["file_name"]).is_file()
        ]
        if missing:
            raise DataError(
                missing[0],
                f"image file not found (listed in {self.annotation_file}; {len(missing)} missing: {_listing(missing)})",
            )
        if not check_images:
            return
        for entry in self._images:
            path = self.image_dir / entry["file_name"]
            width, height = _image_size(path)
            declared = (entry.get("width"), entry.get("height"))
            if declared != (None, None) and declared != (width, height):
                raise DataError(
                    path, f"image is {width}x{height} but {self.annotation_file} says {declared[0]}x{declared[1]}"
                )

    # -- dataset -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._images)

    def image_name(self, index: int) -> str:
        return str(self._images[index]["file_name"])

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._images[index]["file_name"]

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        entry = self._images[index]
        image = load_image(self.image_dir / entry["file_name"])
        height, width = image.shape[-2:]
        anns = [a for a in self._annotations[entry["id"]] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # boxes fully outside the image
        target: dict[str, Any] = {
            "boxes": boxes[keep],
            "labels": torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64)[keep],
            "image_id": entry["id"],
        }
        if self.has_masks:
            masks = [self._decode(a["segmentation"], height, width, entry) for a in anns]
            stacked = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
            target["masks"] = stacked[keep]
        if self.keypoint_names:
            k = len(self.keypoint_names)
            points = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, k, 3)
            target["keypoints"] = points[keep]
        return image, target

    def _decode(self, segmentation: Any, height: int, width: int, entry: dict[str, Any]) -> np.ndarray:
        try:
            if isinstance(segmentation, list):  # polygons
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = segmentation
            return mask_utils.decode(rle).astype(np.uint8)
        except (TypeError, ValueError, AttributeError, IndexError) as error:
            raise DataError(
                self.annotation_file, f"cannot decode a segmentation of image id {entry['id']} ({error})"
            ) from None

    @cached_property
    def coco(self) -> COCO:
        return coco_from_dict(self._data)
