"""The COCO instances format, field by field: what an annotation must hold, and the optional fields COCO tools derive.

``annotation_problem`` says what is wrong with one annotation (``None`` when nothing is); the ``fill_*`` functions
derive the optional fields that pycocotools' ``COCOeval`` reads but labelling tools often leave out, the way COCO's
own tools derive them, and return how many entries they changed; ``report_repairs`` warns once per kind of repair.

Example:
    >>> anns = [{"bbox": [0, 0, 4, 2], "segmentation": [[0, 0, 3, 0, 3, 2, 0, 2]]}, {"id": 7, "bbox": [1, 1, 2, 5]}]
    >>> fill_areas(anns, lambda ann: (8, 8)), [a["area"] for a in anns]  # the polygon's pixels; the box's w * h
    (2, [6.0, 10.0])
    >>> check_annotation_ids("ann.json", anns), fill_ids(anns), [a["id"] for a in anns]
    (1, range(8, 9), [8, 7])
    >>> annotation_problem({"bbox": [0, 0, 4, 2], "segmentation": {"size": [8, 8]}}, size=None)
    "has an invalid 'segmentation': RLE lacks 'counts'; an RLE dict holds 'counts' and 'size' [height, width]"
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .errors import DataError, DataWarning

__all__ = [
    "REPAIR_NOTES",
    "is_id",
    "annotation_name",
    "annotation_problem",
    "image_problem",
    "segmentation_problem",
    "to_rle",
    "check_annotation_ids",
    "fill_ids",
    "fill_areas",
    "fill_crowd_flags",
    "fill_keypoint_counts",
    "report_repairs",
]

# What each kind of repair did, as (what was repaired, how), completing "<file>: <count> <what>(s) <how>".
REPAIR_NOTES = {
    "image size": ("image", "had no 'width'/'height'; read from the image files"),
    "id": ("annotation", "had no 'id'; assigned {ids}, after the largest existing id"),
    "iscrowd": ("annotation", "had no 'iscrowd'; set to 0"),
    "area": (
        "annotation",
        "had no 'area'; derived from the mask (pycocotools.mask.area), or the box (width * height) without a mask",
    ),
    "keypoints": ("crowd annotation", "had no 'keypoints'; set to zeros (not labelled), as COCO does"),
    "num_keypoints": ("annotation", "had no 'num_keypoints'; counted from the keypoints (visibility > 0)"),
}
_HeightWidth = tuple[int, int]  # (height, width), the order of an RLE's "size"


def is_id(value: Any) -> bool:
    """Whether ``value`` can be a COCO id: an int (JSON booleans are not ids)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def annotation_name(ann: dict[str, Any], position: int) -> str:
    """How messages name an annotation: ``annotation id 7``, or ``annotation #3`` (its index) without a usable id."""
    return f"annotation id {ann['id']}" if is_id(ann.get("id")) else f"annotation #{position}"


def to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A checked ``segmentation`` (polygons, uncompressed or compressed RLE) as one compressed RLE of the image."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


# -- checks ----------------------------------------------------------------------------------------------------------
def _polygon_problem(polygons: list[Any]) -> str | None:
    for index, polygon in enumerate(polygons):
        if not isinstance(polygon, list):
            return f"polygon {index} is not a list of x, y numbers: {polygon!r}"
        bad = [value for value in polygon if not _is_number(value)]
        if bad:
            return f"polygon {index} holds {bad[0]!r}; polygons hold finite numbers"
        if len(polygon) % 2 or len(polygon) < 6:
            return (
                f"polygon {index} has {len(polygon)} numbers; "
                "a polygon is x, y pairs: an even count, at least 6 (3 points)"
            )
    return None


def _rle_problem(rle: dict[str, Any], size: _HeightWidth | None) -> str | None:
    missing = [repr(key) for key in ("counts", "size") if key not in rle]
    if missing:
        return f"RLE lacks {' and '.join(missing)}; an RLE dict holds 'counts' and 'size' [height, width]"
    shape, counts = rle["size"], rle["counts"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(is_id(v) and v > 0 for v in shape)):
        return f"RLE size {shape!r} is not [height, width] (two integers > 0)"
    if size is not None and shape != list(size):
        return f"RLE size {shape} differs from its image's [height, width] {list(size)}"
    if isinstance(counts, list):
        if not all(is_id(v) and v >= 0 for v in counts):
            return "RLE counts must be run lengths (integers >= 0)"
        if sum(counts) != shape[0] * shape[1]:
            return f"RLE counts sum to {sum(counts)}, not height * width = {shape[0] * shape[1]}"
    elif not isinstance(counts, str):
        return f"RLE counts must be a string (compressed) or a list of run lengths, got {counts!r}"
    return None


