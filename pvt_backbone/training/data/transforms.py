"""Training views of the datasets: seeded augmentation, a resumable distributed sampler, and collate functions.

Augmentation randomness comes from the sample key, never from a global RNG: the sampler yields
``(index, aug_seed)`` pairs, so an epoch looks the same with any number of DataLoader workers and after a resume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler

from heads import resize_bilinear

from ...checks import check_float, check_int
from .augment import DetectionAugment, hflip_detection, keypoint_flip_permutation

__all__ = [
    "keypoint_flip_permutation",
    "hflip_detection",
    "resize_segmentation",
    "AugmentedDetection",
    "AugmentedSegmentation",
    "ResumableSampler",
    "collate_detection",
    "collate_segmentation",
]


def resize_segmentation(image: Tensor, mask: Tensor | None, size: int) -> tuple[Tensor, Tensor | None]:
    """Resize a (3, H, W) image (bilinear) and its (H, W) mask (nearest: class ids stay ids) to ``size`` x ``size``.

    Example:
        >>> image, mask = resize_segmentation(torch.rand(3, 20, 30), torch.randint(0, 3, (20, 30)), 16)
        >>> image.shape, mask.shape, mask.dtype, set(mask.unique().tolist()) <= {0, 1, 2}
        (torch.Size([3, 16, 16]), torch.Size([16, 16]), torch.int64, True)
    """
    image = resize_bilinear(image[None], (size, size))[0]
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    return image, mask


def _rng(aug_seed: int | None) -> np.random.Generator | None:
    return None if aug_seed is None else np.random.default_rng(aug_seed)


def _split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    return (key[0], key[1]) if isinstance(key, tuple) else (key, None)


class AugmentedDetection(Dataset):
    """Detection dataset view keyed by ``(index, aug_seed)``: random horizontal flip with probability ``flip``, or,
    with ``augment``, that policy (its keypoint flip order taken from the dataset's ``keypoint_names``); a plain
    index is not augmented.

    Example:
        >>> from pvt_backbone.training.data import SyntheticConfig, SyntheticShapes
        >>> scenes = SyntheticShapes("train", num_images=2, config=SyntheticConfig(image_size=64))
        >>> view = AugmentedDetection(scenes, augment=DetectionAugment("multiscale", sizes=(48, 80), max_size=80))
        >>> image, target = view[(0, 7)]
        >>> image.shape[-1] in (48, 80), target["masks"].shape[-2:] == image.shape[-2:]
        (True, True)
    """

    def __init__(self, dataset: Any, *, flip: float = 0.5, augment: DetectionAugment | None = None) -> None:
        self.dataset = dataset
        self.flip = check_float("flip", flip, minimum=0.0, maximum=1.0)
        names = getattr(dataset, "keypoint_names", ())
        self.flip_perm = keypoint_flip_permutation(names) if names else None
        if augment is not None and augment.mode == "flip" and augment.photometric is False:
            augment = None  # the flip policy is this view's own flip
        if augment is not None and self.flip_perm is not None:
            augment = dataclasses.replace(augment, flip_perm=tuple(self.flip_perm))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Any]]:
        index, aug_seed = _split_key(key)
        image, target = self.dataset[index]
        rng = _rng(aug_seed)
        if rng is not None and self.augment is not None:
            return self.augment(image, target, rng)
        if rng is not None and rng.random() < self.flip:
            image, target = hflip_detection(image, target, self.flip_perm)
        return image, target


class AugmentedSegmentation(Dataset):
    """Segmentation view keyed by ``(index, aug_seed)``: resize to ``size`` and random horizontal flip."""

    def __init__(self, dataset: Any, *, size: int, flip: float = 0.5) -> None:
        self.dataset = dataset
        self.size = check_int("size", size, minimum=1)
        self.flip = check_float("flip", flip, minimum=0.0, maximum=1.0)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, aug_seed = _split_key(key)
        image, mask = self.dataset[index]
        image, mask = resize_segmentation(image, mask, self.size)
        rng = _rng(aug_seed)
        if rng is not None and rng.random() < self.flip:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


class ResumableSampler(Sampler):
    """An endless stream of ``(index, aug_seed)`` for one rank, epoch after epoch, starting at sample ``start``.

    Epoch e is ``DistributedSampler(shuffle=True, seed=seed)`` after ``set_epoch(e)``: every rank sees a disjoint
    shard, padded to equal length. ``start`` counts samples this rank already consumed, so resuming at step s with
    batch size b is ``start = s * b``. Nothing here needs a process group.
    """

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0) -> None:
        check_int("size", size, minimum=1)
        check_int("world_size", world_size, minimum=1)
        check_int("rank", rank, minimum=0, maximum=world_size - 1)
        check_int("seed", seed, minimum=0)
        check_int("start", start, minimum=0)
        self.base = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.seed = seed
        self.rank = rank
        self.start = start

    @property
    def samples_per_epoch(self) -> int:
        """Samples one rank sees per epoch."""
        return len(self.base)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, len(self.base))
        while True:
            self.base.set_epoch(epoch)
            indices = list(self.base)
            for position in range(offset, len(indices)):
                aug_seed = int(np.random.SeedSequence([self.seed, epoch, indices[position]]).generate_state(1)[0])
                yield indices[position], aug_seed
            epoch, offset = epoch + 1, 0


def collate_detection(batch: list[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Keep images and targets as lists: torchvision detectors batch images of different sizes themselves."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def collate_segmentation(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack same-sized pairs: (B, 3, H, W) images and (B, H, W) masks."""
    images, masks = zip(*batch)
    return torch.stack(images), torch.stack(masks)
