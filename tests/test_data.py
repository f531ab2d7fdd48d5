"""Datasets: synthetic scenes are deterministic and self-consistent; COCO and mask-folder data load correctly, and
every kind of bad data fails with a DataError naming the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from heads import resize_bilinear
from pvt_backbone.cli.runner import one_line
from pvt_backbone.training.data import (
    CocoDetection,
    DataError,
    DataWarning,
    SegmentationFolder,
    SyntheticConfig,
    SyntheticSegmentation,
    SyntheticShapes,
    render_scene,
)
from pvt_backbone.training.data.transforms import (
    AugmentedDetection,
    AugmentedSegmentation,
    ResumableSampler,
    hflip_detection,
    keypoint_flip_permutation,
    resize_segmentation,
)

SMALL = SyntheticConfig(image_size=64, num_classes=4, min_objects=0, max_objects=4)


# -- synthetic -------------------------------------------------------------------------------------------------------
def test_synthetic_scenes_are_deterministic_per_split_and_index() -> None:
    a, b = render_scene(SMALL, "train", 3), render_scene(SMALL, "train", 3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(a.image, render_scene(SMALL, "val", 3).image)
    assert not np.array_equal(a.image, render_scene(SMALL, "train", 4).image)
    other_seed = SyntheticConfig(**{**SMALL.__dict__, "seed": 1})
    assert not np.array_equal(a.image, render_scene(other_seed, "train", 3).image)


def test_synthetic_targets_are_consistent() -> None:
    data = SyntheticShapes("train", num_images=12, config=SMALL)
    counts = []
    for index in range(len(data)):
        image, target = data[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
        boxes, masks, labels, points = target["boxes"], target["masks"], target["labels"], target["keypoints"]
        n = len(labels)
        counts.append(n)
        assert boxes.shape == (n, 4) and masks.shape == (n, 64, 64) and points.shape == (n, 4, 3)
        assert target["image_id"] == index + 1
        assert ((labels >= 1) & (labels <= SMALL.num_classes)).all()
        for box, mask, kp in zip(boxes, masks, points):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # tight box of the visible mask
            assert (kp[:, 0] >= 0).all() and (kp[:, 0] <= 64).all() and set(kp[:, 2].tolist()) <= {1.0, 2.0}
        if n > 1:  # visible masks never overlap (occlusion is resolved)
            assert masks.sum(0).max() <= 1
        semantic = SyntheticSegmentation("train", num_images=12, config=SMALL)[index][1]
        expected = torch.zeros(64, 64, dtype=torch.int64)
        for label, mask in zip(labels, masks):
            expected[mask.bool()] = label
        assert torch.equal(semantic, expected)
    assert 0 in counts and max(counts) > 1  # min_objects=0: images without objects occur and are valid


def test_synthetic_coco_ground_truth_matches_targets() -> None:
    data = SyntheticShapes("val", num_images=5, config=SMALL)
    coco = data.coco
    for index in range(len(data)):
        _, target = data[index]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[index + 1]))
        assert len(anns) == len(target["labels"])
        for ann, box, mask in zip(anns, target["boxes"], target["masks"]):
            x, y, w, h = ann["bbox"]
            assert [x, y, x + w, y + h] == box.tolist()
            assert np.array_equal(coco.annToMask(ann), mask.numpy())
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(data.categories)


def test_synthetic_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="num_classes must be an int in"):
        SyntheticConfig(num_classes=9)
    with pytest.raises(ValueError, match="image_size must be an int >= 32"):
        SyntheticConfig(image_size=16)
    with pytest.raises(ValueError, match="split must be one of"):
        SyntheticShapes("test")
    with pytest.raises(ValueError, match=r"max_objects must be an int >= 3, got 2"):
        SyntheticConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match=r"min_scale must be a finite number in \[0.05, 0.9\], got 0.01"):
        SyntheticConfig(min_scale=0.01)
    with pytest.raises(ValueError, match=r"max_scale must be a finite number in \[0.3, 0.9\], got 0.25"):
        SyntheticConfig(min_scale=0.3, max_scale=0.25)
    with pytest.raises(ValueError, match="clutter must be an int >= 0, got -1"):
        SyntheticConfig(clutter=-1)
    with pytest.raises(TypeError, match=r"image_size must be an int >= 32, got True \(bool\)"):
        SyntheticConfig(image_size=True)
    with pytest.raises(ValueError, match="num_images must be an int >= 1, got 0"):
        SyntheticSegmentation("val", num_images=0)


# -- COCO ------------------------------------------------------------------------------------------------------------
def _write_image(path: Path, size: tuple[int, int], value: int = 128) -> None:
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def _coco_files(tmp_path: Path, **changes) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    _write_image(images / "a.png", (40, 30))
    _write_image(images / "b.png", (50, 45))
    data = {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 11, "file_name": "b.png", "width": 50, "height": 45},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 10,
                "category_id": 17,
                "bbox": [2, 3, 10, 5],
                "iscrowd": 0,
                "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]],
                "area": 50,
            },
            {
                "id": 2,
                "image_id": 10,
                "category_id": 3,
                "bbox": [20, 10, 4, 4],
                "iscrowd": 1,
                "segmentation": [[20, 10, 24, 10, 24, 14, 20, 14]],
                "area": 16,
            },
        ],
    }
    data.update(changes)
    annotation = tmp_path / "instances.json"
    annotation.write_text(json.dumps(data))
    return images, annotation


def test_coco_loads_boxes_labels_masks_and_empty_images(tmp_path: Path) -> None:
    images, annotation = _coco_files(tmp_path)
    data = CocoDetection(images, annotation, masks=True)
    assert data.categories == ("cat", "dog") and data.category_ids == (3, 17) and data.num_classes == 3
    image, target = data[0]
    assert image.shape == (3, 30, 40)
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0]]  # xywh -> xyxy; the crowd box is left out
    assert target["labels"].tolist() == [2]  # category 17 is the second category
    assert target["masks"].shape == (1, 30, 40) and target["masks"][0, 5, 5] == 1 and target["masks"][0, 20, 30] == 0
    _, empty = data[1]  # an image without annotations is valid
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, 45, 50)
    assert len(data.coco.getAnnIds()) == 2  # COCOeval still sees the crowd region


BAD_COCO = [
    ({"images": []}, "instances.json", "empty dataset"),
    (
        {"annotations": [{"id": 5, "image_id": 99, "category_id": 3, "bbox": [0, 0, 2, 2]}]},
        "instances.json",
        "annotation id 5 refers to unknown image_id 99",
    ),
    (
        {"annotations": [{"id": 6, "image_id": 10, "category_id": 4, "bbox": [0, 0, 2, 2]}]},
        "instances.json",
        "annotation id 6 refers to unknown category_id 4",
    ),
    (
        {"annotations": [{"id": 7, "image_id": 10, "category_id": 3, "bbox": [0, 0, 0, 2]}]},
        "instances.json",
        "annotation id 7 has a degenerate box",
    ),
    (
        {"annotations": [{"id": 8, "image_id": 10, "category_id": 3, "bbox": [0, 0, 2, -1]}]},
        "instances.json",
        "annotation id 8 has a degenerate box",
    ),
    ({"images": [{"id": 1, "file_name": "missing.png"}], "annotations": []}, "missing.png", "image file not found"),
    (
        {"images": [{"id": 1, "file_name": "a.png", "width": 41, "height": 30}], "annotations": []},
        "a.png",
        "image is 40x30 but .*instances.json says 41x30",
    ),
]


@pytest.mark.parametrize(("changes", "file", "problem"), BAD_COCO, ids=lambda v: str(v)[:30])
def test_coco_bad_data_names_file_and_problem(tmp_path: Path, changes: dict, file: str, problem: str) -> None:
    images, annotation = _coco_files(tmp_path, **changes)
    with pytest.raises(DataError, match=problem) as caught:
        CocoDetection(images, annotation)
    assert file in str(caught.value).split(":")[0]  # the message starts with the offending file


def test_coco_missing_unreadable_and_invalid_files(tmp_path: Path) -> None:
    images, annotation = _coco_files(tmp_path)
    with pytest.raises(DataError, match=r"nope\.json: annotation file not found"):
        CocoDetection(images, tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.json: cannot read annotation JSON"):
        CocoDetection(images, broken)
    (images / "b.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"b\.png: cannot read image"):
        CocoDetection(images, annotation)
    data = CocoDetection(images, annotation, check_images=False)  # header check skipped: fails at load time instead
    with pytest.raises(DataError, match=r"b\.png: cannot read image"):
        data[1]


def test_coco_masks_required_when_requested(tmp_path: Path) -> None:
    ann = {"id": 9, "image_id": 10, "category_id": 3, "bbox": [0, 0, 2, 2]}
    images, annotation = _coco_files(tmp_path, annotations=[ann])
    with pytest.warns(DataWarning) as reports:  # boxes only: fine; area and iscrowd are derived
        data = CocoDetection(images, annotation)
    assert data.repairs == {"iscrowd": 1, "area": 1} and len(reports) == 2
    assert data.coco.anns[9]["area"] == 4.0 and data.coco.anns[9]["iscrowd"] == 0  # the box's w * h
    with pytest.raises(DataError, match="annotation id 9 has no 'segmentation'"):
        CocoDetection(images, annotation, masks=True)


# -- mask folders ----------------------------------------------------------------------------------------------------
def _folder(tmp_path: Path, masks: dict[str, np.ndarray | str]) -> tuple[Path, Path]:
    image_dir, mask_dir = tmp_path / "img", tmp_path / "mask"
    image_dir.mkdir()
    mask_dir.mkdir()
    for name, mask in masks.items():
        _write_image(image_dir / f"{name}.jpg", (20, 10))
        if isinstance(mask, np.ndarray):
            Image.fromarray(mask).save(mask_dir / f"{name}.png")
        elif mask != "none":
            (mask_dir / f"{name}.png").write_bytes(mask.encode())
    return image_dir, mask_dir


def test_folder_loads_pairs_and_infers_classes(tmp_path: Path) -> None:
    mask = np.zeros((10, 20), dtype=np.uint8)
    mask[:, 10:] = 2
    mask[0, 0] = 255
    image_dir, mask_dir = _folder(tmp_path, {"a": mask, "b": np.ones((10, 20), dtype=np.uint8)})
    data = SegmentationFolder(image_dir, mask_dir)
    assert len(data) == 2 and data.num_classes == 3  # largest id 2 -> 3 classes; 255 is ignore
    image, target = data[0]
    assert image.shape == (3, 10, 20) and target.dtype == torch.int64 and target[0, 0] == 255 and target[5, 15] == 2


def test_folder_bad_data_names_file_and_problem(tmp_path: Path) -> None:
    good = np.zeros((10, 20), dtype=np.uint8)
    cases = [
        ({"a": good, "b": "none"}, {}, r"b\.png: mask file not found"),
        ({"a": np.zeros((11, 20), dtype=np.uint8)}, {}, r"a\.png: mask is 20x11 but its image a\.jpg is 20x10"),
        ({"a": np.zeros((10, 20, 3), dtype=np.uint8)}, {}, r"a\.png: mask must be a single-channel image"),
        ({"a": np.full((10, 20), 7, dtype=np.uint8)}, {"num_classes": 3}, r"a\.png: class ids \[7\] outside \[0, 3\)"),
        ({"a": "garbage"}, {}, r"a\.png: cannot read mask"),
    ]
    for i, (masks, kwargs, problem) in enumerate(cases):
        root = tmp_path / str(i)
        root.mkdir()
        with pytest.raises(DataError, match=problem):
            SegmentationFolder(*_folder(root, masks), **kwargs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: empty dataset"):
        SegmentationFolder(empty, empty)
    with pytest.raises(DataError, match=r"nowhere: image folder not found"):
        SegmentationFolder(tmp_path / "nowhere", empty)
    with pytest.raises(DataError, match=r"nowhere: mask folder not found"):
        SegmentationFolder(empty, tmp_path / "nowhere")


def test_folder_missing_masks_are_listed_and_class_settings_checked(tmp_path: Path) -> None:
    good = np.zeros((10, 20), dtype=np.uint8)
    image_dir, mask_dir = _folder(tmp_path, {"a": "none", "b": good, "c": "none"})
    with pytest.raises(DataError, match=r"a\.png: mask file not found; 2 images have no mask: .*a\.png.*c\.png"):
        SegmentationFolder(image_dir, mask_dir)
    for name in "abc":
        Image.fromarray(np.full((10, 20), 255, dtype=np.uint8)).save(mask_dir / f"{name}.png")
    with pytest.raises(DataError, match=r"mask: every mask is all-ignore \(255\); pass num_classes explicitly"):
        SegmentationFolder(image_dir, mask_dir)
    assert SegmentationFolder(image_dir, mask_dir, num_classes=2, class_names=("bg", "fg")).classes == ("bg", "fg")
    with pytest.raises(ValueError, match="class_names has 1 names for 2 classes"):
        SegmentationFolder(image_dir, mask_dir, num_classes=2, class_names=("bg",))
    with pytest.raises(ValueError, match=r"num_classes must be an int in \[1, 255\], got 256"):
        SegmentationFolder(image_dir, mask_dir, num_classes=256)
    with pytest.raises(TypeError, match=r"num_classes must be an int in \[1, 255\], got True \(bool\)"):
        SegmentationFolder(image_dir, mask_dir, num_classes=True)


# -- augmentation and sampling ---------------------------------------------------------------------------------------
def test_hflip_moves_boxes_masks_and_swaps_left_right_keypoints() -> None:
    image = torch.zeros(3, 4, 10)
    image[:, :, 0] = 1
    masks = torch.zeros(1, 4, 10, dtype=torch.uint8)
    masks[0, :, 1:3] = 1
    target = {
        "boxes": torch.tensor([[1.0, 0.0, 3.0, 4.0]]),
        "masks": masks,
        "keypoints": torch.tensor([[[2.0, 0.5, 2], [2.5, 2, 2], [2.0, 3.5, 2], [1.5, 2, 2]]]),
    }
    perm = keypoint_flip_permutation(["top", "right", "bottom", "left"])
    assert perm == [0, 3, 2, 1]
    assert keypoint_flip_permutation(["nose", "left_eye", "right_eye"]) == [0, 2, 1]
    flipped, out = hflip_detection(image, target, perm)
    assert flipped[0, 0, 9] == 1 and out["boxes"].tolist() == [[7.0, 0.0, 9.0, 4.0]]
    ys, xs = torch.nonzero(out["masks"][0], as_tuple=True)
    assert (xs.min(), xs.max() + 1) == (7, 9)  # the flipped mask still fits the flipped box
    assert out["keypoints"][0, :, 0].tolist() == [8.0, 8.5, 8.0, 7.5]  # new right = old left mirrored


def test_resize_segmentation_is_bilinear_for_images_and_nearest_for_masks() -> None:
    image = torch.rand(3, 20, 30)
    mask = torch.randint(0, 3, (20, 30))
    mask[0, 0] = 255
    resized, resized_mask = resize_segmentation(image, mask, 40)
    assert torch.equal(resized, resize_bilinear(image[None], (40, 40))[0])
    assert resized_mask.shape == (40, 40) and resized_mask.dtype == torch.int64
    assert set(resized_mask.unique().tolist()) <= set(mask.unique().tolist())  # no blended class ids
    assert resized_mask[0, 0] == 255
    assert resize_segmentation(image, None, 16)[1] is None
    view = AugmentedSegmentation(SyntheticSegmentation("val", num_images=1, config=SMALL), size=32)
    assert [t.shape for t in view[(0, 1)]] == [(3, 32, 32), (32, 32)]
    with pytest.raises(ValueError, match=r"flip must be a finite number in \[0.0, 1.0\], got 1.5"):
        AugmentedSegmentation(view.dataset, size=32, flip=1.5)
    with pytest.raises(ValueError, match="size must be an int >= 1, got 0"):
        AugmentedSegmentation(view.dataset, size=0)


def test_augmentation_is_a_function_of_the_key() -> None:
    view = AugmentedDetection(SyntheticShapes("train", num_images=4, config=SMALL))
    for seed in range(6):
        a, b = view[(1, seed)], view[(1, seed)]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    left_strips = {view[(1, seed)][0][..., :8].sum().item() for seed in range(12)}
    assert len(left_strips) == 2  # flipped or not, both occur


def test_sampler_resumes_mid_stream_and_shards_ranks() -> None:
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(ResumableSampler(10, seed=3), 25)  # 2.5 epochs
    assert take(ResumableSampler(10, seed=3, start=13), 12) == full[13:]
    assert sorted(i for i, _ in full[:10]) == list(range(10)) and full[:10] != full[10:20]
    ranks = [take(ResumableSampler(10, rank=r, world_size=2, seed=3), 5) for r in range(2)]
    assert sorted(i for part in ranks for i, _ in part) == list(range(10))
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 1\], got 2"):
        ResumableSampler(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start must be an int >= 0, got -1"):
        ResumableSampler(10, start=-1)


def test_worker_errors_shorten_to_the_data_error_message() -> None:
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1\npvt_backbone.training.data.errors.DataError: img/a.png: cannot read image (bad)\n'
    )
    assert one_line(wrapped) == "img/a.png: cannot read image (bad)"
