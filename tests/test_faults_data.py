"""Malformed datasets are repaired or refused when the dataset is built, never in the middle of training.

COCO's optional fields (``area``, ``iscrowd``, annotation ``id``, ``num_keypoints``, image ``width``/``height``) are
derived the way COCO tools derive them, reported once per kind with a ``DataWarning``, and the repaired file scores
with ``COCOeval``; whatever cannot be repaired is a ``DataError`` naming the file, the entry and the field.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pvt_backbone.training.data import (
    CocoDetection,
    DataError,
    DataWarning,
    SegmentationFolder,
    SyntheticConfig,
    SyntheticShapes,
    write_coco,
)
from pvt_backbone.training.evaluation import coco_evaluate

SCENES = SyntheticConfig(image_size=64, min_objects=2, max_objects=3)
Mutation = Callable[[dict[str, Any]], None]


def _coco(tmp_path: Path, mutate: Mutation) -> tuple[Path, Path, dict[str, Any]]:
    """Two synthetic scenes as a COCO file (RLE masks, keypoints), changed by ``mutate``; also the original dict."""
    images, annotation = tmp_path / "images", tmp_path / "instances.json"
    write_coco(SyntheticShapes("val", num_images=2, config=SCENES), images, annotation)
    original = json.loads(annotation.read_text())
    data = json.loads(annotation.read_text())
    mutate(data)
    annotation.write_text(json.dumps(data))
    return images, annotation, original


def _build(images: Path, annotation: Path, **options: bool) -> tuple[CocoDetection, list[str]]:
    """The dataset and the DataWarning messages its construction emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = CocoDetection(images, annotation, **options)
    return data, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def _drop(*fields: str, where: Callable[[int], bool] = lambda i: True) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        for index, ann in enumerate(data["annotations"]):
            if where(index):
                for name in fields:
                    ann.pop(name, None)

    return mutate