def segmentation_problem(segmentation: Any, size: _HeightWidth | None) -> str | None:
    """What is wrong with a non-empty ``segmentation`` of an image of ``size`` (height, width; ``None``: unknown).

    Example:
        >>> segmentation_problem({"size": [32, 32], "counts": "PP5"}, (64, 64))
        "RLE size [32, 32] differs from its image's [height, width] [64, 64]"
    """
    if isinstance(segmentation, list):
        return _polygon_problem(segmentation)
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, size)
    return f"neither polygons (a list of lists) nor an RLE dict: {segmentation!r}"


def _box_problem(ann: dict[str, Any]) -> str | None:
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return f"has no valid 'bbox' [x, y, width, height]: {box!r}"
    if not all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
        return f"has a degenerate box {box} (width and height must be > 0)"
    return None


def _optional_problem(ann: dict[str, Any]) -> str | None:
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
        return f"has 'iscrowd' {ann['iscrowd']!r}; expected 0 or 1"
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
        return f"has 'area' {ann['area']!r}; expected a number >= 0 (or no 'area': it is derived from the mask)"
    return None


def _mask_problem(ann: dict[str, Any], size: _HeightWidth | None, masks: bool) -> str | None:
    segmentation = ann.get("segmentation")
    if masks and not segmentation:
        if ann.get("iscrowd", 0):
            return (
                "is a crowd region (iscrowd=1) without 'segmentation'; masks=True needs a mask on every annotation "
                "(COCOeval's segm scores crowd regions too)"
            )
        return "has no 'segmentation' but masks were requested"
    if not segmentation:
        return None
    problem = segmentation_problem(segmentation, size)
    return None if problem is None else f"has an invalid 'segmentation': {problem}"


def _keypoint_problem(ann: dict[str, Any], count: int) -> str | None:
    if not count or (ann.get("iscrowd", 0) and "keypoints" not in ann):
        return None  # crowd regions without keypoints get zeros (fill_keypoint_counts)
    points = ann.get("keypoints")
    if not isinstance(points, list) or len(points) != 3 * count:
        return f"needs 'keypoints' with {3 * count} numbers ({count} keypoints x (x, y, v)), got {points!r}"
    bad = [value for value in points if not _is_number(value)]
    if bad:
        return f"has 'keypoints' holding {bad[0]!r}; expected {3 * count} finite numbers"
    if "num_keypoints" in ann and not (is_id(ann["num_keypoints"]) and ann["num_keypoints"] >= 0):
        return f"has 'num_keypoints' {ann['num_keypoints']!r}; expected an integer >= 0 (or none: it is counted)"
    return None


def annotation_problem(
    ann: dict[str, Any], *, size: _HeightWidth | None, masks: bool = False, keypoint_count: int = 0
) -> str | None:
    """What is wrong with an annotation's box, flags, mask and keypoints, as the rest of a sentence naming it.

    Args:
        ann: one entry of ``annotations`` (its references to images and categories are checked elsewhere).
        size: (height, width) of its image, ``None`` when unknown (an RLE's size is then not compared).
        masks: whether masks are used: every annotation, crowd regions included, needs a ``segmentation``.
        keypoint_count: K when keypoints are used: non-crowd annotations need 3K finite ``keypoints``.

    Returns:
        ``None``, or the words that follow the annotation's name: ``"has a degenerate box ..."``, ``"has an invalid
        'segmentation': polygon 0 has 7 numbers ..."``.
    """
    problem = _box_problem(ann) or _optional_problem(ann) or _mask_problem(ann, size, masks)
    return problem or _keypoint_problem(ann, keypoint_count)


def check_annotation_ids(source: str | Path, annotations: list[dict[str, Any]]) -> int:
    """``DataError`` unless every annotation id is an int >= 1 used once; returns how many annotations have none.

    COCOeval stores the matched ground-truth id per detection and reads 0 as "unmatched", so ids start at 1.
    """
    seen: dict[int, int] = {}
    missing = 0
    for position, ann in enumerate(annotations):
        if "id" not in ann:
            missing += 1
            continue
        value = ann["id"]
        if not is_id(value):
            raise DataError(source, f"annotation #{position} has a non-integer 'id': {value!r}")
        if value < 1:
            raise DataError(source, f"annotation #{position} has 'id' {value}; COCOeval needs ids >= 1")
        if value in seen:
            raise DataError(source, f"annotation #{position} has 'id' {value}, the same as annotation #{seen[value]}")
        seen[value] = position
    return missing


