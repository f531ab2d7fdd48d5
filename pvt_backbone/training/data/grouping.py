"""Aspect-ratio grouped batching: every batch holds images of one aspect-ratio group, so padded batches waste
little; deterministic per (seed, epoch), resumable at any batch, and sharded over ranks.

Epoch e shuffles the dataset with ``(seed, e)``; rank r takes positions ``r, r + world_size, ...`` of that order
(disjoint shares, no padding, so the union over ranks is the epoch exactly once). Walking its share in order, a
rank keeps one buffer per group and yields a buffer as a batch when it reaches ``batch_size``; what is left at the
end of the epoch is yielded as shorter batches, still one group each. Samples are ``(index, aug_seed)`` keys with
the same ``aug_seed`` as :class:`~.transforms.ResumableSampler`.

Example:
    >>> groups = aspect_ratio_groups([(480, 640), (640, 480), (500, 500), (300, 900)])
    >>> groups
    [1, 0, 1, 1]
    >>> sampler = GroupedBatchSampler(groups, batch_size=2, seed=0)
    >>> batches = sampler.epoch_batches(0)
    >>> all(len({groups[index] for index, _ in batch}) == 1 for batch in batches)
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from ...checks import check_int

__all__ = ["aspect_ratio_groups", "dataset_image_sizes", "GroupedBatchSampler"]


def aspect_ratio_groups(sizes: Sequence[tuple[int, int]], bins: Sequence[float] = (1.0,)) -> list[int]:
    """The group of each (height, width): how many of the ``bins`` edges its ratio w / h reaches.

    The default single edge 1.0 makes two groups: 0 for portrait (w / h < 1), 1 for square and landscape; more
    edges (e.g. ``(0.5, 1.0, 2.0)``) quantise finer.

    >>> aspect_ratio_groups([(100, 200), (200, 100), (100, 100)])
    [1, 0, 1]
    >>> aspect_ratio_groups([(100, 300), (100, 150), (200, 100)], bins=(0.75, 1.0, 2.0))
    [3, 2, 0]
    """
    edges = sorted(float(edge) for edge in bins)
    if not edges or any(edge <= 0 for edge in edges):
        raise ValueError(f"aspect-ratio bins must be positive ratios w / h, got {list(bins)}")
    return [int(np.searchsorted(edges, width / height, side="right")) for height, width in sizes]


def dataset_image_sizes(dataset: Any) -> list[tuple[int, int]]:
    """(height, width) of every image: ``dataset.image_size(i)`` where the dataset has it (read without decoding
    pixels), else the shape of the loaded image."""
    size_of = getattr(dataset, "image_size", None)
    if callable(size_of):
        return [tuple(size_of(index)) for index in range(len(dataset))]
    return [tuple(dataset[index][0].shape[-2:]) for index in range(len(dataset))]


class GroupedBatchSampler(Sampler):
    """An endless stream of batches (lists of ``(index, aug_seed)``) for one rank, each batch from one group.

    Args:
        groups: the group of every dataset index (see :func:`aspect_ratio_groups`).
        batch_size: samples per full batch.
        rank, world_size: this process's share of every epoch.
        seed: the shuffle and augmentation seed.
        start: batches this rank already consumed (resuming at step s is ``start = s``).
    """

    def __init__(
        self,
        groups: Sequence[int],
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start: int = 0,
    ) -> None:
        check_int("world_size", world_size, minimum=1)
        check_int("rank", rank, minimum=0, maximum=world_size - 1)
        if len(groups) < world_size:
            raise ValueError(f"{len(groups)} images cannot be shared by world_size={world_size} ranks")
        self.groups = [int(group) for group in groups]
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.rank, self.world_size = rank, world_size
        self.seed = check_int("seed", seed, minimum=0)
        self.start = check_int("start", start, minimum=0)

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's batches of epoch ``epoch``, in the order they are yielded."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.groups), generator=generator).tolist()[self.rank :: self.world_size]
        buffers: dict[int, list[tuple[int, int]]] = {}
        batches = []
        for index in order:
            aug_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
            buffer = buffers.setdefault(self.groups[index], [])
            buffer.append((index, aug_seed))
            if len(buffer) == self.batch_size:
                batches.append(buffers.pop(self.groups[index]))
        batches.extend(buffers[group] for group in sorted(buffers))
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip = 0, self.start
        while True:
            batches = self.epoch_batches(epoch)
            if skip >= len(batches):
                skip -= len(batches)
            else:
                yield from batches[skip:]
                skip = 0
            epoch += 1
