"""COCO-format detection, instance segmentation and keypoints: an image folder plus an instances JSON.

Everything that can be checked without decoding pixels is checked when the dataset is built, so a bad file fails
before training starts, with a ``DataError`` naming the file, the entry (its id, or its index ``#k`` without a
usable id) and the problem: a missing or unreadable annotation file, an empty image list, an id that is not an int
(ids of annotations are also unique and >= 1), an annotation pointing at an unknown image or category, a degenerate
box, a malformed mask (a polygon of an odd or too small count of numbers, an RLE without ``counts``/``size`` or of
another size than its image), a mask missing where masks are used (crowd regions included), malformed keypoints, a
missing or unreadable image, an image whose size differs from the JSON. Images without annotations are valid (empty
targets). The optional fields COCO tools derive are filled in when missing (see ``coco_format``), each kind reported
once with a ``DataWarning``; the repaired file is what ``coco`` and so ``COCOeval`` see.

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
from .coco_format import (
    annotation_name,
    annotation_problem,
    check_annotation_ids,
    fill_areas,
    fill_crowd_flags,
    fill_ids,
    fill_keypoint_counts,
    image_problem,
    is_id,
    report_repairs,
    to_rle,
)
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
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
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


def _read_instances(source: Path) -> dict[str, Any]:
    """The JSON of a COCO instances file with lists ``images`` (not empty), ``categories`` (not empty) and
    ``annotations`` (added when absent)."""
    if not source.is_file():
        raise DataError(source, "annotation file not found")
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(source, f"cannot read annotation JSON ({error})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise DataError(source, "not a COCO instances file: expected lists 'images' and 'categories'")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise DataError(source, "not a COCO instances file: 'annotations' must be a list")
    if not data["images"]:
        raise DataError(source, "empty dataset: 'images' lists no image")
    if not data["categories"]:
        raise DataError(source, "no categories: 'categories' is empty")
    return data


def _keypoint_names(source: Path, categories: dict[int, dict[str, Any]]) -> tuple[str, ...]:
    names = {tuple(c.get("keypoints") or ()) for c in categories.values()}
    if len(names) != 1 or not next(iter(names)):
        raise DataError(
            source,
            "keypoints requested but the categories do not all declare the same non-empty 'keypoints' name list",
        )
    return tuple(str(n) for n in next(iter(names)))


def _reference_problem(
    ann: dict[str, Any], images: dict[int, Any], categories: dict[int, dict[str, Any]]
) -> str | None:
    """What is wrong with an annotation's ``image_id`` and ``category_id``, as words following its name."""
    for field, known in (("image_id", images), ("category_id", categories)):
        value = ann.get(field)
        if value is not None and not is_id(value):
            return f"has a non-integer {field!r}: {value!r}"
        if value not in known:
            listed = f" (known: {sorted(known)})" if field == "category_id" else ""
            return f"refers to unknown {field} {value!r}{listed}"
    return None