def _cases(table: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [case[1:] for case in table]


def _names(table: list[tuple[Any, ...]]) -> list[str]:
    return [case[0] for case in table]


def _refused(tmp_path: Path, mutate: Mutation, problem: str, **options: bool) -> DataError:
    images, annotation, _ = _coco(tmp_path, mutate)
    with pytest.raises(DataError, match=problem) as caught:
        CocoDetection(images, annotation, **options)
    assert str(caught.value).startswith(f"{annotation}: ")  # the message starts with the offending file
    return caught.value


# -- optional fields are derived, reported and seen by COCOeval ------------------------------------------------------
def test_missing_area_iscrowd_and_ids_are_derived_and_reported_once(tmp_path: Path) -> None:
    def mutate(data: dict[str, Any]) -> None:
        anns = data["annotations"]
        _drop("area", "iscrowd")(data)
        for ann in anns[1:3]:
            del ann["id"]
        anns[1]["segmentation"] = [[10, 10, 30, 10, 30, 20, 10, 20]]  # a polygon: area from its rasterised mask
        del anns[2]["segmentation"]  # no mask: area from the box

    images, annotation, original = _coco(tmp_path, mutate)
    data, reports = _build(images, annotation)
    anns = sorted(data.coco.dataset["annotations"], key=lambda a: a["id"])
    count = len(anns)
    assert len(reports) == 3 and all(message.startswith(f"{annotation}: ") for message in reports)
    assert any(re.search(rf"{count} annotations had no 'area'", m) for m in reports)
    assert any(re.search(rf"{count} annotations had no 'iscrowd'; set to 0", m) for m in reports)
    assert any(re.search(rf"2 annotations had no 'id'; assigned {count + 1}..{count + 2}", m) for m in reports)
    assert data.repairs == {"area": count, "iscrowd": count, "id": 2}
    kept = [a["id"] for a in original["annotations"]]
    assert [a["id"] for a in anns] == sorted({kept[0], *kept[3:], count + 1, count + 2})  # unique, after the largest
    assert all(a["iscrowd"] == 0 for a in anns)
    by_box = {tuple(a["bbox"]): a for a in anns}
    for before in original["annotations"]:
        after = by_box[tuple(before["bbox"])]
        segmentation = after.get("segmentation")
        if segmentation is None:
            assert after["area"] == before["bbox"][2] * before["bbox"][3]
        elif isinstance(segmentation, list):
            assert after["area"] == 20 * 10  # the 20 x 10 rectangle's pixels
        else:
            assert after["area"] == before["area"] == float(mask_utils.area(segmentation))


def test_repaired_file_scores_perfectly_with_coco_evaluate(tmp_path: Path) -> None:
    def mutate(data: dict[str, Any]) -> None:
        _drop("area", "iscrowd", "id", "num_keypoints")(data)
        for image in data["images"]:
            del image["width"], image["height"]  # COCOeval's segm needs them to rasterise polygons

    images, annotation, original = _coco(tmp_path, mutate)
    data, reports = _build(images, annotation, masks=True, keypoints=True)
    assert set(data.repairs) == {"area", "iscrowd", "id", "num_keypoints", "image size"} and len(reports) == 5
    assert any("2 images had no 'width'/'height'" in message for message in reports)
    assert all(a["num_keypoints"] == 4 for a in data.coco.dataset["annotations"])  # every synthetic point is visible
    fields = ("image_id", "category_id", "bbox", "segmentation", "keypoints")
    results = [{**{k: a[k] for k in fields}, "score": 1.0} for a in original["annotations"]]
    metrics = coco_evaluate(data.coco, results, ("bbox", "segm", "keypoints"))
    assert metrics["bbox_mAP"] == metrics["segm_mAP"] == metrics["keypoints_mAP"] == pytest.approx(1.0)
    _, target = data[0]
    assert target["masks"].shape[1:] == (64, 64)


def test_crowd_regions_need_a_mask_and_get_zero_keypoints(tmp_path: Path) -> None:
    def crowd_without(field: str) -> Mutation:
        def mutate(data: dict[str, Any]) -> None:
            data["annotations"][1]["iscrowd"] = 1
            del data["annotations"][1][field]

        return mutate

    error = _refused(
        tmp_path / "masks",
        crowd_without("segmentation"),
        r"annotation id 2 is a crowd region .* 'segmentation'",
        masks=True,
    )
    assert "masks=True" in str(error)
    images, annotation, _ = _coco(tmp_path / "boxes", crowd_without("segmentation"))
    CocoDetection(images, annotation)  # boxes only: a crowd box needs no mask
    images, annotation, original = _coco(tmp_path / "points", crowd_without("keypoints"))
    data, reports = _build(images, annotation, keypoints=True)
    note = "1 crowd annotation had no 'keypoints'; set to zeros (not labelled), as COCO does"
    assert reports == [f"{annotation}: {note}"]
    crowd = data.coco.anns[2]
    assert crowd["keypoints"] == [0] * 12 and crowd["num_keypoints"] == 0
    results = [{k: a[k] for k in ("image_id", "category_id", "bbox", "keypoints")} for a in original["annotations"]]
    metrics = coco_evaluate(data.coco, [{**r, "score": 1.0} for r in results], ("keypoints",))
    assert metrics["keypoints_mAP"] == pytest.approx(1.0)


# -- what cannot be repaired is refused ------------------------------------------------------------------------------
def _segmentation(value: Any) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        data["annotations"][0]["segmentation"] = value(data["annotations"][0]["segmentation"])

    return mutate


BAD_SEGMENTATIONS = [
    ("odd polygon", lambda s: [[1, 1, 10, 1, 10, 10, 1]], r"polygon 0 has 7 numbers; a polygon is x, y pairs"),
    ("short polygon", lambda s: [[1, 1, 10, 1]], r"polygon 0 has 4 numbers; .* at least 6 \(3 points\)"),
    ("text polygon", lambda s: [[1, 1, 10, 1, 10, "x"]], r"polygon 0 holds 'x'"),
    ("rle without counts", lambda s: {"size": s["size"]}, r"RLE lacks 'counts'"),
    ("rle without size", lambda s: {"counts": s["counts"]}, r"RLE lacks 'size'"),
    ("rle of another size", lambda s: {**s, "size": [32, 32]}, r"RLE size \[32, 32\] .* \[64, 64\]"),
    ("rle counts short", lambda s: {"size": [64, 64], "counts": [10, 5]}, r"RLE counts sum to 15, not .* 4096"),
    ("neither", lambda s: "mask.png", r"neither polygons .* nor an RLE dict: 'mask.png'"),
]


@pytest.mark.parametrize(("change", "problem"), _cases(BAD_SEGMENTATIONS), ids=_names(BAD_SEGMENTATIONS))
def test_malformed_masks_are_refused_naming_annotation_and_field(tmp_path: Path, change: Any, problem: str) -> None:
    _refused(tmp_path, _segmentation(change), rf"annotation id 1 has an invalid 'segmentation': {problem}", masks=True)


def _set(section: str, index: int, field: str, value: Any) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        data[section][index][field] = value

    return mutate


def _duplicate_id(data: dict[str, Any]) -> None:
    data["annotations"][2]["id"] = data["annotations"][0]["id"]


BAD_IDS = [
    ("image id list", _set("images", 1, "id", [2]), r"image #1 has a non-integer 'id': \[2\]"),
    ("image id text", _set("images", 0, "id", "1"), r"image #0 has a non-integer 'id': '1'"),
    ("category id list", _set("categories", 2, "id", [3]), r"category #2 has a non-integer 'id': \[3\]"),
    ("category id bool", _set("categories", 0, "id", True), r"category #0 has a non-integer 'id': True"),
    ("annotation id list", _set("annotations", 1, "id", [2]), r"annotation #1 has a non-integer 'id': \[2\]"),
    ("annotation id float", _set("annotations", 1, "id", 2.0), r"annotation #1 has a non-integer 'id': 2.0"),
    ("annotation id zero", _set("annotations", 1, "id", 0), r"annotation #1 has 'id' 0; COCOeval needs ids >= 1"),
    ("duplicate id", _duplicate_id, r"annotation #2 has 'id' 1, the same as annotation #0"),
    ("image_id list", _set("annotations", 1, "image_id", [1]), r"annotation id 2 has a non-integer 'image_id': \[1\]"),
    ("category_id list", _set("annotations", 1, "category_id", [1]), r"annotation id 2 has a non-integer 'category_"),
    ("file_name list", _set("images", 0, "file_name", ["a.png"]), r"image #0 has a non-text 'file_name': \['a.png'\]"),
]


@pytest.mark.parametrize(("mutate", "problem"), _cases(BAD_IDS), ids=_names(BAD_IDS))
def test_unusable_ids_are_refused_naming_entry_and_field(tmp_path: Path, mutate: Mutation, problem: str) -> None:
    _refused(tmp_path, mutate, problem)


BAD_FIELDS = [
    ("area text", _set("annotations", 1, "area", "big"), r"annotation id 2 has 'area' 'big'; expected a number >= 0"),
    ("area negative", _set("annotations", 1, "area", -4), r"annotation id 2 has 'area' -4; expected a number >= 0"),
    ("iscrowd 2", _set("annotations", 1, "iscrowd", 2), r"annotation id 2 has 'iscrowd' 2; expected 0 or 1"),
    ("keypoint text", _set("annotations", 0, "keypoints", ["a"] * 12), r"annotation id 1 has 'keypoints' holding 'a'"),
    ("num_keypoints", _set("annotations", 0, "num_keypoints", "4"), r"annotation id 1 has 'num_keypoints' '4'"),
]


@pytest.mark.parametrize(("mutate", "problem"), _cases(BAD_FIELDS), ids=_names(BAD_FIELDS))
def test_invalid_optional_fields_are_refused(tmp_path: Path, mutate: Mutation, problem: str) -> None:
    _refused(tmp_path, mutate, problem, keypoints=True)


def test_masks_of_unchecked_images_are_checked_when_loaded(tmp_path: Path) -> None:
    images, annotation, _ = _coco(tmp_path, lambda data: None)
    Image.new("RGB", (32, 32)).save(images / "synthetic_val_000000.png")  # the file no longer matches the JSON
    data = CocoDetection(images, annotation, masks=True, check_images=False)  # the JSON's sizes are trusted
    with pytest.raises(DataError, match=rf"{re.escape(str(annotation))}: annotation id 1 has a 64x64 mask .* is 32x32"):
        data[0]


# -- mask folders ----------------------------------------------------------------------------------------------------
def test_folder_class_ids_must_fit_a_byte_without_num_classes(tmp_path: Path) -> None:
    image_dir, mask_dir = tmp_path / "img", tmp_path / "mask"
    image_dir.mkdir()
    mask_dir.mkdir()
    Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8)).save(image_dir / "a.png")
    mask = np.zeros((10, 20), dtype=np.uint16)
    mask[0, :3] = (255, 300, 1000)  # 16-bit PNG: 255 is ignore, 300 and 1000 are no class id
    Image.fromarray(mask).save(mask_dir / "a.png")
    with pytest.raises(DataError, match=r"a\.png: class ids \[300, 1000\] outside \[0, 255\) \(255 = ignore\)"):
        SegmentationFolder(image_dir, mask_dir)
    palette = Image.new("P", (20, 10), 2)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    palette.save(mask_dir / "a.png")
    assert SegmentationFolder(image_dir, mask_dir).num_classes == 3  # palette masks hold class ids too
    (mask_dir / "a.png").write_bytes((mask_dir / "a.png").read_bytes()[:60])  # truncated: fails at build time
    with pytest.raises(DataError, match=r"a\.png: cannot read mask"):
        SegmentationFolder(image_dir, mask_dir)


def test_decompression_bomb_is_a_data_error(tmp_path, monkeypatch) -> None:
    from PIL import Image

    from pvt_backbone.training.data import DataError, load_image

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 > 2 x 100 pixels: PIL refuses it as a bomb
    with pytest.raises(DataError, match="big.png.*cannot read image"):
        load_image(tmp_path / "big.png")
