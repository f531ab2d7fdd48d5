"""Aspect-ratio grouped batching: one group per batch, disjoint rank shares, exact resume, and the trainer wiring."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
from tiny_runs import tiny_run_config

from pvt_backbone.training.data import CocoDetection, SyntheticConfig, SyntheticShapes, write_coco
from pvt_backbone.training.data.grouping import GroupedBatchSampler, aspect_ratio_groups, dataset_image_sizes
from pvt_backbone.training.tasks import DataSpec
from pvt_backbone.training.trainer import read_log, train

# 23 images: landscape, portrait and square sizes mixed
SIZES = [(480, 640), (640, 480), (500, 500), (300, 900), (900, 300)] * 4 + [(480, 640), (640, 427), (333, 500)]
GROUPS = aspect_ratio_groups(SIZES)


def _epochs(sampler: GroupedBatchSampler, batches: int) -> list[list[tuple[int, int]]]:
    return list(itertools.islice(iter(sampler), batches))


def test_groups_split_portrait_from_the_rest() -> None:
    assert GROUPS[:5] == [1, 0, 1, 1, 0]
    assert aspect_ratio_groups([(100, 50), (100, 99), (100, 300)], bins=(0.75, 1.0, 2.0)) == [0, 1, 3]
    with pytest.raises(ValueError, match="bins"):
        aspect_ratio_groups(SIZES, bins=())


@pytest.mark.parametrize("batch_size", [2, 3])
def test_every_batch_holds_one_group(batch_size: int) -> None:
    sampler = GroupedBatchSampler(GROUPS, batch_size=batch_size, seed=1)
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        assert all(1 <= len(batch) <= batch_size for batch in batches)
        assert all(len({GROUPS[index] for index, _ in batch}) == 1 for batch in batches)
        assert sorted(index for batch in batches for index, _ in batch) == list(range(len(GROUPS)))
        # at most one short batch per group
        assert sum(len(batch) < batch_size for batch in batches) <= len(set(GROUPS))


def test_ranks_share_each_epoch_disjointly() -> None:
    for epoch in range(3):
        shares = [
            [
                index
                for batch in GroupedBatchSampler(GROUPS, batch_size=2, rank=r, world_size=2, seed=5).epoch_batches(
                    epoch
                )
                for index, _ in batch
            ]
            for r in range(2)
        ]
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == list(range(len(GROUPS)))
        assert len(shares[0]) == len(set(shares[0])) and len(shares[1]) == len(set(shares[1]))


def test_epochs_differ_and_seeds_repeat() -> None:
    one = GroupedBatchSampler(GROUPS, batch_size=2, seed=0)
    assert one.epoch_batches(0) == GroupedBatchSampler(GROUPS, batch_size=2, seed=0).epoch_batches(0)
    assert one.epoch_batches(0) != one.epoch_batches(1)
    seeds0 = {index: seed for batch in one.epoch_batches(0) for index, seed in batch}
    seeds1 = {index: seed for batch in one.epoch_batches(1) for index, seed in batch}
    assert all(seeds0[index] != seeds1[index] for index in seeds0)


@pytest.mark.parametrize("start", [0, 3, 12, 13, 30])
def test_resume_reproduces_the_remaining_batches(start: int) -> None:
    whole = _epochs(GroupedBatchSampler(GROUPS, batch_size=2, rank=1, world_size=2, seed=7), 40)
    resumed = _epochs(GroupedBatchSampler(GROUPS, batch_size=2, rank=1, world_size=2, seed=7, start=start), 40 - start)
    assert resumed == whole[start:]


def test_image_sizes_come_from_headers_and_configs(tmp_path: Path) -> None:
    scenes = SyntheticShapes("val", num_images=3, config=SyntheticConfig(image_size=64))
    assert dataset_image_sizes(scenes) == [(64, 64)] * 3
    write_coco(scenes, tmp_path / "images", tmp_path / "instances.json")
    coco = CocoDetection(tmp_path / "images", tmp_path / "instances.json")
    assert dataset_image_sizes(coco) == [tuple(coco[i][0].shape[-2:]) for i in range(3)]


def test_training_with_grouped_batches_and_detr_augmentation(tmp_path: Path) -> None:
    data = DataSpec(
        image_size=64,
        train_size=6,
        val_size=1,
        synthetic_classes=2,
        augment="detr",
        multiscale_sizes=(48, 64),
        max_size=96,
        photometric=True,
        group_aspect_ratio=True,
    )
    result = train(tiny_run_config(tmp_path / "run", data=data, max_steps=2, batch_size=2, save_every=0))
    assert result.steps == 2


def test_grouped_lsj_run_resumes_with_the_same_losses(tmp_path: Path) -> None:
    data = DataSpec(
        image_size=64, train_size=5, val_size=1, synthetic_classes=2, augment="lsj", group_aspect_ratio=True
    )
    full = tmp_path / "full"
    train(tiny_run_config(full, data=data, batch_size=2))  # 4 steps, checkpoints at 2 and 4, an epoch is 3 batches
    reference = {r["step"]: r["loss"] for r in read_log(full / "log.jsonl")}
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_00000004")
    (crashed / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "name": "step_00000002"}))
    train(tiny_run_config(crashed, data=data, batch_size=2, resume=True))
    assert {r["step"]: r["loss"] for r in read_log(crashed / "log.jsonl")} == reference