# -- repairs ---------------------------------------------------------------------------------------------------------
def fill_ids(annotations: list[dict[str, Any]]) -> range:
    """Give annotations without an ``id`` the next ids after the largest one (ids checked by check_annotation_ids);
    returns the ids assigned."""
    first = max((ann["id"] for ann in annotations if "id" in ann), default=0) + 1
    filled = 0
    for ann in annotations:
        if "id" not in ann:
            ann["id"] = first + filled
            filled += 1
    return range(first, first + filled)


def fill_areas(annotations: list[dict[str, Any]], size_of: Callable[[dict[str, Any]], _HeightWidth]) -> int:
    """Set a missing ``area``: the pixel count of the mask, else the box's width * height, as COCO tools do.

    ``size_of(ann)`` gives (height, width) of the annotation's image; it is asked only for polygons.
    """
    filled = 0
    for ann in annotations:
        if "area" in ann:
            continue
        segmentation = ann.get("segmentation")
        if not segmentation:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
        else:
            height, width = segmentation["size"] if isinstance(segmentation, dict) else size_of(ann)
            ann["area"] = float(mask_utils.area(to_rle(segmentation, height, width)))
        filled += 1
    return filled


def fill_crowd_flags(annotations: list[dict[str, Any]]) -> int:
    """Set a missing ``iscrowd`` to 0 (a single object)."""
    filled = 0
    for ann in annotations:
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            filled += 1
    return filled


def fill_keypoint_counts(annotations: list[dict[str, Any]], keypoint_count: int) -> tuple[int, int]:
    """Give crowd regions without ``keypoints`` 3K zeros and ``num_keypoints`` 0; count ``num_keypoints`` where it
    is missing (keypoints with visibility > 0). Returns (crowd regions filled, counts filled)."""
    crowds = counted = 0
    for ann in annotations:
        if ann.get("iscrowd", 0) and "keypoints" not in ann:
            ann["keypoints"], ann["num_keypoints"] = [0] * (3 * keypoint_count), 0
            crowds += 1
        elif "num_keypoints" not in ann:
            ann["num_keypoints"] = sum(1 for v in ann["keypoints"][2::3] if v > 0)
            counted += 1
    return crowds, counted


def report_repairs(
    source: str | Path, repairs: dict[str, int], *, assigned_ids: range = range(0), stacklevel: int = 1
) -> None:
    """One ``DataWarning`` per kind of repair (keys of ``REPAIR_NOTES``) with a count above 0.

    ``assigned_ids`` are the ids ``fill_ids`` assigned, named in the ``id`` warning; ``stacklevel`` counts frames
    from the caller (1: the warning points at the line calling this function).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     report_repairs("ann.json", {"iscrowd": 1, "id": 2, "area": 0}, assigned_ids=range(8, 10))
        >>> for warning in caught:
        ...     print(warning.message)
        ann.json: 1 annotation had no 'iscrowd'; set to 0
        ann.json: 2 annotations had no 'id'; assigned 8..9, after the largest existing id
    """
    ids = f"{assigned_ids.start}..{assigned_ids.stop - 1}" if len(assigned_ids) > 1 else f"{assigned_ids.start}"
    for kind, count in repairs.items():
        if count:
            what, how = REPAIR_NOTES[kind]
            message = f"{source}: {count} {what}{'' if count == 1 else 's'} {how.format(ids=ids)}"
            warnings.warn(message, DataWarning, stacklevel=stacklevel + 1)


def image_problem(entry: dict[str, Any]) -> str | None:
    """What is wrong with one entry of ``images`` (id, file name, optional size), as words following its name.

    Example:
        >>> image_problem({"id": "7", "file_name": "a.png"}), image_problem({"id": 7, "file_name": "a.png"})
        ("has a non-integer 'id': '7'", None)
    """
    if not is_id(entry["id"]):
        return f"has a non-integer 'id': {entry['id']!r}"
    if not isinstance(entry["file_name"], str):
        return f"has a non-text 'file_name': {entry['file_name']!r}"
    declared = [key for key in ("width", "height") if key in entry]
    if len(declared) == 1:
        return f"has {declared[0]!r} alone; give both 'width' and 'height' or neither"
    bad = [key for key in declared if not (is_id(entry[key]) and entry[key] > 0)]
    if bad:
        return f"has {bad[0]!r} {entry[bad[0]]!r}; expected an integer > 0"
    return None
