"""Detection augmentation policies: geometry moves boxes, masks and keypoints together; seeded per sample key."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes

from pvt_backbone.training.data import SyntheticConfig, SyntheticShapes
from pvt_backbone.training.data.augment import (
    DETECTION_AUGMENTS,
    DetectionAugment,
    hflip_detection,
    keypoint_flip_permutation,
    photometric_distort,
)
from pvt_backbone.training.data.protocol import training_view
from pvt_backbone.training.data.transforms import AugmentedDetection, ResumableSampler
from pvt_backbone.training.tasks import DataSpec

KEYPOINT_NAMES = ("nose", "left_eye", "right_eye")
SMALL = {"sizes": (40, 56, 72), "max_size": 120, "lsj_size": 64}


class _Rectangles:
    """Objects whose masks are exactly their (integer) boxes, on a (3, 60, 90) image with a bright right half."""

    keypoint_names = KEYPOINT_NAMES

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        height, width = 60, 90
        boxes = torch.tensor([[4, 6, 40, 30], [30, 20, 86, 58], [10 + index, 35, 28 + index, 55]], dtype=torch.float32)
        masks = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
            mask[y0:y1, x0:x1] = 1
        # left_eye left of right_eye, both inside each box
        points = torch.stack(
            [
                torch.tensor([[(b[0] + b[2]) / 2, b[1] + 2, 2], [b[0] + 2, b[1] + 2, 2], [b[2] - 2, b[1] + 2, 2]])
                for b in boxes.tolist()
            ]
        )
        image = torch.zeros(3, height, width)
        image[:, :, width // 2 :] = 1.0
        target = {"boxes": boxes, "labels": torch.tensor([1, 2, 1]), "masks": masks, "keypoints": points}
        return image, target


def _augment(mode: str, **extra: object) -> DetectionAugment:
    return DetectionAugment(mode, **{**SMALL, **extra})


@pytest.mark.parametrize("mode", ["multiscale", "detr", "lsj"])
def test_boxes_follow_masks(mode: str) -> None:
    data = _Rectangles()
    augment = _augment(mode, flip_perm=tuple(keypoint_flip_permutation(KEYPOINT_NAMES)))
    for seed in range(12):
        image, target = augment(*data[seed % len(data)], np.random.default_rng(seed))
        masks, boxes = target["masks"], target["boxes"]
        assert masks.shape[-2:] == image.shape[-2:]
        assert len(masks) == len(boxes) == len(target["labels"]) == len(target["keypoints"])
        present = masks.flatten(1).amax(1) > 0
        assert bool(present.all()), "every kept object keeps mask pixels"
        mask_boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # inclusive pixel -> edge
        assert torch.allclose(mask_boxes, boxes, atol=1.0), (seed, mask_boxes, boxes)


def test_multiscale_sizes_and_cap() -> None:
    augment = DetectionAugment("multiscale", sizes=(32, 48, 64), max_size=80)
    shorter = set()
    for seed in range(20):
        image, _ = augment(*_Rectangles()[0], np.random.default_rng(seed))
        assert max(image.shape[-2:]) <= 80
        shorter.add(min(image.shape[-2:]))
    # 60x90 with the longer side capped at 80: shorter side 32, 48 or 80 * 60 / 90 = 53
    assert shorter <= {32, 48, 53} and len(shorter) >= 2


def test_lsj_canvas_is_square() -> None:
    augment = _augment("lsj")
    for seed in range(8):
        image, target = augment(*_Rectangles()[0], np.random.default_rng(seed))
        assert image.shape[-2:] == (64, 64) and target["masks"].shape[-2:] == (64, 64)


def test_flip_swaps_left_and_right_keypoints() -> None:
    perm = keypoint_flip_permutation(["nose", "left_eye", "right_eye", "left_ear", "right_ear"])
    assert perm == [0, 2, 1, 4, 3]
    image, target = _Rectangles()[0]
    _, flipped = hflip_detection(image, target, keypoint_flip_permutation(KEYPOINT_NAMES))
    width = image.shape[-1]
    assert torch.allclose(flipped["keypoints"][:, 1, 0], width - target["keypoints"][:, 2, 0])
    assert torch.allclose(flipped["keypoints"][:, 2, 0], width - target["keypoints"][:, 1, 0])


@pytest.mark.parametrize("mode", ["multiscale", "detr", "lsj"])
def test_keypoints_stay_left_and_right_under_every_policy(mode: str) -> None:
    view = AugmentedDetection(_Rectangles(), augment=_augment(mode))
    flips = 0
    for seed in range(16):
        image, target = view[(seed % 6, seed)]
        left, right, visible = target["keypoints"][:, 1], target["keypoints"][:, 2], target["keypoints"][:, 1:, 2]
        both = visible.min(1).values > 0
        assert bool((left[both, 0] < right[both, 0]).all())
        columns = image[0].mean(0)
        content = columns[: int((columns > 0).nonzero().max()) + 1] if mode == "lsj" else columns
        flips += int(content[: len(content) // 4].mean() > content[-len(content) // 4 :].mean())
    assert 0 < flips < 16  # both flipped and unflipped samples were seen


def test_same_key_same_output_other_epoch_differs() -> None:
    scenes = SyntheticShapes("train", num_images=4, config=SyntheticConfig(image_size=64))
    view = AugmentedDetection(scenes, augment=DetectionAugment("detr", sizes=(48, 64), max_size=96, photometric=True))
    sampler = iter(ResumableSampler(4, seed=3))
    epoch0 = [next(sampler) for _ in range(4)]
    epoch1 = {index: key for index, key in (next(sampler) for _ in range(4))}
    differs = 0
    for index, aug_seed in epoch0:
        first, again = view[(index, aug_seed)], view[(index, aug_seed)]
        assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
        other = view[(index, epoch1[index])]
        differs += int(other[0].shape != first[0].shape or not torch.equal(other[0], first[0]))
    assert differs == 4


def test_flip_policy_is_the_default_view() -> None:
    scenes = SyntheticShapes("train", num_images=3, config=SyntheticConfig(image_size=64))
    default, named = AugmentedDetection(scenes), training_view(scenes, "detection", DataSpec(), 64)[0]
    for index in range(3):
        for aug_seed in (1, 2, 3, 4):
            expected = scenes[index]
            if np.random.default_rng(aug_seed).random() < 0.5:
                expected = hflip_detection(*expected, default.flip_perm)
            for image, target in (default[(index, aug_seed)], named[(index, aug_seed)]):
                assert torch.equal(image, expected[0]) and torch.equal(target["keypoints"], expected[1]["keypoints"])


def test_none_policy_keeps_the_sample() -> None:
    image, target = _Rectangles()[0]
    out_image, out_target = _augment("none", photometric=True)(image, target, np.random.default_rng(0))
    assert torch.equal(out_image, image) and torch.equal(out_target["boxes"], target["boxes"])


def test_photometric_distortion_changes_colour_not_geometry() -> None:
    image = torch.rand(3, 16, 24)
    outputs = [photometric_distort(image, np.random.default_rng(seed)) for seed in range(6)]
    assert all(out.shape == image.shape and 0 <= out.min() and out.max() <= 1 for out in outputs)
    assert any(not torch.allclose(out, image) for out in outputs)


def test_data_spec_fields_round_trip_and_are_checked() -> None:
    spec = DataSpec(augment="multiscale", multiscale_sizes=(64, 96), max_size=160, group_aspect_ratio=True)
    assert DataSpec(**json.loads(json.dumps(spec.to_dict()))) == spec
    assert set(DETECTION_AUGMENTS) == {"none", "flip", "multiscale", "detr", "lsj"}
    with pytest.raises(ValueError, match="augment"):
        DataSpec(augment="mosaic")
    with pytest.raises(ValueError, match="max_size"):
        DataSpec(augment="multiscale", multiscale_sizes=(800,), max_size=600)
    with pytest.raises(ValueError, match="multiscale_sizes"):
        dataclasses.replace(spec, multiscale_sizes=())