class CocoDetection(DetectionDataset):
    """A COCO instances file over an image folder.

    Optional fields that pycocotools' ``COCOeval`` reads are derived when missing (``area``, ``iscrowd``, annotation
    ids, ``num_keypoints``, image ``width``/``height``, a crowd region's ``keypoints``); ``repairs`` counts them per
    kind, each kind is reported once with a ``DataWarning``, and ``coco`` holds the repaired file.

    Args:
        image_dir: folder the ``file_name`` entries are relative to.
        annotation_file: COCO instances JSON (``images``, ``annotations``, ``categories``).
        masks: return instance masks (``segmentation`` becomes required on every annotation, crowd regions too).
        keypoints: return keypoints (categories must declare ``keypoints`` names; annotations carry 3K numbers).
        check_images: open every image header at construction (existence is always checked; with ``masks``, the
            headers of images whose size the file does not declare are read anyway).
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
        data = _read_instances(source)
        self._images = self._check_images(source, data["images"])
        categories = self._check_categories(source, data["categories"])
        self.category_ids = tuple(sorted(categories))
        self.categories = tuple(str(categories[i].get("name", i)) for i in self.category_ids)
        self._label_of = {cid: label for label, cid in enumerate(self.category_ids, start=1)}
        if keypoints:
            self.keypoint_names = _keypoint_names(source, categories)
        self._sizes = self._check_files(check_images)
        sized = self._fill_image_sizes(masks)
        self._annotations = self._check_annotations(source, data["annotations"], categories)
        self.repairs = self._repair(data["annotations"], sized)
        self._data = data

    # -- validation ------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_images(source: Path, images: list[Any]) -> list[dict[str, Any]]:
        seen: set[int] = set()
        for position, entry in enumerate(images):
            if not isinstance(entry, dict) or not {"id", "file_name"} <= entry.keys():
                raise DataError(source, f"image entry {entry!r} lacks 'id' or 'file_name'")
            problem = image_problem(entry)
            if problem is not None:
                raise DataError(source, f"image #{position} {problem}")
            if entry["id"] in seen:
                raise DataError(source, f"image id {entry['id']} appears twice in 'images'")
            seen.add(entry["id"])
        return images

    @staticmethod
    def _check_categories(source: Path, categories: list[Any]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for position, entry in enumerate(categories):
            if not isinstance(entry, dict) or "id" not in entry:
                raise DataError(source, f"category entry {entry!r} lacks an integer 'id'")
            if not is_id(entry["id"]):
                raise DataError(source, f"category #{position} has a non-integer 'id': {entry['id']!r}")
            if entry["id"] in out:
                raise DataError(source, f"category id {entry['id']} appears twice in 'categories'")
            out[entry["id"]] = entry
        return out

    def _check_annotations(
        self, source: Path, annotations: list[Any], categories: dict[int, dict[str, Any]]
    ) -> dict[int, list[dict[str, Any]]]:
        by_image: dict[int, list[dict[str, Any]]] = {entry["id"]: [] for entry in self._images}
        for position, ann in enumerate(annotations):
            if not isinstance(ann, dict):
                raise DataError(source, f"annotation #{position} is not an object: {ann!r}")
        check_annotation_ids(source, annotations)
        for position, ann in enumerate(annotations):
            problem = _reference_problem(ann, by_image, categories) or annotation_problem(
                ann,
                size=self._sizes.get(ann["image_id"]),
                masks=self.has_masks,
                keypoint_count=len(self.keypoint_names),
            )
            if problem is not None:
                raise DataError(source, f"{annotation_name(ann, position)} {problem}")
            by_image[ann["image_id"]].append(ann)
        return by_image

    def _check_files(self, check_images: bool) -> dict[int, tuple[int, int]]:
        """Every image exists (and has the size the JSON declares); returns the known (height, width) per image id."""
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
        sizes = {e["id"]: (e["height"], e["width"]) for e in self._images if "width" in e}
        if not check_images:
            return sizes
        for entry in self._images:
            path = self.image_dir / entry["file_name"]
            width, height = _image_size(path)
            declared = (entry.get("width"), entry.get("height"))
            if declared != (None, None) and declared != (width, height):
                raise DataError(
                    path, f"image is {width}x{height} but {self.annotation_file} says {declared[0]}x{declared[1]}"
                )
            sizes[entry["id"]] = (height, width)
        return sizes

    def _size_of(self, entry: dict[str, Any]) -> tuple[int, int]:
        """(height, width) of an image entry, from the JSON or the header (read once)."""
        if entry["id"] not in self._sizes:
            width, height = _image_size(self.image_dir / entry["file_name"])
            self._sizes[entry["id"]] = (height, width)
        return self._sizes[entry["id"]]

    def _fill_image_sizes(self, masks: bool) -> int:
        """Give images without ``width``/``height`` their size where it is known, or always with masks (COCOeval's
        segm rasterises polygons at that size); returns how many were filled."""
        filled = 0
        for entry in self._images:
            if "width" not in entry and (masks or entry["id"] in self._sizes):
                entry["height"], entry["width"] = self._size_of(entry)
                filled += 1
        return filled

    def _repair(self, annotations: list[dict[str, Any]], sized: int) -> dict[str, int]:
        """Derive the optional annotation fields, report each kind once; returns the count per kind repaired."""
        entry_of = {entry["id"]: entry for entry in self._images}
        assigned = fill_ids(annotations)
        repairs = {
            "image size": sized,
            "id": len(assigned),
            "iscrowd": fill_crowd_flags(annotations),
            "area": fill_areas(annotations, lambda ann: self._size_of(entry_of[ann["image_id"]])),
        }
        if self.keypoint_names:
            repairs["keypoints"], repairs["num_keypoints"] = fill_keypoint_counts(annotations, len(self.keypoint_names))
        repairs = {kind: count for kind, count in repairs.items() if count}
        report_repairs(self.annotation_file, repairs, assigned_ids=assigned, stacklevel=3)  # at CocoDetection(...)
        return repairs

    # -- dataset -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._images)

    def image_name(self, index: int) -> str:
        return str(self._images[index]["file_name"])

    def image_path(self, index: int) -> Path:
        return self.image_dir / self._images[index]["file_name"]

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of image ``index``: the sizes the JSON declares, else read from the file's header."""
        entry = self._images[index]
        if "width" in entry and "height" in entry:
            return int(entry["height"]), int(entry["width"])
        return self._size_of(entry)

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
            masks = [self._decode(a, height, width, entry) for a in anns]
            stacked = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
            target["masks"] = stacked[keep]
        if self.keypoint_names:
            k = len(self.keypoint_names)
            points = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, k, 3)
            target["keypoints"] = points[keep]
        return image, target

    def _decode(self, ann: dict[str, Any], height: int, width: int, entry: dict[str, Any]) -> np.ndarray:
        """The (H, W) uint8 mask of a checked annotation; ``DataError`` if it does not fit the loaded image."""
        try:
            mask = mask_utils.decode(to_rle(ann["segmentation"], height, width)).astype(np.uint8)
        except (TypeError, ValueError, AttributeError, IndexError) as error:
            raise DataError(
                self.annotation_file, f"cannot decode the segmentation of annotation id {ann['id']} ({error})"
            ) from None
        if mask.shape != (height, width):
            raise DataError(
                self.annotation_file,
                f"annotation id {ann['id']} has a {mask.shape[1]}x{mask.shape[0]} mask but image {entry['file_name']} "
                f"is {width}x{height} (check_images=False trusts the sizes the file declares)",
            )
        return mask

    @cached_property
    def coco(self) -> COCO:
        return coco_from_dict(self._data)
